"""qwenlora-merge: merge LoRAs offline into Nunchaku 4-bit Qwen-Image / Z-Image-Turbo checkpoints.

The Python API (converter.api documents it):

    from converter import merge, plan, verify, export_diffusers

Its names are loaded on first use, so `import converter` stays light (the console script imports it before it
installs its signal handler).
"""

__version__ = "0.1.0"

__all__ = ["merge", "plan", "batch", "verify", "export_diffusers", "LoraSpec", "Report", "VerifyReport",
           "MergeError", "FileError", "UnknownFamily", "UnsupportedFormat", "ShapeMismatch", "UnmappedKeys",
           "CodecError", "VerifyFailed", "ExportError"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

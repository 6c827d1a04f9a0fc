"""Stock diffusers (0.42) loading an export on a CPU-only machine, its own code unchanged.

diffusers' Nunchaku Lite quantizer module imports the `kernels` package and fetches its CUDA kernels from a model
hub at import time (quantizers/nunchaku/utils.py), and its quantizer refuses a machine without a suitable GPU
(NunchakuLiteQuantizer.validate_environment). Loading calls no kernel op, so:
* `install_kernels_standin()` imports that module with a stand-in `get_kernel` (its ops raise if ever called);
  an installed `kernels` package is never shadowed for other importers (transformers imports it too);
* `fake_cuda(capability)` answers the two torch.cuda queries validate_environment asks, during a load only.
Everything else (replace_with_nunchaku_linear, check_strict_state_dict_match, from_pretrained) is diffusers' own.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import importlib.metadata as md
import json
import os
import pathlib
import re
import sys
import types

KERNELS_VERSION = "0.14.0"  # >= 0.14 makes diffusers pass trust_remote_code (quantizers/nunchaku/utils.py)
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


class _StandInOps:
    def __getattr__(self, name):
        def op(*args, **kwargs):
            raise RuntimeError(f"stand-in kernels: CUDA op {name!r} called; the tests only load")

        return op


def _get_kernel(repo_id, version=None, revision=None, user_agent=None, trust_remote_code=False, **kwargs):
    return types.SimpleNamespace(ops=_StandInOps())


class _KernelsDist(md.Distribution):
    def read_text(self, filename):
        return f"Metadata-Version: 2.1\nName: kernels\nVersion: {KERNELS_VERSION}\n" if filename == "METADATA" else None

    def locate_file(self, path):
        return pathlib.Path("/nonexistent-kernels-standin") / path


class _KernelsFinder(md.DistributionFinder):
    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=md.DistributionFinder.Context()):
        if context.name in (None, "kernels"):
            yield _KernelsDist()


def install_kernels_standin() -> None:
    """Make diffusers' Nunchaku Lite quantizer module importable offline. Idempotent.

    Where the real `kernels` package is installed (transformers imports it too), it is never shadowed: its
    `get_kernel` is swapped for the stand-in only while diffusers' quantizer module is imported (that module binds
    the name at import and calls it once), then restored, so every other importer gets the real package.
    Only where no `kernels` is installed, a stand-in module (and an importlib.metadata entry, which diffusers'
    availability check reads) takes its place: then there is nothing it could shadow.
    """
    os.environ["DIFFUSERS_TRUST_REMOTE_KERNELS"] = "true"
    os.environ.pop("DIFFUSERS_DISABLE_REMOTE_CODE", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "diffusers.quantizers.nunchaku.utils" in sys.modules:
        return
    if importlib.util.find_spec("kernels") is not None and not getattr(sys.modules.get("kernels"), "__standin__", 0):
        import kernels

        real = kernels.get_kernel
        kernels.get_kernel = _get_kernel
        try:
            _import_quantizer()
        finally:
            kernels.get_kernel = real
        return
    _install_module_standin()
    _import_quantizer()


def _install_module_standin() -> None:
    if getattr(sys.modules.get("kernels"), "__standin__", False):
        return
    kernels = types.ModuleType("kernels")
    kernels.__spec__ = importlib.machinery.ModuleSpec("kernels", loader=None)  # importlib.util.find_spec reads it
    kernels.__version__ = KERNELS_VERSION
    kernels.__standin__ = True
    kernels.get_kernel = _get_kernel
    sys.modules["kernels"] = kernels
    sys.meta_path.append(_KernelsFinder())  # after the real finders: an installed `kernels` still answers first
    if "diffusers" in sys.modules:  # too late for its import-time checks: give them the values they would have had
        import diffusers.utils.import_utils as iu

        iu._kernels_available, iu._kernels_version = True, KERNELS_VERSION


def _import_quantizer() -> None:
    """Import diffusers' quantizer module now, with the trust flag it reads at import set as the env var says."""
    import diffusers.utils.constants as constants

    constants.DIFFUSERS_TRUST_REMOTE_KERNELS = True  # read at diffusers' import: it may have come first
    import diffusers.quantizers.nunchaku.utils  # noqa: F401 - calls get_kernel once, at import


@contextlib.contextmanager
def fake_cuda(capability: tuple[int, int]):
    """The two queries NunchakuLiteQuantizer.validate_environment makes; (8, 9) passes int4, (12, 0) nvfp4."""
    import torch

    saved = torch.cuda.is_available, torch.cuda.get_device_capability
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: capability
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.get_device_capability = saved


def capability_for(folder) -> tuple[int, int]:
    qc = json.loads((pathlib.Path(folder) / "config.json").read_text())["quantization_config"]
    return (12, 0) if qc["svdq_w4a4"]["precision"] == "nvfp4" else (8, 9)


SNIPPET_RX = re.compile(r"<!-- diffusers-load:begin -->\s*```python\n(.*?)```\s*<!-- diffusers-load:end -->", re.S)
SNIPPET_FOLDER = '"svdq-int4_r64-qwen-image-diffusers"'  # the folder name the README's snippet uses
SNIPPET_CLASS = "QwenImageTransformer2DModel"


def readme_snippet() -> str:
    m = SNIPPET_RX.search(README.read_text(encoding="utf-8"))
    assert m, "README.md lacks the diffusers loading snippet between its markers"
    return m.group(1)


def load_as_readme_shows(folder, class_name: str):
    """Run the README's snippet as written, with only the folder path (and, for Z-Image, the class its comment
    names) substituted; returns its `transformer` and `info`."""
    code = readme_snippet()
    assert SNIPPET_FOLDER in code and SNIPPET_CLASS in code
    code = code.replace(SNIPPET_FOLDER, repr(str(folder))).replace(SNIPPET_CLASS, class_name)
    ns: dict = {}
    with fake_cuda(capability_for(folder)):
        exec(compile(code, "README.md (diffusers snippet)", "exec"), ns)
    return ns["transformer"], ns["info"]


def quantized_skeleton(folder):
    """The stock model of the folder's config.json on the meta device, its Linear modules replaced by diffusers'
    own quantizer path (what from_pretrained does before loading): its state dict is the exact contract."""
    import diffusers
    import torch
    from accelerate import init_empty_weights
    from diffusers.quantizers.auto import DiffusersAutoQuantizer

    cfg = json.loads((pathlib.Path(folder) / "config.json").read_text())
    cls = getattr(diffusers, cfg["_class_name"])
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as from_pretrained builds it under torch_dtype
    try:
        with init_empty_weights():
            model = cls.from_config({k: v for k, v in cfg.items() if k != "quantization_config"})
    finally:
        torch.set_default_dtype(saved)
    quantizer = DiffusersAutoQuantizer.from_config(cfg["quantization_config"], pre_quantized=True)
    quantizer.update_torch_dtype(torch.bfloat16)
    quantizer.preprocess_model(model=model, device_map=None, keep_in_fp32_modules=[])
    return model

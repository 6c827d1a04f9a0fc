"""Typed errors: one hierarchy, rooted at MergeError. Each class's `exit_code` is the console script's exit status
for it; the CLI prints `error: <message>` (one line, never a traceback). Any other exception escaping is a bug.

    MergeError           2  a problem with the input or the request (missing file, bad strength, output exists, ...)
    ├─ FileError         2  a file could not be read or written (the OSError is its __cause__)
    ├─ UnknownFamily     2  the base is no checkpoint of a known model family
    ├─ UnsupportedFormat 2  a LoRA holds something this version cannot merge
    ├─ ShapeMismatch     2  a LoRA's shapes do not fit the base's layer
    ├─ CodecError        2  a packed tensor that cannot be read
    ├─ ExportError       2  a base that cannot be exported for diffusers (`export_diffusers`)
    ├─ UnmappedKeys      3  LoRA keys with no target in the base (allow_unmapped merges the rest)
    └─ VerifyFailed      4  `verify(..., check=True)`: a layer or the loader contract out of tolerance
"""

from __future__ import annotations


class MergeError(Exception):
    """Base class: a problem with the user's input or request, explained in one line."""

    exit_code = 2


class FileError(MergeError):
    """A file could not be read or written: the message names the system's reason and the file."""

    @classmethod
    def from_os_error(cls, err: OSError) -> FileError:
        """The error for an OSError, worded as the console script words it (`<reason>: <file>`).

        Args:
            err: the OSError raised by a read or a write.

        Returns:
            A FileError whose __cause__ the caller sets (`raise ... from err`).
        """
        filename = getattr(err, "filename", None)
        return cls(f"{err.strerror or err}{': ' + str(filename) if filename else ''}")


class UnknownFamily(MergeError):
    """The base is not a checkpoint of a model family this tool knows."""


class UnsupportedFormat(MergeError):
    """A LoRA holds something this version cannot merge."""


class ShapeMismatch(MergeError):
    """A LoRA's shapes do not fit the layer they target."""


class UnmappedKeys(MergeError):
    """LoRA keys that have no target in the base (wrong family, unknown layer)."""

    exit_code = 3


class CodecError(MergeError):
    """A packed tensor that cannot be unpacked."""


class ExportError(MergeError):
    """A checkpoint or request the diffusers export cannot serve (exit code 2, one line, nothing written)."""


class VerifyFailed(MergeError):
    """A merged file out of tolerance; `.report` holds the verify report."""

    exit_code = 4

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report

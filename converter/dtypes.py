"""safetensors dtype names and their element sizes, struct formats and torch dtypes.

The tables are plain data, so that reading headers and planning need no torch (its import takes seconds and
overlaps the first copies); `torch_dtype` / `dtype_name` import torch on first use.
"""

from __future__ import annotations

import struct
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SIZES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2,
                         "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_NAMES: dict[str, str] = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
                               "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
                               "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
STRUCT: dict[str, str] = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b",
                          "U8": "B", "BOOL": "?"}


@cache
def _tables() -> tuple[dict, dict]:
    import torch

    to_torch = {k: getattr(torch, v) for k, v in TORCH_NAMES.items()}
    return to_torch, {v: k for k, v in to_torch.items()}


def torch_dtype(name: str) -> torch.dtype:
    """safetensors dtype name -> torch dtype."""
    return _tables()[0][name]


def dtype_name(dtype: torch.dtype) -> str | None:
    """torch dtype -> safetensors dtype name (None for a dtype safetensors lacks)."""
    return _tables()[1].get(dtype)


def decode_scalar(dtype: str, raw: bytes) -> float | None:
    """The value of one element's bytes, without torch (None where struct has no format: fp8)."""
    if dtype == "BF16":
        return struct.unpack("<f", b"\0\0" + raw)[0]
    fmt = STRUCT.get(dtype)
    return None if fmt is None else float(struct.unpack("<" + fmt, raw)[0])


def encode_exact(dtype: str, value: float) -> bytes | None:
    """The one encoding of a value that a float dtype represents exactly (None: not exact, or not floating)."""
    if dtype == "BF16":
        b = struct.pack("<f", value)
        return b[2:] if b[:2] == b"\0\0" else None
    if dtype in ("F64", "F32", "F16"):
        try:
            b = struct.pack("<" + STRUCT[dtype], value)
        except OverflowError:
            return None
        return b if struct.unpack("<" + STRUCT[dtype], b)[0] == value and value == value and value != 0 else None
    return None

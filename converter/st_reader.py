"""safetensors reading without loading whole files.

`Checkpoint` parses only the header and reads one tensor at a time with positioned reads (no mmap, so the
resident set stays at one tensor). Nothing here needs torch but `get`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from . import dtypes
from .errors import MergeError
from .posio import read_exact

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return dtypes.SIZES[self.dtype]


class Checkpoint:
    """A safetensors file opened for header inspection and tensor-by-tensor reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._f: BinaryIO = open(self.path, "rb")
        except OSError as e:
            raise MergeError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self._parse()
        except BaseException:
            self._f.close()
            raise

    def _parse(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        bad = f"{self.path} is not a safetensors file"
        if len(head) < 8:
            raise MergeError(f"{bad} (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise MergeError(f"{bad} (bad header length)")
        try:
            header = json.loads(self._f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MergeError(f"{bad} (header is not JSON)") from None
        if not isinstance(header, dict):
            raise MergeError(f"{bad} (header is not an object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise MergeError(f"{bad} (metadata must map strings to strings)")
        self.metadata: dict[str, str] = dict(meta)
        self.data_start = 8 + n
        infos = [self._entry(name, d, size, bad) for name, d in header.items()]
        infos.sort(key=lambda t: t.start)
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}
        self.file_size = size

    def _entry(self, name: str, d, size: int, bad: str) -> TensorInfo:
        try:
            dtype, shape, (a, b) = d["dtype"], tuple(int(x) for x in d["shape"]), d["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{bad} (bad entry for {name!r})") from None
        if dtype not in dtypes.SIZES:
            raise MergeError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        if b - a != math.prod(shape) * dtypes.SIZES[dtype] or self.data_start + b > size or a < 0:
            raise MergeError(f"{bad} (tensor {name!r} has inconsistent offsets; truncated file?)")
        return TensorInfo(name, dtype, shape, self.data_start + a, b - a)

    # -- reading -------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read_bytes(self, name: str) -> bytearray:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        read_exact(self._f.fileno(), memoryview(buf), info.start, f"{self.path}: {name}")
        return buf

    def read_into(self, view: memoryview, pos: int, what: str) -> None:
        """Raw bytes at absolute file offset `pos` into `view`."""
        read_exact(self._f.fileno(), view, pos, f"{self.path}: {what}")

    def scalar(self, name: str) -> float:
        """A one-element tensor's value (e.g. a LoRA alpha), decoded without torch."""
        info = self.tensors[name]
        if math.prod(info.shape) != 1:
            raise MergeError(f"{self.path}: {name} is not a scalar")
        value = dtypes.decode_scalar(info.dtype, bytes(self.read_bytes(name)))
        return float(self.get(name).float().item()) if value is None else value

    def all_equal(self, name: str, value: float) -> bool:
        """Whether every element equals `value`, compared on the raw bytes where the dtype allows."""
        info = self.tensors[name]
        enc = dtypes.encode_exact(info.dtype, value)
        if enc is None:
            return bool((self.get(name).float() == value).all())
        return self.read_bytes(name) == enc * math.prod(info.shape)

    def get(self, name: str) -> torch.Tensor:
        import torch

        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(self.read_bytes(name), dtype=info.torch_dtype).reshape(info.shape)

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

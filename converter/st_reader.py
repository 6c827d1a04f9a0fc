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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells that a file changed under us: device, inode, size, modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(dup)
    return d


class _DuplicateKey(ValueError):
    pass


def _read_header(f: BinaryIO, size: int, bad: str) -> dict:
    """The JSON header of an open safetensors file, checked: its length, UTF-8, JSON, no key twice, an object."""
    head = f.read(8)
    if len(head) < 8:
        raise MergeError(f"{bad} (too short)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER:
        raise MergeError(f"{bad} (its header of {n} bytes exceeds the {MAX_HEADER >> 20} MB limit)")
    if 8 + n > size:
        raise MergeError(f"{bad} (its header length {n} runs past the end of the file; truncated?)")
    try:
        text = f.read(n).decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeError(f"{bad} (its header is not UTF-8 text: byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise MergeError(f"{bad} (its header names {e.args[0]!r} twice: a duplicate JSON key)") from None
    except RecursionError:
        raise MergeError(f"{bad} (its header JSON nests too deep)") from None
    except json.JSONDecodeError as e:
        raise MergeError(f"{bad} (its header is not JSON: {e.msg} at byte {e.pos})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{bad} (its header is not a JSON object)")
    return header


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
        st = os.fstat(self._f.fileno())
        self.identity = _identity(st)
        size = st.st_size
        bad = f"{self.path} is not a safetensors file"
        header = _read_header(self._f, size, bad)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise MergeError(f"{bad} (metadata must map strings to strings)")
        self.metadata: dict[str, str] = dict(meta)
        self.data_start = self._f.tell()
        infos = [self._entry(name, d, size, bad) for name, d in header.items()]
        infos.sort(key=lambda t: (t.start, t.nbytes))
        reach: TensorInfo | None = None  # the tensor that ends furthest so far
        for cur in (t for t in infos if t.nbytes):
            if reach is not None and cur.start < reach.start + reach.nbytes:
                raise MergeError(f"{bad} (tensors {reach.name!r} and {cur.name!r} overlap: their data_offsets "
                                 "share bytes)")
            reach = cur
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}
        self.file_size = size

    def _entry(self, name: str, d, size: int, bad: str) -> TensorInfo:
        try:
            dtype, shape, offsets = d["dtype"], d["shape"], d["data_offsets"]
        except (KeyError, TypeError):
            raise MergeError(f"{bad} (bad entry for {name!r}: it needs dtype, shape and data_offsets)") from None
        if not isinstance(dtype, str) or dtype not in dtypes.SIZES:
            raise MergeError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(x) for x in shape):
            raise MergeError(f"{bad} (bad entry for {name!r}: shape {shape!r} is not a list of integers)")
        if any(x < 0 for x in shape):
            raise MergeError(f"{bad} (tensor {name!r} has a negative dimension in its shape {shape})")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
            raise MergeError(f"{bad} (bad entry for {name!r}: data_offsets {offsets!r} are not two integers)")
        a, b = offsets
        if a < 0 or b - a != math.prod(shape) * dtypes.SIZES[dtype] or self.data_start + b > size:
            raise MergeError(f"{bad} (tensor {name!r} has inconsistent offsets; truncated file?)")
        return TensorInfo(name, dtype, tuple(shape), self.data_start + a, b - a)

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
        raw = torch.empty(info.nbytes, dtype=torch.uint8)  # not a bytearray: that would be zeroed first, then read
        read_exact(self._f.fileno(), memoryview(raw.numpy()), info.start, f"{self.path}: {name}")
        return raw.view(info.torch_dtype).reshape(info.shape)

    def fileno(self) -> int:
        return self._f.fileno()

    def check_unchanged(self) -> None:
        """Refuse if the file changed since it was opened (size, modification time, or replaced by another):
        what was read of it may then mix old and new bytes."""
        try:
            now = _identity(os.stat(self.path)), _identity(os.fstat(self._f.fileno()))
        except OSError as e:
            raise MergeError(f"{self.path} vanished while it was read ({e.strerror}); nothing was written") from None
        if any(ident != self.identity for ident in now):
            raise MergeError(f"{self.path} changed while it was read (its size or modification time differs); "
                             "nothing was written")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""safetensors I/O without loading whole files.

`Checkpoint` parses only the header and reads one tensor at a time with positioned reads (no mmap, so the
resident set stays at one tensor). `StreamingWriter` writes a header computed up front, then the tensors in
order, into a temp file in the target folder; `commit()` fsyncs and renames it into place, and any failure
removes the temp file, so the output path never holds a partial file.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable

import torch

from .errors import MergeError

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
COPY_CHUNK = 64 << 20
MAX_HEADER = 100 << 20
MAX_QUEUED_BYTES = 256 << 20  # computed tensors waiting for the writer thread


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


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
        infos = []
        for name, d in header.items():
            try:
                dtype, shape, (a, b) = d["dtype"], tuple(int(x) for x in d["shape"]), d["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise MergeError(f"{bad} (bad entry for {name!r})") from None
            if dtype not in DTYPES:
                raise MergeError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if b - a != math.prod(shape) * _itemsize(dtype) or self.data_start + b > size or a < 0:
                raise MergeError(f"{bad} (tensor {name!r} has inconsistent offsets; truncated file?)")
            infos.append(TensorInfo(name, dtype, shape, self.data_start + a, b - a))
        infos.sort(key=lambda t: t.start)
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}
        self.file_size = size

    # -- reading -------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read_bytes(self, name: str) -> bytearray:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:
            n = os.preadv(self._f.fileno(), [view[got:]], info.start + got)
            if n <= 0:
                raise MergeError(f"{self.path}: unexpected end of file reading {name}")
            got += n
        return buf

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(self.read_bytes(name), dtype=info.torch_dtype).reshape(info.shape)

    def copy_raw(self, name: str, out: BinaryIO) -> int:
        """Copy a tensor's bytes unchanged to `out`, in bounded chunks."""
        info = self.tensors[name]
        pos, left = info.start, info.nbytes
        fd = self._f.fileno()
        while left:
            chunk = os.pread(fd, min(left, COPY_CHUNK), pos)
            if not chunk:
                raise MergeError(f"{self.path}: unexpected end of file reading {name}")
            out.write(chunk)
            pos += len(chunk)
            left -= len(chunk)
        return info.nbytes

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class StreamingWriter:
    """Writes tensors in a fixed, pre-declared order; the header is written first from the specs."""

    def __init__(self, path: str | os.PathLike, specs: Iterable[OutSpec], metadata: dict[str, str],
                 progress: Callable[[int], None] | None = None):
        self.path = os.fspath(path)
        self.specs = list(specs)
        self._next = 0
        self._progress = progress
        off = sum(s.nbytes for s in self.specs)
        raw = self._header_bytes(metadata)
        self._header_len = len(raw)
        self.total = 8 + len(raw) + off
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".partial", dir=folder)
        self._f = os.fdopen(fd, "wb", buffering=8 << 20)
        try:
            self._f.write(struct.pack("<Q", len(raw)))
            self._f.write(raw)
        except BaseException:
            self._f.close()
            os.unlink(self.tmp_path)
            raise
        self._start_io()

    def _header_bytes(self, metadata: dict[str, str]) -> bytes:
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        off = 0
        for s in self.specs:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
            off += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    def patch_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header with new metadata of the same encoded length (e.g. a hash that was a
        placeholder of the same width while the tensors streamed)."""
        self._drain()
        raw = self._header_bytes(metadata)
        if len(raw) != self._header_len:
            raise RuntimeError("patched metadata changes the header length")
        self._f.flush()
        self._f.seek(8)
        self._f.write(raw)
        self._f.flush()
        self._f.seek(0, os.SEEK_END)

    def _expect(self, name: str, nbytes: int) -> None:
        if self._next >= len(self.specs) or self.specs[self._next].name != name:
            want = self.specs[self._next].name if self._next < len(self.specs) else "<end>"
            raise RuntimeError(f"writer: got {name}, expected {want}")
        if self.specs[self._next].nbytes != nbytes:
            raise RuntimeError(f"writer: {name} has {nbytes} bytes, declared {self.specs[self._next].nbytes}")
        self._next += 1

    # -- the actual I/O runs on a background thread (I/O and torch release the GIL), so that the caller can
    # compute the next layer while earlier tensors are copied and written; at most MAX_QUEUED bytes wait.
    def _start_io(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._room = threading.Condition()
        self._queued = 0  # bytes held by queued items
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._io_loop, name="safetensors-writer", daemon=True)
        self._thread.start()

    def _io_loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            kind, payload, extra = item
            try:
                if self._error is None:
                    if kind == "copy":
                        n = payload.copy_raw(extra, self._f)
                    else:
                        self._f.write(payload)
                        n = len(payload) if kind == "raw" else payload.nbytes
                    if self._progress:
                        self._progress(n)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            finally:
                with self._room:
                    self._queued -= self._held(kind, payload)
                    self._room.notify_all()

    @staticmethod
    def _held(kind: str, payload) -> int:
        return 0 if kind == "copy" else (len(payload) if kind == "raw" else payload.nbytes)

    def _put(self, kind: str, payload, extra=None) -> None:
        if self._error is not None:
            raise self._error
        n = self._held(kind, payload)
        with self._room:  # bounded memory: wait while the queue holds too much (one item always fits)
            while self._queued and self._queued + n > MAX_QUEUED_BYTES and self._error is None:
                self._room.wait()
            self._queued += n
        self._q.put((kind, payload, extra))

    def _drain(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is not None and spec.name == name:
            if DTYPE_NAMES.get(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
                raise RuntimeError(f"writer: {name} is {t.dtype}{tuple(t.shape)}, declared {spec.dtype}{spec.shape}")
        data = tensor_bytes(t)
        self._expect(name, data.nbytes)
        self._put("view", data)

    def copy_tensor(self, name: str, src: Checkpoint) -> None:
        self._expect(name, src.tensors[name].nbytes)
        self._put("copy", src, name)

    def write_raw(self, name: str, data: bytes | bytearray) -> None:
        self._expect(name, len(data))
        self._put("raw", data)

    def finish(self, check: Callable[[str], None] | None = None) -> None:
        """Flush and fsync the complete temp file, then run `check(temp_path)` on it."""
        self._drain()
        if self._next != len(self.specs):
            raise RuntimeError(f"writer: only {self._next} of {len(self.specs)} tensors written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if check is not None:
            check(self.tmp_path)

    def publish(self) -> None:
        """Rename the finished temp file into place (atomic) and make the rename durable."""
        os.replace(self.tmp_path, self.path)
        try:
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def commit(self, check: Callable[[str], None] | None = None) -> None:
        try:
            self.finish(check)
            self.publish()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        try:
            self._drain()
        except BaseException:
            pass
        try:
            self._f.close()
        except Exception:
            pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

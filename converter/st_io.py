"""safetensors I/O without loading whole files.

`Checkpoint` parses only the header and reads one tensor at a time with positioned reads (no mmap, so the
resident set stays at one tensor). `StreamingWriter` writes a header computed up front, then the tensors in
order, into a temp file in the target folder; `commit()` fsyncs and renames it into place, and any failure
removes the temp file, so the output path never holds a partial file.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import queue
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable

if TYPE_CHECKING:
    import torch

from .errors import MergeError

# safetensors dtype name -> element size; the torch dtypes (DTYPES, DTYPE_NAMES) are made on first use, so
# that reading headers and planning need no torch (its import takes seconds, overlapped with the first copies)
DTYPE_SIZES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2,
                               "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2"}


def _torch_dtypes() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """(DTYPES, DTYPE_NAMES), made on first use and then plain module attributes."""
    if "DTYPES" not in globals():
        import torch

        dtypes = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items()}
        globals()["DTYPES"], globals()["DTYPE_NAMES"] = dtypes, {v: k for k, v in dtypes.items()}
    return globals()["DTYPES"], globals()["DTYPE_NAMES"]


def __getattr__(name: str):
    if name in ("DTYPES", "DTYPE_NAMES"):
        return _torch_dtypes()[name == "DTYPE_NAMES"]
    raise AttributeError(name)


COPY_CHUNK = 64 << 20
MAX_HEADER = 100 << 20
MAX_QUEUED_BYTES = 256 << 20  # computed tensors waiting for the writer thread
BLOCK = 4096  # O_DIRECT alignment of file offsets, lengths and memory (512-byte and 4K devices alike)
STAGE_BYTES = 16 << 20  # one direct write
STAGES = 8  # staging buffers: 128 MB
DIRECT_WRITERS = 2  # direct writes in flight (the device queue likes more than one)
IO_THREADS = max(1, min(4, os.cpu_count() or 1))
_kernel_copy = [hasattr(os, "copy_file_range")]  # cleared once the kernel refuses it for these files


_STRUCT = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B", "BOOL": "?"}


def _encode(dtype: str, value: float) -> bytes | None:
    """The one encoding of a value that a float dtype represents exactly (None: not exact, or not floating)."""
    if dtype == "BF16":
        b = struct.pack("<f", value)
        return b[2:] if b[:2] == b"\0\0" else None
    if dtype in ("F64", "F32", "F16"):
        try:
            b = struct.pack("<" + _STRUCT[dtype], value)
        except OverflowError:
            return None
        return b if struct.unpack("<" + _STRUCT[dtype], b)[0] == value and value == value and value != 0 else None
    return None


_SEEK_LOCK = threading.Lock()  # positioned I/O emulated with seek + read/write (systems without pread)


def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    """Read into `view` from file offset `pos` without a shared file position (threads read at once)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], pos)
    with _SEEK_LOCK:  # e.g. Windows
        os.lseek(fd, pos, os.SEEK_SET)
        data = os.read(fd, len(view))
    view[:len(data)] = data
    return len(data)


def _read_exact(fd: int, view: memoryview, pos: int, what: str) -> None:
    """Fill `view` from file offset `pos` (positioned reads may return short)."""
    while view:
        n = _pread_into(fd, view, pos)
        if n <= 0:
            raise MergeError(f"unexpected end of file reading {what}")
        view, pos = view[n:], pos + n


def _pwrite(fd: int, view: memoryview, pos: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, view, pos)
    with _SEEK_LOCK:
        os.lseek(fd, pos, os.SEEK_SET)
        return os.write(fd, view)


def _pwrite_all(fd: int, data, pos: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = _pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int

    @property
    def torch_dtype(self) -> "torch.dtype":
        return _torch_dtypes()[0][self.dtype]

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


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
            if dtype not in DTYPE_SIZES:
                raise MergeError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if b - a != math.prod(shape) * DTYPE_SIZES[dtype] or self.data_start + b > size or a < 0:
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
        _read_exact(self._f.fileno(), memoryview(buf), info.start, f"{self.path}: {name}")
        return buf

    def scalar(self, name: str) -> float:
        """A one-element tensor's value (e.g. a LoRA alpha), decoded without torch."""
        info = self.tensors[name]
        if math.prod(info.shape) != 1:
            raise MergeError(f"{self.path}: {name} is not a scalar")
        raw = bytes(self.read_bytes(name))
        fmt = _STRUCT.get(info.dtype)
        if info.dtype == "BF16":
            return struct.unpack("<f", b"\0\0" + raw)[0]
        if fmt is None:
            return float(self.get(name).float().item())
        return float(struct.unpack("<" + fmt, raw)[0])

    def all_equal(self, name: str, value: float) -> bool:
        """Whether every element equals `value`, compared on the raw bytes where the dtype allows."""
        info = self.tensors[name]
        enc = _encode(info.dtype, value)
        if enc is None:
            return bool((self.get(name).float() == value).all())
        return self.read_bytes(name) == enc * math.prod(info.shape)

    def get(self, name: str) -> torch.Tensor:
        import torch

        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(self.read_bytes(name), dtype=info.torch_dtype).reshape(info.shape)

    def copy_to(self, name: str, out_fd: int, out_pos: int, buf: bytearray | None = None) -> int:
        """Copy a tensor's bytes unchanged into `out_fd` at `out_pos`. In the kernel when it can
        (copy_file_range: no user-space copy, what `cp` does); otherwise through `buf`, reused by the caller
        so that large copies do not fault in fresh pages for every chunk."""
        info = self.tensors[name]
        pos, left, dst = info.start, info.nbytes, out_pos
        fd = self._f.fileno()
        while left and _kernel_copy[0]:
            try:
                n = os.copy_file_range(fd, out_fd, left, pos, dst)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                _kernel_copy[0] = False  # e.g. another filesystem on an old kernel: fall back for good
                break
            if n <= 0:
                raise MergeError(f"{self.path}: unexpected end of file reading {name}")
            pos, dst, left = pos + n, dst + n, left - n
        view = memoryview(buf if buf is not None else bytearray(min(left, COPY_CHUNK)))
        while left:
            k = min(left, len(view))
            _read_exact(fd, view[:k], pos, f"{self.path}: {name}")
            _pwrite_all(out_fd, view[:k], dst)
            pos, dst, left = pos + k, dst + k, left - k
        return info.nbytes

    def fileno(self) -> int:
        return self._f.fileno()

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
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _DirectStager:
    """The output's byte stream, packed in order into page-aligned staging buffers that writer threads
    write with O_DIRECT: the data skips the page cache. Buffered writes cost a kernel copy plus write-back
    per byte and their dirty pages evict the base being read; on a 2-core VM, O_DIRECT wrote a 12.7 GB
    file at 1.6 GB/s where `cp` managed 0.7-1.1 GB/s. Bounded memory: `count` buffers of `size` bytes.
    If the filesystem accepts the open but refuses such writes (EINVAL), everything goes through the
    ordinary descriptor instead, from the failed write on."""

    def __init__(self, direct_fd: int, fd: int):
        size, count, writers = STAGE_BYTES, STAGES, DIRECT_WRITERS
        self.direct_fd, self.fd, self.size = direct_fd, fd, size
        self.direct_ok = True
        self.error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(mmap.mmap(-1, size))
        self._full: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._write_loop, name=f"direct-writer-{i}", daemon=True)
                         for i in range(writers)]
        for t in self._threads:
            t.start()
        self._buf = self._free.get()
        self._start = 0  # file offset of the current buffer
        self._fill = 0

    def _room(self) -> memoryview:
        if self._fill == self.size:
            self._full.put((self._buf, self._start, self.size))
            self._buf = self._free.get()
            self._start += self.size
            self._fill = 0
        return memoryview(self._buf)[self._fill:]

    def add_bytes(self, data) -> None:
        data = memoryview(data).cast("B")
        while data:
            room = self._room()
            n = min(len(room), len(data))
            room[:n] = data[:n]
            self._fill += n
            data = data[n:]

    def add_from_file(self, fd: int, pos: int, n: int, what: str) -> None:
        while n:
            room = self._room()
            k = min(len(room), n)
            _read_exact(fd, room[:k], pos, what)
            self._fill += k
            pos += k
            n -= k

    def close(self) -> None:
        """Write the last, partial buffer (padded to a block: the caller truncates) and stop the writers."""
        if self._fill:
            self._full.put((self._buf, self._start, -(-self._fill // BLOCK) * BLOCK))
            self._fill = 0
        for _ in self._threads:
            self._full.put(None)
        for t in self._threads:
            t.join()

    def _write_loop(self) -> None:
        while (item := self._full.get()) is not None:
            buf, start, n = item
            try:
                if self.error is None:
                    self._write(memoryview(buf)[:n], start)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.error = self.error or e
            finally:
                self._free.put(buf)

    def _write(self, view: memoryview, start: int) -> None:
        if self.direct_ok:
            try:
                _pwrite_all(self.direct_fd, view, start)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct_ok = False
        _pwrite_all(self.fd, view, start)


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file, as cp does


def _open_direct(path: str) -> int:
    """A second, O_DIRECT descriptor on `path`, or -1 where there is none (other systems, tmpfs, or
    QWENLORA_MERGE_DIRECT_IO=0)."""
    if not hasattr(os, "O_DIRECT") or os.environ.get("QWENLORA_MERGE_DIRECT_IO", "1") == "0":
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return -1


class StreamingWriter:
    """Writes tensors in a fixed, pre-declared order into a temp file beside `path`; the header comes from
    the specs. Computing and writing overlap: the caller hands over tensors (or names of base tensors to
    copy) and background threads do the I/O, holding at most MAX_QUEUED_BYTES of handed-over tensors.

    Two ways to the disk: O_DIRECT through staging buffers (_DirectStager) where the filesystem allows it,
    otherwise ordinary writes and in-kernel copies (copy_file_range) on IO_THREADS threads, each tensor at
    its own offset. `direct=False` forces the second."""

    def __init__(self, path: str | os.PathLike, specs: Iterable[OutSpec], metadata: dict[str, str],
                 progress: Callable[[int], None] | None = None, direct: bool = True):
        self.path = os.fspath(path)
        self.specs = list(specs)
        self._next = 0
        self._progress = progress
        raw = self._header_bytes(metadata)
        self._header_len = len(raw)
        self._offsets = []  # absolute file offset of each tensor, fixed by the header
        pos = 8 + len(raw)
        for sp in self.specs:
            self._offsets.append(pos)
            pos += sp.nbytes
        self.total = pos
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".partial", dir=folder)
        self._fd = fd
        os.chmod(self.tmp_path, _FILE_MODE)  # mkstemp makes 0600; the merged file is an ordinary, shareable one
        self._direct_fd = _open_direct(self.tmp_path) if direct else -1
        self._stager: _DirectStager | None = None
        try:
            head = struct.pack("<Q", len(raw)) + raw
            if self._direct_fd >= 0:
                self._stager = _DirectStager(self._direct_fd, fd)
                self._stager.add_bytes(head)
            else:
                _pwrite_all(fd, head, 0)
        except BaseException:
            self._close_fds()
            os.unlink(self.tmp_path)
            raise
        self._start_io()

    @property
    def direct(self) -> bool:
        """Whether the data went (so far) through O_DIRECT."""
        return self._stager is not None and self._stager.direct_ok

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
        placeholder of the same width while the tensors streamed). Ends the writing."""
        self._drain()
        raw = self._header_bytes(metadata)
        if len(raw) != self._header_len:
            raise RuntimeError("patched metadata changes the header length")
        _pwrite_all(self._fd, raw, 8)  # through the page cache, after every direct write has completed

    def _expect(self, name: str, nbytes: int) -> int:
        """Check the next declared tensor; returns its file offset."""
        if self._next >= len(self.specs) or self.specs[self._next].name != name:
            want = self.specs[self._next].name if self._next < len(self.specs) else "<end>"
            raise RuntimeError(f"writer: got {name}, expected {want}")
        if self.specs[self._next].nbytes != nbytes:
            raise RuntimeError(f"writer: {name} has {nbytes} bytes, declared {self.specs[self._next].nbytes}")
        self._next += 1
        return self._offsets[self._next - 1]

    # -- background I/O (I/O, hashing and torch release the GIL) ------------------------------------------
    def _start_io(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._room = threading.Condition()
        self._queued = 0  # bytes held by queued items
        self._error: BaseException | None = None
        self._drained = False
        # direct: one thread packs the stream in order (the stager's threads write); otherwise every tensor
        # has its own offset, so several threads copy at once (a kernel copy is CPU work: one thread alone
        # is the bottleneck of a merge, as it is of cp)
        n = 1 if self._stager is not None else IO_THREADS
        self._threads = [threading.Thread(target=self._io_loop, name=f"safetensors-writer-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _io_loop(self) -> None:
        buf: bytearray | None = None  # this thread's copy buffer, when the kernel cannot copy
        st = self._stager
        while (item := self._q.get()) is not None:
            kind, payload, extra, pos = item
            try:
                if self._error is None:
                    if kind == "copy":
                        info = payload.tensors[extra]
                        if st is not None:
                            st.add_from_file(payload.fileno(), info.start, info.nbytes, f"{payload.path}: {extra}")
                        else:
                            if not _kernel_copy[0] and buf is None:
                                buf = bytearray(COPY_CHUNK)
                            payload.copy_to(extra, self._fd, pos, buf)
                        n = info.nbytes
                    else:
                        if st is not None:
                            st.add_bytes(payload)
                        else:
                            _pwrite_all(self._fd, payload, pos)
                        n = payload.nbytes
                    if st is not None and st.error is not None:
                        raise st.error
                    if self._progress:
                        with self._room:
                            self._progress(n)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = self._error or e
            finally:
                with self._room:
                    self._queued -= self._held(kind, payload)
                    self._room.notify_all()

    @staticmethod
    def _held(kind: str, payload) -> int:
        return 0 if kind == "copy" else payload.nbytes

    def _put(self, kind: str, payload, extra, pos: int) -> None:
        if self._error is not None:
            raise self._error
        if self._drained:
            raise RuntimeError("writer: the writing has ended")
        n = self._held(kind, payload)
        with self._room:  # bounded memory: wait while the queue holds too much (one item always fits)
            while self._queued and self._queued + n > MAX_QUEUED_BYTES and self._error is None:
                self._room.wait()
            self._queued += n
        self._q.put((kind, payload, extra, pos))

    def _drain(self) -> None:
        """Wait for every handed-over write to land (after this the writer takes no more tensors)."""
        if not self._drained:
            self._drained = True
            for _ in self._threads:
                self._q.put(None)
            for t in self._threads:
                t.join()
            if self._stager is not None:
                self._stager.close()
                self._error = self._error or self._stager.error
                if self._error is None:
                    os.ftruncate(self._fd, self.total)  # the last direct block was padded
        if self._error is not None:
            raise self._error

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is not None and spec.name == name:
            if _torch_dtypes()[1].get(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
                raise RuntimeError(f"writer: {name} is {t.dtype}{tuple(t.shape)}, declared {spec.dtype}{spec.shape}")
        data = tensor_bytes(t)
        self._put("view", data, None, self._expect(name, data.nbytes))

    def copy_tensor(self, name: str, src: Checkpoint) -> None:
        self._put("copy", src, name, self._expect(name, src.tensors[name].nbytes))

    def finish(self, check: Callable[[str], None] | None = None) -> None:
        """Complete and fsync the temp file, then run `check(temp_path)` on it."""
        self._drain()
        if self._next != len(self.specs):
            raise RuntimeError(f"writer: only {self._next} of {len(self.specs)} tensors written")
        os.fsync(self._fd)
        self._close_fds()
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

    def _close_fds(self) -> None:
        for attr in ("_fd", "_direct_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        if self._stager is not None:
            self._stager.error = self._stager.error or self._error  # writers skip what is left
        try:
            self._drain()
        except BaseException:
            pass
        self._close_fds()
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

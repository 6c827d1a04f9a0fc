"""safetensors writing, streamed: a header computed up front, then the tensors in a declared order, into a
temp file beside the target; `commit()` fsyncs and renames it into place, and any failure removes the temp
file, so the output path never holds a partial file.

Two ways to the disk: O_DIRECT through page-aligned staging buffers (`_DirectStager`) where the filesystem
allows it, otherwise ordinary writes and in-kernel copies (copy_file_range) on several threads, each tensor
at its own offset.
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
from dataclasses import replace as with_fields
from typing import TYPE_CHECKING, Callable, Iterable, Union

from . import dtypes, tempfiles
from .errors import MergeError
from .posio import pwrite_all as _pwrite_all
from .st_reader import Checkpoint, TensorInfo
from .tempfiles import lock_temp, own_temp_prefix, remove_stale_temps

if TYPE_CHECKING:
    import torch

COPY_CHUNK = 64 << 20
MAX_QUEUED_BYTES = 256 << 20  # computed tensors waiting for the writer thread
BLOCK = 4096  # O_DIRECT alignment of file offsets, lengths and memory (512-byte and 4K devices alike)
STAGE_BYTES = 16 << 20  # one direct write
STAGES = 8  # staging buffers: 128 MB
DIRECT_WRITERS = 2  # direct writes in flight (the device queue likes more than one)
IO_THREADS = max(1, min(4, os.cpu_count() or 1))
_kernel_copy = [hasattr(os, "copy_file_range")]  # cleared once the kernel refuses it for these files


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return dtypes.SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# -- write requests handed to the I/O threads ---------------------------------------------------------------
@dataclass(frozen=True)
class _CopyRequest:
    """A base tensor copied byte for byte to file offset `pos`."""

    src: Checkpoint
    info: TensorInfo
    pos: int
    held: int = 0  # bytes of memory the request holds while queued

    @property
    def nbytes(self) -> int:
        return self.info.nbytes


@dataclass(frozen=True)
class _BytesRequest:
    """Computed bytes written to file offset `pos`."""

    data: memoryview
    pos: int

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def held(self) -> int:
        return self.data.nbytes


_Request = Union[_CopyRequest, _BytesRequest]


def _copy_range(src: Checkpoint, info: TensorInfo, out_fd: int, dst: int, buf: bytearray | None) -> None:
    """A tensor's bytes unchanged into `out_fd` at `dst`. In the kernel when it can (copy_file_range: no
    user-space copy, what `cp` does); otherwise through `buf`, reused by the caller so that large copies do not
    fault in fresh pages for every chunk."""
    pos, left = info.start, info.nbytes
    fd = src.fileno()
    while left and _kernel_copy[0]:
        try:
            n = os.copy_file_range(fd, out_fd, left, pos, dst)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            _kernel_copy[0] = False  # e.g. another filesystem on an old kernel: fall back for good
            break
        if n <= 0:
            raise MergeError(f"{src.path}: unexpected end of file reading {info.name}")
        pos, dst, left = pos + n, dst + n, left - n
    view = memoryview(buf if buf is not None else bytearray(min(left, COPY_CHUNK)))
    while left:
        k = min(left, len(view))
        src.read_into(view[:k], pos, info.name)
        _pwrite_all(out_fd, view[:k], dst)
        pos, dst, left = pos + k, dst + k, left - k


class _DirectStager:
    """The output's byte stream, packed in order into page-aligned staging buffers that writer threads
    write with O_DIRECT: the data skips the page cache. Buffered writes cost a kernel copy plus write-back
    per byte and their dirty pages evict the base being read; on a 2-core VM, O_DIRECT wrote a 12.7 GB
    file at 1.6 GB/s where `cp` managed 0.7-1.1 GB/s. Bounded memory: STAGES buffers of STAGE_BYTES.
    If the filesystem accepts the open but refuses such writes (EINVAL), everything goes through the
    ordinary descriptor instead, from the failed write on."""

    def __init__(self, direct_fd: int, fd: int):
        self.direct_fd, self.fd, self.size = direct_fd, fd, STAGE_BYTES
        self.direct_ok = True
        self.error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        for _ in range(STAGES):
            self._free.put(mmap.mmap(-1, self.size))
        self._full: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._write_loop, name=f"direct-writer-{i}", daemon=True)
                         for i in range(DIRECT_WRITERS)]
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

    def add_from_file(self, src: Checkpoint, info: TensorInfo) -> None:
        pos, n = info.start, info.nbytes
        while n:
            room = self._room()
            k = min(len(room), n)
            src.read_into(room[:k], pos, info.name)
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


def _open_direct(path: str) -> int:
    """A second, O_DIRECT descriptor on `path`, or -1 where there is none (other systems, tmpfs, or
    QWENLORA_MERGE_DIRECT_IO=0)."""
    if not hasattr(os, "O_DIRECT") or os.environ.get("QWENLORA_MERGE_DIRECT_IO", "1") == "0":
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return -1


def write_error(path: str, e: OSError) -> MergeError:
    """An OSError of the output's I/O as one line naming the output and the cause."""
    hint = {errno.EFBIG: " (the file-size limit, ulimit -f, was reached)", errno.ENOSPC: " (the disk is full)",
            errno.EDQUOT: " (the disk quota is full)"}.get(e.errno, "")
    return MergeError(f"cannot write {path}: {e.strerror or e}{hint}; nothing was written")


def header_bytes(specs: list[OutSpec], metadata: dict[str, str]) -> bytes:
    """The JSON header of a file holding `specs` in this order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


class StreamingWriter:
    """Writes tensors in a fixed, pre-declared order into a temp file beside `path`; the header comes from
    the specs. Computing and writing overlap: the caller hands over tensors (or names of base tensors to
    copy) and background threads do the I/O, holding at most MAX_QUEUED_BYTES of handed-over tensors.
    `direct=False` forces the buffered path."""

    def __init__(self, path: str | os.PathLike, specs: Iterable[OutSpec], metadata: dict[str, str],
                 progress: Callable[[int], None] | None = None, direct: bool = True):
        self.path = os.fspath(path)
        self.specs = list(specs)
        self._next = 0
        self._progress = progress
        raw = header_bytes(self.specs, metadata)
        self._header_len = len(raw)
        self._offsets = []  # absolute file offset of each tensor, fixed by the header
        pos = 8 + len(raw)
        for sp in self.specs:
            self._offsets.append(pos)
            pos += sp.nbytes
        self.total = pos
        folder = os.path.dirname(os.path.abspath(self.path))
        remove_stale_temps(self.path)
        try:
            fd, self.tmp_path = tempfile.mkstemp(prefix=own_temp_prefix(self.path), suffix=".partial",
                                                 dir=folder)
            os.chmod(self.tmp_path, tempfiles.FILE_MODE)  # mkstemp makes 0600; the merged file is an ordinary, shareable one
            lock_temp(fd)
        except OSError as e:
            raise write_error(self.path, e) from None
        self._fd = fd
        self._direct_fd = _open_direct(self.tmp_path) if direct else -1
        self._stager: _DirectStager | None = None
        try:
            head = struct.pack("<Q", len(raw)) + raw
            if self._direct_fd >= 0:
                self._stager = _DirectStager(self._direct_fd, fd)
                self._stager.add_bytes(head)
            else:
                _pwrite_all(fd, head, 0)
        except BaseException as e:
            self._close_fds()
            os.unlink(self.tmp_path)
            raise write_error(self.path, e) if isinstance(e, OSError) else e
        self._start_io()

    @property
    def direct(self) -> bool:
        """Whether the data went (so far) through O_DIRECT."""
        return self._stager is not None and self._stager.direct_ok

    def patch_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header with new metadata of the same encoded length (e.g. a hash that was a
        placeholder of the same width while the tensors streamed). Ends the writing."""
        self._drain()
        raw = header_bytes(self.specs, metadata)
        if len(raw) != self._header_len:
            raise RuntimeError("patched metadata changes the header length")
        self._os(_pwrite_all, self._fd, raw, 8)  # through the page cache, after every direct write has completed

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
        self._q: queue.Queue[_Request | None] = queue.Queue()
        self._room = threading.Condition()
        self._queued = 0  # bytes held by queued requests
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

    def _perform(self, req: _Request, buf: bytearray | None) -> None:
        st = self._stager
        if isinstance(req, _CopyRequest):
            if st is not None:
                st.add_from_file(req.src, req.info)
            else:
                _copy_range(req.src, req.info, self._fd, req.pos, buf)
        elif st is not None:
            st.add_bytes(req.data)
        else:
            _pwrite_all(self._fd, req.data, req.pos)
        if st is not None and st.error is not None:
            raise st.error

    def _io_loop(self) -> None:
        buf: bytearray | None = None  # this thread's copy buffer, when the kernel cannot copy
        while (req := self._q.get()) is not None:
            try:
                if self._error is None:
                    if buf is None and isinstance(req, _CopyRequest) and not _kernel_copy[0] and self._stager is None:
                        buf = bytearray(COPY_CHUNK)
                    self._perform(req, buf)
                    if self._progress:
                        with self._room:
                            self._progress(req.nbytes)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = self._error or (write_error(self.path, e) if isinstance(e, OSError) else e)
            finally:
                with self._room:
                    self._queued -= req.held
                    self._room.notify_all()

    def _put(self, req: _Request) -> None:
        if self._error is not None:
            raise self._error
        if self._drained:
            raise RuntimeError("writer: the writing has ended")
        with self._room:  # bounded memory: wait while the queue holds too much (one request always fits)
            while self._queued and self._queued + req.held > MAX_QUEUED_BYTES and self._error is None:
                self._room.wait()
            self._queued += req.held
        self._q.put(req)

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
                err = self._stager.error
                self._error = self._error or (write_error(self.path, err) if isinstance(err, OSError) else err)
                if self._error is None:
                    self._os(os.ftruncate, self._fd, self.total)  # the last direct block was padded
        if self._error is not None:
            raise self._error

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is not None and spec.name == name:
            if dtypes.dtype_name(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
                raise RuntimeError(f"writer: {name} is {t.dtype}{tuple(t.shape)}, declared {spec.dtype}{spec.shape}")
        data = tensor_bytes(t)
        self._put(_BytesRequest(data, self._expect(name, data.nbytes)))

    def copy_tensor(self, name: str, src: Checkpoint, src_name: str | None = None,
                    byte_range: tuple[int, int] | None = None) -> None:
        """Tensor `name` of the output is `src_name` (default: the same name) of `src`, byte for byte, or bytes
        [start, stop) of it."""
        info = src.tensors[src_name or name]
        if byte_range is not None:
            start, stop = byte_range
            if not 0 <= start <= stop <= info.nbytes:
                raise RuntimeError(f"writer: bytes {start}:{stop} of {info.name}, which has {info.nbytes}")
            info = with_fields(info, start=info.start + start, nbytes=stop - start)
        self._put(_CopyRequest(src, info, self._expect(name, info.nbytes)))

    def finish(self, check: Callable[[str], None] | None = None) -> None:
        """Complete and fsync the temp file, then run `check(temp_path)` on it."""
        self._drain()
        if self._next != len(self.specs):
            raise RuntimeError(f"writer: only {self._next} of {len(self.specs)} tensors written")
        self._os(os.fsync, self._fd)
        self._close_fds()
        if check is not None:
            check(self.tmp_path)

    def _os(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise write_error(self.path, e) from None

    def publish(self, replace: bool = True) -> None:
        """Move the finished temp file into place, atomically, and make it durable. replace=False: only if the
        path is still free (another process may have created it since the start): a hard link fails if it exists."""
        if replace:
            self._os(os.replace, self.tmp_path, self.path)
        else:
            self._link_into_place()
        try:
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def _link_into_place(self) -> None:
        try:
            os.link(self.tmp_path, self.path)
        except FileExistsError:
            raise MergeError(f"{self.path} appeared while this merge was running (another merge?); it was left as "
                             "it is and nothing was written") from None
        except OSError:  # no hard links on this filesystem: check, then rename (a window, but a small one)
            if os.path.lexists(self.path):
                raise MergeError(f"{self.path} appeared while this merge was running (another merge?); "
                                 "nothing was written") from None
            self._os(os.replace, self.tmp_path, self.path)
            return
        os.unlink(self.tmp_path)

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

"""Positioned file I/O shared by the safetensors reader and writer: several threads read and write one
descriptor at once without a shared file position. Systems without pread/pwrite (Windows) get seek +
read/write under one lock: slower, same bytes."""

from __future__ import annotations

import os
import threading

from .errors import MergeError

_SEEK_LOCK = threading.Lock()


def pread_into(fd: int, view: memoryview, pos: int) -> int:
    """Read into `view` from file offset `pos`; returns the count (may be short)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], pos)
    with _SEEK_LOCK:
        os.lseek(fd, pos, os.SEEK_SET)
        data = os.read(fd, len(view))
    view[:len(data)] = data
    return len(data)


def read_exact(fd: int, view: memoryview, pos: int, what: str) -> None:
    """Fill `view` from file offset `pos` (positioned reads may return short)."""
    while view:
        n = pread_into(fd, view, pos)
        if n <= 0:
            raise MergeError(f"unexpected end of file reading {what}")
        view, pos = view[n:], pos + n


def pwrite(fd: int, view: memoryview, pos: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, view, pos)
    with _SEEK_LOCK:
        os.lseek(fd, pos, os.SEEK_SET)
        return os.write(fd, view)


def pwrite_all(fd: int, data, pos: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = pwrite(fd, view, pos)
        view, pos = view[n:], pos + n

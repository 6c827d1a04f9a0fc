"""Termination signals during a merge or an export (SIGINT, SIGTERM, SIGHUP: Ctrl-C, `timeout`, batch
schedulers, a closed terminal).

The handler does not raise: an exception raised at an arbitrary bytecode (right after a temp file was made but
before its writer is held, or inside a lock the writer threads share) can leave a temp file behind or deadlock.
It deletes this process's temp files by their pid-tagged names (st_writer.own_temp_prefix), writes one line
and exits: 130 for SIGINT, 128 + the signal's number otherwise. Inside `deferred()` (moving finished outputs
into place) a signal waits for the section to end, so that an output is never left half-renamed; it then exits
saying the outputs were written.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Iterator

EXIT_INTERRUPTED = 130
_state = {"depth": 0, "pending": None}


def _exit(signum: int, what: str) -> None:
    from .st_writer import remove_own_temps

    for sig in _signals():
        signal.signal(sig, signal.SIG_IGN)
    remove_own_temps()
    name = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    os.write(2, f"error: {name}; {what}\n".encode())
    os._exit(EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum)


def _handler(signum: int, frame) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    _exit(signum, "nothing was written")


def _signals() -> list[int]:
    return [s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None]


@contextmanager
def handled() -> Iterator[None]:
    """Install the handler for the duration (in the main thread only; elsewhere signals are left alone)."""
    saved = {}
    for sig in _signals():
        try:
            saved[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@contextmanager
def deferred() -> Iterator[None]:
    """A section a signal must not cut (renames that publish outputs): it takes effect when the section ends."""
    _state["depth"] += 1
    done = False
    try:
        yield
        done = True
    finally:
        _state["depth"] -= 1
        pending = _state["pending"] if not _state["depth"] else None
        if pending is not None:
            _state["pending"] = None
            _exit(pending, "it came while the outputs were moved into place, which completed" if done
                  else "nothing was written")

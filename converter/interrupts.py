"""Termination signals during a merge or an export (SIGINT, SIGTERM, SIGHUP: Ctrl-C, `timeout`, batch
schedulers, a closed terminal).

The handler does not raise: an exception raised at an arbitrary bytecode (right after a temp file was made but
before its writer is held, or inside a lock the writer threads share) can leave a temp file behind or deadlock.
Nor does it import anything: a signal can land in the middle of an import, and importing from a half-initialised
module fails. It runs the cleanups registered with `add_cleanup` (`tempfiles` registers the removal of this
process's pid-tagged temp files when it is imported; before that no temp file can exist), writes one line and
exits: 130 for SIGINT, 128 + the signal's number otherwise. The console script installs it (`install`) before it
imports anything else of the tool, so a signal at any moment after the interpreter started running the tool ends
the same way. Inside `deferred()` (moving finished outputs
into place) a signal waits for the section to end, so that an output is never left half-renamed; it then exits
saying the outputs were written.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Callable, Iterator

EXIT_INTERRUPTED = 130
_state = {"depth": 0, "pending": None, "published": False}
AFTER_PUBLISH = "the outputs had been written and are complete"
_cleanups: list[Callable[[], None]] = []


def add_cleanup(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` (it must not raise, lock or import) before the process exits on a signal."""
    if cleanup not in _cleanups:
        _cleanups.append(cleanup)


def _exit(signum: int, what: str) -> None:
    for sig in _signals():
        signal.signal(sig, signal.SIG_IGN)
    for cleanup in list(_cleanups):
        try:
            cleanup()
        except BaseException:  # noqa: BLE001 - exiting anyway; a failed cleanup must not turn into a traceback
            pass
    name = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    os.write(2, f"error: {name}; {what}\n".encode())
    os._exit(EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum)


def _handler(signum: int, frame) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    _exit(signum, AFTER_PUBLISH if _state["published"] else "nothing was written")


def _signals() -> list[int]:
    return [s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None]


def install() -> None:
    """Install the handler for the rest of the process (the console script's first step)."""
    for sig in _signals():
        signal.signal(sig, _handler)


def ignore_at_exit() -> None:
    """The process is done (its exit code is decided): ignore the signals from now on. The interpreter's shutdown
    puts the default action back for every signal that has a Python handler, and a signal then (delivered to any
    thread still alive, so blocking it in the main thread alone would not do) would kill a finished run with a
    signal status; an ignored signal is left ignored."""
    for sig in _signals():
        signal.signal(sig, signal.SIG_IGN)


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
        _state["published"] = True
    finally:
        _state["depth"] -= 1
        pending = _state["pending"] if not _state["depth"] else None
        if pending is not None:
            _state["pending"] = None
            _exit(pending, "it came while the outputs were moved into place, which completed" if done
                  else "nothing was written")

"""The signal handler in its states, each in a child interpreter: the message must say what is on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_signal_before_publish_says_nothing_written(sig, code):
    r = _child(f"import os, signal\nfrom converter import interrupts\ninterrupts.install()\n"
               f"os.kill(os.getpid(), signal.{sig})\nimport time; time.sleep(5)\n")
    assert r.returncode == code
    assert r.stderr.strip().endswith("nothing was written") and r.stderr.count("\n") == 1, r.stderr


def test_signal_after_publish_says_outputs_complete():
    r = _child("import os, signal\nfrom converter import interrupts\ninterrupts.install()\n"
               "with interrupts.deferred():\n    pass\n"
               "os.kill(os.getpid(), signal.SIGTERM)\nimport time; time.sleep(5)\n")
    assert r.returncode == 143
    assert "outputs had been written and are complete" in r.stderr and "nothing was written" not in r.stderr


def test_signal_inside_publish_waits_for_it():
    r = _child("import os, signal, sys\nfrom converter import interrupts\ninterrupts.install()\n"
               "with interrupts.deferred():\n    os.kill(os.getpid(), signal.SIGINT)\n    print('renamed', flush=True)\n"
               "import time; time.sleep(5)\n")
    assert r.returncode == 130 and r.stdout == "renamed\n"
    assert "which completed" in r.stderr


def test_handler_imports_nothing():
    """A signal during an import must not make the handler import (a half-initialised module fails): the cleanups
    are registered callables, and the writer's temp-file module registers its removal when imported."""
    r = _child("import sys\nfrom converter import interrupts\nbefore = set(sys.modules)\n"
               "import converter.st_writer\nimport converter.tempfiles as t\nassert t.remove_own_temps in interrupts._cleanups\n"
               "import inspect\nsrc = inspect.getsource(interrupts._exit) + inspect.getsource(interrupts._handler)\n"
               "assert 'import' not in src, src\n")
    assert r.returncode == 0, r.stderr


def test_finished_run_is_not_killed_at_shutdown():
    """After the exit code is decided the signals are ignored process-wide: one arriving during interpreter shutdown
    (which puts the default actions back for signals with a Python handler), delivered to whichever thread is still
    alive, cannot turn a finished run into a death by signal."""
    r = _child("import os, signal, threading, time, atexit\nfrom converter import interrupts\ninterrupts.install()\n"
               "def late():\n    time.sleep(0.2)\n    for _ in range(50):\n"
               "        os.kill(os.getpid(), signal.SIGINT); time.sleep(0.005)\n"
               "threading.Thread(target=late, daemon=True).start()\n"
               "atexit.register(time.sleep, 0.6)\n"
               "interrupts.ignore_at_exit()\n"
               "assert all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM, "
               "signal.SIGHUP))\nraise SystemExit(0)\n")
    assert r.returncode == 0, (r.returncode, r.stderr)

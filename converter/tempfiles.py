"""The temp files (and folders) an output is written into before it is renamed into place: their names
(`.<name>.<pid>.<random>.partial` beside the target: hidden, and telling whose), their locks, the removal of
this process's on a signal (registered with `interrupts` when this module is imported, before any temp file
can exist) and of those that dead processes left behind."""

from __future__ import annotations

import os
import shutil

from . import interrupts


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


UMASK = _umask()
FILE_MODE = 0o666 & ~UMASK  # what open() would give a new file, as cp does


def temp_prefix(path: str) -> str:
    """Temp files of `path` are `.<name>.<pid>.<random>.partial` in its folder: hidden, and telling whose."""
    return "." + os.path.basename(path) + "."


_OWN_TEMPS: set[tuple[str, str]] = set()  # (folder, ".<name>.<pid>.") of this process's temps, registered first


def own_temp_prefix(path: str) -> str:
    """The prefix of this process's temp files (or folders) for `path`, registered so that a signal handler can
    find them at any moment, even between mkstemp() and the caller holding the writer."""
    prefix = temp_prefix(path) + f"{os.getpid()}."
    _OWN_TEMPS.add((os.path.dirname(os.path.abspath(path)), prefix))
    return prefix


def remove_own_temps() -> None:
    """Delete this process's temp files and folders (from a signal handler: no locks, no writer state)."""
    for folder, prefix in list(_OWN_TEMPS):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(prefix) and e.name.endswith(".partial"):
                try:
                    shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
                except OSError:
                    pass


interrupts.add_cleanup(remove_own_temps)


def remove_stale_temps(path: str) -> list[str]:
    """Remove temp files (or folders) of `path` left by processes that no longer run (a merge killed with
    SIGKILL, a power cut): nothing else can. Best effort; a live process's temp file is never touched."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix, removed = temp_prefix(path), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) and name.endswith(".partial") else ""
        stale = os.path.join(folder, name)
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and not lock_held(stale):
            try:
                shutil.rmtree(stale) if os.path.isdir(stale) and not os.path.islink(stale) else os.unlink(stale)
                removed.append(name)
            except OSError:
                pass
    return removed


def lock_temp(fd: int) -> None:
    """Hold an advisory lock on a temp file (or folder) for as long as `fd` is open: it dies with the process,
    SIGKILL included, and unlike a pid it also tells across pid namespaces and hosts that share a folder."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):
        pass  # no flock here (Windows, some network filesystems): the pid check alone decides


def lock_held(path: str) -> bool:
    """Whether some process holds the lock of `lock_temp` on `path` (unknown: False)."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops our own probe lock


def pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no signal-0 probe (os.kill would terminate the process on Windows): leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or no way to tell: leave its file alone
    return True

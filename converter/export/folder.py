"""The export's folder: the shard layout diffusers reads (one `diffusion_pytorch_model.safetensors`, or numbered
shards and `diffusion_pytorch_model.safetensors.index.json`) and the atomic folder it is written into (a hidden
temp folder beside the target, fsynced, renamed into place: the target appears complete or not at all)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

from .. import interrupts
from ..engine import OutTensor
from ..errors import ExportError
from ..tempfiles import UMASK, lock_temp, own_temp_prefix, remove_stale_temps

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers utils/constants.py
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"
SHARD_METADATA = {"format": "pt"}  # what diffusers' own save_pretrained writes
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal units as huggingface_hub's, KiB/MiB/GiB binary; a bare number is bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ExportError(f"--max-shard-size wants a size such as 500MB or 10GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


@dataclass
class Shard:
    file: str
    tensors: list[OutTensor]  # in the order written (aligned, see aligned_order)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def aligned_order(tensors: list[OutTensor]) -> list[OutTensor]:
    """Keep every tensor at an offset that is a multiple of its element size (as safetensors writes them;
    zero-copy loaders need it): tensors whose size is a multiple of 8 keep their order, the few others (e.g. a
    2-byte wtscale) go to the end of the shard, largest element first."""
    even = [t for t in tensors if t.nbytes % 8 == 0]
    ragged = sorted((t for t in tensors if t.nbytes % 8), key=lambda t: -t.itemsize)
    return even + ragged


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[Shard]:
    """Cut the output order into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    names = [WEIGHTS_NAME] if n == 1 else [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
                                           for i in range(1, n + 1)]
    return [Shard(f, aligned_order(g)) for f, g in zip(names, groups)]


def index_json(shards: list[Shard]) -> dict | None:
    """diffusers' sharded-checkpoint index (None for a single file): "metadata" is required, shard names are
    plain file names in the folder."""
    if len(shards) == 1:
        return None
    return {"metadata": {"total_size": sum(s.nbytes for s in shards)},
            "weight_map": {t.name: s.file for s in shards for t in s.tensors}}


def check_target(out_dir: str, inputs: list[str], overwrite: bool) -> str:
    """The absolute target folder, after the refusals that protect the inputs."""
    target = os.path.abspath(out_dir)
    real = os.path.realpath(target)
    for p in inputs:
        rp = os.path.realpath(p)
        if rp == real or rp.startswith(real.rstrip(os.sep) + os.sep):
            raise ExportError(f"the output folder {out_dir} is or contains the input {p}; refusing to replace it")
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise ExportError(f"{out_dir} exists and is not a folder; refusing to replace it")
        if not overwrite:
            raise ExportError(f"{out_dir} exists; pass --overwrite to replace it")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ExportError(f"output parent folder {parent} does not exist")
    return target


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders
    finally:
        os.close(fd)


class AtomicFolder:
    """Files written under `tmp`, a hidden folder beside `target`, become `target` at commit(), at once; abort()
    (any failure, an interrupt) removes them. With overwrite, an existing target is moved aside first and
    deleted only after the new folder is in place."""

    def __init__(self, target: str):
        self.target = target
        parent, name = os.path.split(target)
        remove_stale_temps(target)
        self.tmp: str | None = tempfile.mkdtemp(prefix=own_temp_prefix(target), suffix=".partial", dir=parent)
        os.chmod(self.tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700; the export is an ordinary folder
        self._lock = os.open(self.tmp, os.O_RDONLY)  # held while we write: others' stale sweeps leave it alone
        lock_temp(self._lock)

    def _unlock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def write_json(self, name: str, data: dict) -> None:
        with open(self.path(name), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def commit(self, overwrite: bool) -> None:
        _fsync_path(self.tmp)
        with interrupts.deferred():  # a signal between the two renames would leave no target at all
            old = self._swap_into_place(overwrite)
        self._unlock()
        _fsync_path(os.path.dirname(self.target))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _swap_into_place(self, overwrite: bool) -> str | None:
        """Rename the temp folder to the target (an existing target first set aside); returns what was set aside."""
        old = None
        if os.path.lexists(self.target):
            if not overwrite:  # appeared while we were writing
                raise ExportError(f"{self.target} exists; pass --overwrite to replace it")
            old = self.tmp[: -len(".partial")] + ".old"
            os.rename(self.target, old)
        try:
            os.rename(self.tmp, self.target)  # fails if another process made a non-empty target meanwhile
        except BaseException as e:
            if old is not None:
                os.rename(old, self.target)
            if isinstance(e, OSError) and os.path.lexists(self.target):
                raise ExportError(f"{self.target} appeared while this export was running (another export?); it "
                                  "was left as it is and nothing was written") from None
            raise
        self.tmp = None
        return old

    def abort(self) -> None:
        self._unlock()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

"""read header -> detect family -> parse LoRAs -> plan -> stream and transform tensors -> write -> verify."""

from __future__ import annotations

import gc
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from . import __version__
from .errors import MergeError
from .lora import LoraFile, open_lora
from .model import Model, load_model
from .planner import Plan, build_plan, updated_metadata
from .st_io import Checkpoint, OutSpec, StreamingWriter

MOD_MODES = ("calibrated", "requant", "biasfold", "skip")


@dataclass
class Options:
    modulation: str = "calibrated"
    allow_unmapped: bool = False
    device: str = "cpu"
    progress: Callable[[int, int, str], None] | None = None  # (bytes done, bytes total, what)


@dataclass
class Session:
    """An opened base + LoRAs + the plan; close() releases the files."""

    base: Checkpoint
    model: Model
    loras: list[LoraFile]
    plan: Plan
    records: list[dict] = field(default_factory=list)

    def close(self) -> None:
        self.base.close()
        for lf in self.loras:
            lf.ckpt.close()


def open_session(base: str | Checkpoint, lora_specs: list[str], opts: Options, model: Model | None = None,
                 max_rank: int | None = None) -> Session:
    """Open (or share) the base, open the LoRAs and build the plan. A shared base stays open on failure."""
    if opts.modulation not in MOD_MODES:
        raise MergeError(f"unknown modulation mode {opts.modulation!r}; choose from {', '.join(MOD_MODES)}")
    own = not isinstance(base, Checkpoint)
    ckpt = Checkpoint(base) if own else base
    loras: list[LoraFile] = []
    try:
        model = model or load_model(ckpt)
        for spec in lora_specs:
            loras.append(open_lora(spec))
        plan = build_plan(model, loras, allow_unmapped=opts.allow_unmapped, modulation_mode=opts.modulation,
                          max_rank=max_rank)
    except BaseException:
        if own:
            ckpt.close()
        for lf in loras:
            lf.ckpt.close()
        raise
    return Session(ckpt, model, loras, plan)


# -- streaming execution ----------------------------------------------------------------------------------
def _natural(s: str) -> tuple:
    """'blocks.10.x' after 'blocks.9.x': the model's own layer order."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s))


def output_order(base: Checkpoint, plans: list[Plan]) -> list[str]:
    """The order tensors are written in (loaders index tensors by name; the order is free).

    The base's order groups tensors by dtype (every modulation qweight first, the 4-bit weights last), which
    would put all computed tensors in one stretch: the writer would idle while they are computed, then the
    compute would idle while the big copies run, and a layer's computed tensors would wait in memory for
    their turn. Instead: tensors no output changes come first (pure copies: the writer starts at once),
    then each changed layer's tensors together, layer by layer, so copying one layer's weights overlaps
    computing the next, and a layer's results are written as soon as they are made.
    Every tensor stays aligned to its element size (as safetensors itself writes them); if some order
    could not keep that, the base's order is used."""
    touched = set().union(*(p.touched_keys() for p in plans))
    groups: dict[str, list[str]] = {}
    for name in base.tensors:
        prefix = name.rpartition(".")[0]
        groups.setdefault(prefix, []).append(name)
    changed = {p for p, names in groups.items() if any(n in touched for n in names)}
    order = [n for n in base.tensors if n.rpartition(".")[0] not in changed]
    for prefix in sorted(changed, key=_natural):
        order += sorted(groups[prefix], key=lambda n: -base.tensors[n].itemsize)  # stable: base order within
    for plan in plans:
        pos = 0
        for sp in output_specs(plan, base, order):
            if pos % sp.itemsize:
                return list(base.tensors)
            pos += sp.nbytes
    return order


def output_specs(plan: Plan, base: Checkpoint, order: list[str]) -> list[OutSpec]:
    return [OutSpec(n, base.tensors[n].dtype, plan.out_shape(n, base.tensors[n].shape)) for n in order]


@dataclass
class Job:
    """One output of a run: its session (plan) and path; several jobs share one base and one pass over it."""

    session: Session
    out_path: str
    specs: list[OutSpec] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    writer: StreamingWriter | None = None
    pending: dict[str, dict] = field(default_factory=dict)  # a layer's computed tensors not yet written


HASH_PLACEHOLDER = "0" * 64  # same width as a sha256: the header is patched once the hashes are known


def _provenance(s: Session, final: bool = True) -> dict:
    return {
        "tool": f"qwenlora-merge {__version__}",
        "loras": [{"file": lf.name, "sha256": lf.sha256 if final else HASH_PLACEHOLDER, "strength": lf.strength,
                   "format": lf.format} for lf in s.loras],
        "rank": {"from": s.plan.model.rank, "to": s.plan.new_rank},
        "modulation": s.plan.modulation_mode,
    }


def execute(s: Session, out_path: str, opts: Options) -> dict:
    return execute_many(s.base, [Job(s, out_path)], opts)[0]


def execute_many(base: Checkpoint, jobs: list[Job], opts: Options) -> list[dict]:
    """Stream the base once; every job gets each tensor either copied byte for byte or transformed.
    All outputs are committed only if every job succeeded; on any failure no output file is left."""
    paths = [os.path.abspath(j.out_path) for j in jobs]
    if len(set(paths)) != len(paths):
        raise MergeError("two outputs of one batch have the same path")
    total = 0
    order = output_order(base, [j.session.plan for j in jobs])
    for j in jobs:
        j.specs = output_specs(j.session.plan, base, order)
        j.touched = j.session.plan.touched_keys()
        for lf in j.session.loras:
            lf.hash_in_background()
        j.meta = updated_metadata(j.session.plan, _provenance(j.session, final=False))
        total += sum(sp.nbytes for sp in j.specs)
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if opts.progress:
            opts.progress(done[0], total, "")

    t0 = time.perf_counter()
    # everything long-lived exists now; the loop below allocates many short-lived objects, and full
    # collections would keep walking the plan and headers (measured ~3% of a merge)
    gc.freeze()
    transformer = None  # made (and torch imported) when the first changed layer comes up
    try:
        for j in jobs:
            j.session.records = []
            j.writer = StreamingWriter(j.out_path, j.specs, j.meta, progress=progress)
        for name in order:
            for j in jobs:
                if name not in j.touched:  # copied in the kernel where it can; the page cache serves later jobs
                    j.writer.copy_tensor(name, base)
                    continue
                prefix = name.rpartition(".")[0]
                if prefix not in j.pending:
                    if transformer is None:
                        from .transform import LayerTransformer

                        transformer = LayerTransformer(base, jobs[0].session.model, opts.device)
                    out, rec = transformer(j.session, prefix)
                    j.pending[prefix] = out
                    if rec:
                        j.session.records.append(rec)
                t = j.pending[prefix].pop(name, None)
                if t is None:
                    j.writer.copy_tensor(name, base)  # e.g. a modulation layer kept as it was
                else:
                    j.writer.write_tensor(name, t)
                if not j.pending[prefix]:
                    del j.pending[prefix]
        for j in jobs:
            j.meta = updated_metadata(j.session.plan, _provenance(j.session))
            j.writer.patch_metadata(j.meta)
            j.writer.finish(check=lambda tmp, j=j: post_write_check(tmp, j.specs, j.meta))
        for j in jobs:
            j.writer.publish()
    except BaseException:
        for j in jobs:
            if j.writer is not None:
                j.writer.abort()
        raise
    finally:
        if transformer is not None:
            transformer.close()
        gc.unfreeze()
    secs = round(time.perf_counter() - t0, 3)
    return [{"seconds": secs, "output": j.out_path, "output_bytes": os.path.getsize(j.out_path),
             "write_mode": "direct" if j.writer.direct else "buffered"} for j in jobs]


def post_write_check(path: str, specs: list[OutSpec], meta: dict[str, str]) -> None:
    """Re-open what was written: same key set, dtypes, shapes and metadata as planned."""
    with Checkpoint(path) as c:
        got = {n: (i.dtype, i.shape) for n, i in c.tensors.items()}
        want = {s.name: (s.dtype, s.shape) for s in specs}
        if got != want or c.metadata != meta:
            raise MergeError("the written file does not match the plan (disk full or a concurrent writer?); "
                             "nothing was written")

"""read header -> detect family -> parse LoRAs -> plan -> stream and transform tensors -> write -> verify."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from . import __version__
from .engine import LayerStream, OutTensor, TensorFeed, post_write_check, progress_counter, run_pass
from .errors import MergeError
from .layers import MergeContext, compute_layer
from .lorafile import LoraFile, LoraSpec, open_lora
from .model import Model, load_model
from .naming import counted, natural
from .planner import SVD_RANK, Plan, build_plan, updated_metadata
from .prefetch import InOrder
from .st_reader import Checkpoint
from .st_writer import OutSpec, StreamingWriter, header_bytes


@dataclass
class Options:
    modulation: str = "calibrated"
    allow_unmapped: bool = False
    device: str = "cpu"  # "auto": see pick_device
    max_rank: int | None = None
    svd_rank: int = SVD_RANK
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
        self.close_loras()

    def close_loras(self) -> None:
        for lf in self.loras:
            lf.ckpt.close()


def open_session(base: str | Checkpoint, lora_specs: list[LoraSpec], opts: Options, model: Model | None = None) -> Session:
    """Open (or share) the base, open the LoRAs and build the plan. A shared base stays open on failure."""
    own = not isinstance(base, Checkpoint)
    ckpt = Checkpoint(base) if own else base
    loras: list[LoraFile] = []
    try:
        model = model or load_model(ckpt)
        for spec in lora_specs:
            loras.append(open_lora(spec))
        plan = build_plan(model, loras, allow_unmapped=opts.allow_unmapped, modulation_mode=opts.modulation,
                          max_rank=opts.max_rank, svd_rank=opts.svd_rank)
    except BaseException:
        if own:
            ckpt.close()
        for lf in loras:
            lf.ckpt.close()
        raise
    return Session(ckpt, model, loras, plan)


# -- the output's layout ------------------------------------------------------------------------------------------
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
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    changed = {p for p, names in groups.items() if any(n in touched for n in names)}
    order = [n for n in base.tensors if n.rpartition(".")[0] not in changed]
    for prefix in sorted(changed, key=natural):
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


def merge_description(plan: Plan, base: Checkpoint, order: list[str]) -> list[OutTensor]:
    """The merged file's tensors (engine.OutTensor), in `order`: each base tensor under its name, copied, or, where
    the plan rewrites it, as its layer kind makes it ("merged")."""
    touched = plan.touched_keys()
    return [OutTensor(spec.name, spec.dtype, spec.shape, spec.name.rpartition(".")[0], spec.name, "merged",
                      copy=spec.name not in touched)
            for spec in output_specs(plan, base, order)]


HASH_PLACEHOLDER = "0" * 64  # same width as a sha256: the header is patched once the hashes are known


def provenance(s: Session, final: bool = True, out_path: str | None = None) -> dict:
    """The record `qwenlora_merge` in the output's metadata: what went in (each LoRA's name, sha256, strength and
    path relative to the output's folder) and the settings that shaped it, so that `verify` can re-check the file
    from the files alone."""
    plan = s.plan
    return {
        "tool": f"qwenlora-merge {__version__}",
        "loras": [{"file": lf.name, "sha256": lf.sha256 if final else HASH_PLACEHOLDER, "strength": lf.strength,
                   "format": lf.format} | ({"path": recorded_path(lf.path, out_path)} if out_path else {})
                  for lf in s.loras],
        "rank": {"from": plan.model.rank, "to": plan.new_rank},
        "modulation": plan.modulation_mode,
        "settings": {"max_rank": plan.max_rank, "svd_rank": plan.svd_rank, "modulation": plan.modulation_mode},
    }


def recorded_path(lora_path: str, out_path: str) -> str:
    """A LoRA's path as the provenance records it: relative to the output's folder (with '/' separators), so it
    stays right when the two move together and does not spell out the folders above them; absolute where no
    relative path exists (another drive)."""
    lora = os.path.abspath(lora_path)
    try:
        rel = os.path.relpath(lora, os.path.dirname(os.path.abspath(out_path)))
    except ValueError:
        return lora
    return rel.replace(os.sep, "/")


def planned_output_bytes(base: Checkpoint, jobs: list[Job]) -> list[int]:
    """Each job's output size, exact: the header as the writer will write it (same tensor order, metadata with
    the provenance's placeholder hashes, which have the final hashes' width) plus the tensors' bytes."""
    order = output_order(base, [job.session.plan for job in jobs])
    sizes = []
    for job in jobs:
        specs = output_specs(job.session.plan, base, order)
        meta = updated_metadata(job.session.plan, provenance(job.session, final=False, out_path=job.out_path))
        sizes.append(8 + len(header_bytes(specs, meta)) + sum(spec.nbytes for spec in specs))
    return sizes


# -- the device -------------------------------------------------------------------------------------------------
def heavy_layers(plans: list[Plan]) -> list[str]:
    """What in the plans is heavy per-layer maths (a GPU pays off): modulation requantization, dense updates."""
    ops = [op for merge_plan in plans for op in merge_plan.ops.values()]
    modulation = sum(op.kind.name == "modulation" for op in ops)
    dense = sum(op.has_dense and op.kind.name != "modulation" for op in ops)
    return [counted(n, noun) for n, noun in ((modulation, "modulation layer"), (dense, "dense update")) if n]


def pick_device(requested: str, plans: list[Plan], cuda_usable: Callable[[], bool] | None = None) -> tuple[str, str]:
    """(device, why). "auto": a CUDA device when torch sees one and the plans hold heavy per-layer maths,
    else the CPU (copies and exact low-rank appends gain nothing from a GPU, and need no CUDA start-up).
    Any other value is used as asked (the CLI has checked that it works)."""
    if requested != "auto":
        return requested, f"--device {requested}"
    heavy = heavy_layers(plans)
    if not heavy:
        return "cpu", "auto: no modulation layer or dense update to compute"
    if cuda_usable is None:
        import torch

        cuda_usable = torch.cuda.is_available
    if not cuda_usable():
        return "cpu", f"auto: {' and '.join(heavy)}, no usable CUDA device"
    return "cuda", f"auto: {' and '.join(heavy)} on the CUDA device"


# -- the streamed pass ------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One output of a run: its session (plan) and path; several jobs share one base and one pass over it."""

    session: Session
    out_path: str
    replace: bool = True  # False: the output did not exist at the start, and must not be replaced if it appears


class _Output:
    """One job's output during the pass (an engine Sink): the declared tensors, its writer, and a changed layer's
    computed tensors until they are written."""

    def __init__(self, index: int, job: Job, base: Checkpoint, order: list[str]):
        self.index, self.job, self.plan = index, job, job.session.plan
        self.tensors = merge_description(self.plan, base, order)
        self.specs = [OutSpec(tensor.name, tensor.dtype, tensor.shape) for tensor in self.tensors]
        self.meta = updated_metadata(self.plan, provenance(job.session, final=False, out_path=job.out_path))
        self.writer: StreamingWriter | None = None
        self.progress: Callable[[int], None] | None = None
        self.feed: TensorFeed | None = None

    @property
    def nbytes(self) -> int:
        return sum(sp.nbytes for sp in self.specs)

    def open(self) -> None:
        self.job.session.records = []
        self.writer = StreamingWriter(self.job.out_path, self.specs, self.meta, progress=self.progress)

    def start(self, base: Checkpoint, stream: LayerStream) -> None:
        self.feed = TensorFeed(base, lambda prefix: stream.take((self.index, prefix)))

    def put(self, position: int) -> None:
        """Hand the tensor at `position` of the output order to the writer."""
        self.feed.put(self.writer, self.tensors[position])

    def finish(self) -> None:
        self.meta = updated_metadata(self.plan, provenance(self.job.session, out_path=self.job.out_path))
        self.writer.patch_metadata(self.meta)
        self.writer.finish(check=lambda tmp: post_write_check(tmp, self.specs, self.meta))

    def publish(self) -> None:
        self.writer.publish(replace=self.job.replace)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def execute(s: Session, out_path: str, opts: Options) -> dict:
    return execute_many(s.base, [Job(s, out_path)], opts)[0]


def compute_schedule(order: list[str], outs: list[_Output]) -> list[tuple[int, str]]:
    """(output index, layer) of every layer computation, in the order the writer needs them (the order a pass
    that computed each layer when its first tensor came up would compute them in)."""
    schedule: dict[tuple[int, str], None] = {}
    for position in range(len(order)):
        for out in outs:
            if not out.tensors[position].copy:
                schedule.setdefault((out.index, out.tensors[position].layer))
    return list(schedule)


# no worker thread on the CPU: each changed layer is computed when the writer reaches it, while the writer's own
# threads still copy and write what came before. A worker computing a layer ahead gained nothing and cost on the
# CPU (6-block base, 2 cores: DoRA on every W4A4 layer 26.3-27.4 s and 1.42 GB with one worker, 21.6-22.0 s and
# 1.27 GB without; the modulation merge the same): its torch threads and the writer's fought for the cores, and
# two layers' temporaries were alive at once. On a CUDA device the maths leaves the cores free, and one thread
# computing the 600 layers (reads, LoRA factors, GPU work and its host round trips, packing) was the bottleneck:
# several workers compute layers at once, each on its own CUDA stream (full size, H100, the merge with all 120
# modulation layers: 23.5 s with one worker, 20.6 s with two, 16.1 s with four, 17.0 s with six, 17.4 s with
# eight; on another H100 11.8 s with four, 14.5 s with six, 13.9 s with four eight layers ahead), as many layers
# ahead of the writer as there are workers (the prefetch's least)
MERGE_AHEAD, MERGE_WORKERS, MERGE_WORKERS_CUDA = 2, 0, 4


def execute_many(base: Checkpoint, jobs: list[Job], opts: Options) -> list[dict]:
    """Stream the base once (engine.run_pass); every job gets each tensor either copied byte for byte or
    transformed. Each changed layer is computed when the writer needs it (the writer's threads keep writing
    what came before meanwhile), or on a CUDA device by workers ahead of the writer. All outputs are committed
    only if every job succeeded; on any failure no output file is left."""
    paths = [os.path.abspath(j.out_path) for j in jobs]
    if len(set(paths)) != len(paths):
        raise MergeError("two outputs of one batch have the same path")
    order = output_order(base, [j.session.plan for j in jobs])
    outs = [_Output(index, job, base, order) for index, job in enumerate(jobs)]
    step = progress_counter(opts.progress, sum(o.nbytes for o in outs))
    for out in outs:
        out.progress = step
    device, why = pick_device(opts.device, [j.session.plan for j in jobs])

    def compute(key: tuple[int, str], in_order: InOrder, context: Callable[[], MergeContext]) -> dict:
        index, prefix = key
        ctx = context()
        with ctx.worker_stream():  # layers computed at once by several workers: only the records wait for order
            merged, record = compute_layer(ctx, outs[index].plan, prefix)
        with in_order():
            if record is not None:
                outs[index].job.session.records.append(record)
        return merged

    def layers() -> LayerStream:
        return LayerStream(base, jobs[0].session.model, device, compute_schedule(order, outs), compute,
                           workers=MERGE_WORKERS_CUDA if device.startswith("cuda") else MERGE_WORKERS,
                           ahead=MERGE_AHEAD, name="merge-compute")

    def write(stream: LayerStream) -> None:
        for out in outs:
            out.start(base, stream)
        for position in range(len(order)):  # each tensor to every output in turn: the page cache serves the later
            for out in outs:
                out.put(position)

    loras = [lora for job in jobs for lora in job.session.loras]
    started = time.perf_counter()
    run_pass([base] + [lora.ckpt for lora in loras], loras, outs, layers, write)
    secs = round(time.perf_counter() - started, 3)
    return [{"seconds": secs, "output": o.job.out_path, "output_bytes": os.path.getsize(o.job.out_path),
             "write_mode": "direct" if o.writer.direct else "buffered", "device": device, "device_reason": why}
            for o in outs]

"""export-diffusers: base (+ LoRAs, merged on the way by the same planner and layer kinds as `merge`) -> a diffusers
component folder that stock diffusers loads with its Nunchaku Lite quantizer. One streamed pass: copies first,
then the changed and transformed layers one at a time, shard after shard, into a temp folder renamed into place."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from ..engine import LayerStream, TensorFeed, post_write_check, progress_counter, run_pass
from ..errors import ExportError
from ..lorafile import LoraSpec
from ..naming import human_bytes
from ..pipeline import Options, Session, open_session, pick_device, provenance
from ..prefetch import InOrder
from ..report import plan_report, render, summarize_layers
from ..st_writer import OutSpec, StreamingWriter
from .config import diffusers_config
from .folder import (CONFIG_NAME, INDEX_NAME, SHARD_METADATA, AtomicFolder, Shard, check_target, index_json,
                     plan_shards)
from .tree import ExportTree, export_tree


@dataclass
class ExportOptions:
    out_dir: str
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    dry_run: bool = False


@dataclass
class ExportPlan:
    session: Session
    tree: ExportTree
    shards: list[Shard]
    config: dict
    target: str
    report: dict


def refuse_unexportable(model) -> None:
    """One clear line for a base diffusers' Nunchaku Lite cannot take."""
    fam = model.family
    if fam.diffusers_class is None:
        raise ExportError(f"{fam.title} has no stock diffusers model that diffusers' Nunchaku Lite quantizer loads; "
                          "export-diffusers supports Qwen-Image and Z-Image-Turbo")
    if model.precision is None:
        raise ExportError("the base has no W4A4 (SVDQ) layer: nothing for diffusers' Nunchaku Lite to load")
    if model.fused_smoothing:
        some = sorted(model.fused_smoothing)
        raise ExportError(f"the base has smoothing fused upstream in {len(some)} layers (e.g. {some[0]}: smooth_factor "
                          "all ones, smooth_factor_orig not); diffusers' module has no smooth_factor_orig and would "
                          "take a pre-divided input, so it cannot be exported")


def plan_export(base: str, lora_specs: list[LoraSpec], opts: Options, xo: ExportOptions) -> ExportPlan:
    """Open, refuse or plan; the caller closes `.session`. Reads headers only (and no torch)."""
    inputs = [base] + [spec.path for spec in lora_specs]
    target = check_target(xo.out_dir, inputs, overwrite=xo.overwrite or xo.dry_run)
    s = open_session(base, lora_specs, opts)
    try:
        refuse_unexportable(s.model)
        tree = export_tree(s.model, s.plan, s.base)
        cfg, dropped = diffusers_config(s.model, tree, s.plan.new_rank)
        shards = plan_shards(tree.tensors, xo.max_shard_bytes)
        rep = plan_report(s.plan, s.base)
        rep |= {"dry_run": xo.dry_run, "output_planned": target, "expected_output_bytes": tree.nbytes,
                "export": _export_summary(s, tree, shards, cfg["quantization_config"])}
        if dropped:
            rep["warnings"].append(f"config keys {', '.join(dropped)} are no arguments of diffusers' "
                                   f"{s.model.family.diffusers_class}: left out of config.json")
    except BaseException:
        s.close()
        raise
    return ExportPlan(s, tree, shards, cfg, target, rep)


def _export_summary(s: Session, tree: ExportTree, shards: list[Shard], qc: dict) -> dict:
    return {"class": s.model.family.diffusers_class, "quant_method": qc["quant_method"],
            "precision": qc["svdq_w4a4"]["precision"], "rank": s.plan.new_rank,
            "svdq_targets": len(tree.svdq_targets), "awq_targets": len(tree.awq_targets),
            "tensors": len(tree.tensors), "copied": sum(t.copy for t in tree.tensors),
            "files": [sh.file for sh in shards]}


def export_diffusers(base: str, lora_specs: list[LoraSpec], opts: Options, xo: ExportOptions) -> dict:
    """Plan, then (unless a dry run) write the folder; returns the report (the merge's, plus `export`)."""
    xp = plan_export(base, lora_specs, opts, xo)
    try:
        if not xo.dry_run:
            xp.report |= write_export(xp, opts, xo)
    finally:
        xp.session.close()
    return xp.report


class _FolderSink:
    """The export folder as the engine's output: shards written into a temp folder, then the index and
    config.json, renamed into place at publish."""

    def __init__(self, plan: ExportPlan, overwrite: bool):
        self.plan, self.overwrite = plan, overwrite
        self.folder: AtomicFolder | None = None

    def open(self) -> None:
        self.folder = AtomicFolder(self.plan.target)

    def finish(self) -> None:
        index = index_json(self.plan.shards)
        if index is not None:
            self.folder.write_json(INDEX_NAME, index)
        # "_" keys: ignored by diffusers
        self.folder.write_json(CONFIG_NAME, self.plan.config | {"_qwenlora_merge": provenance(self.plan.session)})

    def publish(self) -> None:
        self.folder.commit(self.overwrite)

    def abort(self) -> None:
        if self.folder is not None:
            self.folder.abort()


# workers: the merge part of each layer takes turns in layer order, the export ops of several layers run at once
# (each on one torch thread: a GELU-shift bias is ~32 ms of work a layer); two on 2 cores, up to 6 where
# there are more. Up to 8 layers ahead of the writer (full-size export on 2 cores: 13.6-14.6 s against 14.9-15.2 s
# with 2 ahead, peak RSS 0.68 against 0.67 GB: a layer's held results are its low-rank parts and, for a
# modulation layer, one permuted qweight of 28 MB)
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
EXPORT_AHEAD, EXPORT_WORKERS = 8, max(2, min(6, _CORES // 2))


def write_export(xp: ExportPlan, opts: Options, xo: ExportOptions) -> dict:
    session, sink = xp.session, _FolderSink(xp, xo.overwrite)
    transformers: list = []
    layers = computed_layers(xp.shards)

    def compute(prefix: str, in_order: InOrder, context) -> dict:
        with in_order():  # the merge, one layer after the other (see LayerTransformer.merge)
            if not transformers:  # torch is imported here, once the copies are under way
                from ..layers.base import keep_freed_memory
                from .transform import LayerTransformer

                # a modulation layer's permuted qweight (28 MB) and a shifted bias's fp64 temporaries, handed back
                # to the kernel and faulted in again for every layer, cost a second of system time at full size
                keep_freed_memory()
                transformers.append(LayerTransformer(context(), session.plan, xp.tree))
            merged = transformers[0].merge(prefix)
        return transformers[0].outputs_of(prefix, merged)

    def stream() -> LayerStream:
        device = pick_device(opts.device, [session.plan])[0]
        return LayerStream(session.base, session.model, device, layers, compute, workers=EXPORT_WORKERS,
                           ahead=EXPORT_AHEAD, name="export-compute")

    direct: list[bool] = []

    def write(layer_stream: LayerStream) -> None:
        direct.append(write_shards(session.base, xp.shards, sink.folder, layer_stream.take,
                                   progress_counter(opts.progress, xp.tree.nbytes)))

    started = time.perf_counter()
    run_pass([session.base] + [lora.ckpt for lora in session.loras], session.loras, [sink], stream, write)
    records = transformers[0].records if transformers else []
    rounded = [name for layer in layers for name in transformers[0].rounded.get(layer, [])] if transformers else []
    out = {"seconds": round(time.perf_counter() - started, 3), "output": xp.target,
           "output_bytes": _folder_bytes(xp.target), "write_mode": "direct" if direct[0] else "buffered",
           "layers": records, "layers_summary": summarize_layers(records)}
    if rounded:
        xp.report["warnings"].append(f"{len(rounded)} tensors rounded to the compute dtype diffusers holds them in "
                                     f"(e.g. {rounded[0]})")
    return out


def computed_layers(shards: list[Shard]) -> list[str]:
    """The layers whose tensors are computed, in the order the writer first needs one of them."""
    order: dict[str, None] = {}
    for shard in shards:
        for tensor in shard.tensors:
            if not tensor.copy and tensor.byte_range is None:
                order.setdefault(tensor.layer)
    return list(order)


def write_shards(base, shards: list[Shard], folder: AtomicFolder, compute: Callable[[str], dict],
                 progress: Callable[[int], None] | None) -> bool:
    """Every shard through its own streaming writer, one after the other, fed by one TensorFeed (a layer's
    tensors wait for their turn: one layer, plus a few tiny ones moved to a shard's end). Returns whether every
    byte went through O_DIRECT."""
    feed = TensorFeed(base, compute)
    direct = True
    for shard in shards:
        specs = [OutSpec(t.name, t.dtype, t.shape) for t in shard.tensors]
        writer = StreamingWriter(folder.path(shard.file), specs, SHARD_METADATA, progress=progress)
        try:
            for tensor in shard.tensors:
                feed.put(writer, tensor)
            writer.finish(check=lambda tmp: post_write_check(tmp, specs, SHARD_METADATA))
            writer.publish()
        except BaseException:
            writer.abort()
            raise
        direct = direct and writer.direct
    return direct


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def render_export(rep: dict, verbose: bool = False) -> str:
    """The merge report's lines, then what the folder holds."""
    x = rep["export"]
    files = x["files"]
    where = files[0] if len(files) == 1 else f"{len(files)} shards + {INDEX_NAME}"
    line = (f"export   diffusers {x['class']} ({x['quant_method']} {x['precision']}, rank {x['rank']}): "
            f"{x['svdq_targets']} SVDQ + {x['awq_targets']} AWQ modules, {x['tensors']} tensors "
            f"({x['copied']} copied) in {where} + {CONFIG_NAME}, {human_bytes(rep['expected_output_bytes'])}")
    return render(rep, verbose) + "\n" + line

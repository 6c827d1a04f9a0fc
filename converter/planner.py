"""LoRA modules + family tables -> a Plan: every decision made up front, nothing read but headers
(and the small A matrices of fused groups, to detect a shared A).

Executing a Plan (converter.pipeline) needs no further choices.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from mappings import FAMILIES, FOREIGN_SIGNATURES, by_name

from .errors import MergeError, ShapeMismatch, UnmappedKeys
from .lora import LoraFile, LoraModule
from .model import Layer, Layout, Model, Segment

MAX_RANK = 1024  # Nunchaku's kernel limit (Lora::MAX_RANK)


def round16(n: int) -> int:
    return (n + 15) // 16 * 16


@dataclass
class Contribution:
    """One LoRA module's effect on one checkpoint layer."""

    lora: int  # index into Plan.loras
    module: str  # LoRA module name as in the file (after prefix stripping)
    kind: str  # "lowrank" | "diff" | "diff_b"
    segments: list[Segment]
    scale: float = 1.0
    rank: int = 0
    a_key: str = ""
    b_key: str = ""
    key: str = ""  # diff / diff_b tensor key
    shares_a_with: int | None = None  # index (in the op's contributions) of a member with an identical A


@dataclass
class LayerOp:
    layer: Layer
    method: str  # "lowrank_append" | "dense_add" | "vector_add" | "modulation"
    contributions: list[Contribution] = field(default_factory=list)

    @property
    def added_rank(self) -> int:
        return sum(c.rank for c in self.contributions if c.kind == "lowrank" and c.shares_a_with is None)


@dataclass
class KeyAccount:
    applied: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (key, why)


@dataclass
class Plan:
    model: Model
    loras: list[LoraFile]
    ops: dict[str, LayerOp]
    new_rank: int
    accounts: list[KeyAccount]
    warnings: list[str]
    modulation_mode: str
    lowrank_layers: list[str]  # every SVDQ layer (all get the new rank)

    @property
    def rank_changed(self) -> bool:
        return self.new_rank != self.model.rank

    def out_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        prefix, _, part = name.rpartition(".")
        if part in ("proj_down", "proj_up") and self.rank_changed and prefix in self.model.layers:
            return (shape[0], self.new_rank)
        return shape

    def touched_keys(self) -> set[str]:
        out = set()
        for p, op in self.ops.items():
            lay = op.layer
            if op.method == "lowrank_append":
                out |= {lay.key("proj_down"), lay.key("proj_up")}
            elif op.method == "modulation":
                out |= {lay.key("qweight"), lay.key("wscales"), lay.key("wzeros")}
                if lay.has_bias:
                    out.add(lay.key("bias"))
            elif op.method in ("dense_add", "vector_add"):
                if any(c.kind != "diff_b" for c in op.contributions):
                    out.add(lay.key("weight"))
            if any(c.kind == "diff_b" for c in op.contributions):
                out.add(lay.key("bias"))
        if self.rank_changed:
            for p in self.lowrank_layers:
                out |= {f"{p}.proj_down", f"{p}.proj_up"}
        return out


def _resolve(mod: LoraModule, targets: dict[str, list[Segment]], underscore_index: dict[str, str]) -> str | None:
    if not mod.underscore and mod.name in targets:
        return mod.name
    return underscore_index.get(mod.name.replace(".", "_"))


def _foreign_family(names: list[str], own: str) -> str | None:
    votes: Counter = Counter()
    for n in names:
        for fam, pats in FOREIGN_SIGNATURES.items():
            if any(re.search(p, n) for p in pats):
                votes[fam] += 1
        for f in FAMILIES:
            if f.NAME != own and any(re.search(p, n) for p in f.SIGNATURES):
                votes[f.TITLE] += 1
    if votes:
        fam, n = votes.most_common(1)[0]
        if n >= max(1, len(names) // 2):
            return fam
    return None


def _pattern(name: str) -> str:
    return re.sub(r"(?<=[._])\d+(?=[._]|$)", "*", name)


def _summarise(keys: list[tuple[str, str]], limit: int = 8) -> str:
    c = Counter(f"{_pattern(k)} ({why})" for k, why in keys)
    items = [f"{p} x{n}" for p, n in c.most_common(limit)]
    more = len(c) - limit
    return "; ".join(items) + (f"; ... {more} more patterns" if more > 0 else "")


def method_for(layer: Layer) -> str:
    if layer.layout.is_svdq:
        return "lowrank_append"
    if layer.layout == Layout.AWQ_W4A16:
        return "modulation"
    if layer.layout == Layout.VECTOR:
        return "vector_add"
    return "dense_add"


def build_plan(model: Model, loras: list[LoraFile], *, allow_unmapped: bool = False,
               modulation_mode: str = "calibrated", max_rank: int | None = None) -> Plan:
    fam = by_name(model.family)
    targets = fam.lora_targets(model.layers)
    underscore_index = {name.replace(".", "_"): name for name in targets}
    ops: dict[str, LayerOp] = {}
    accounts: list[KeyAccount] = []
    warnings: list[str] = []

    for li, lf in enumerate(loras):
        acc = KeyAccount(ignored=list(lf.ignored))
        acc.unmapped.extend(lf.unsupported)
        unresolved: list[str] = []
        for mod in lf.modules.values():
            keys = list(mod.keys.values())
            tname = _resolve(mod, targets, underscore_index)
            if tname is None:
                unresolved.append(mod.name)
                acc.unmapped.extend((k, "no such layer in this checkpoint") for k in keys)
                continue
            segs = targets[tname]
            if modulation_mode == "skip" and any(model.layers[s.target].layout == Layout.AWQ_W4A16 for s in segs):
                acc.ignored.extend((k, "modulation layer left unchanged (--mod skip)") for k in keys)
                continue
            bad = _add_module(li, lf, mod, tname, segs, model, ops)
            if bad:
                acc.unmapped.extend((k, bad) for k in keys)
                continue
            acc.applied.extend(keys)
        if unresolved and len(unresolved) == len(lf.modules):
            other = _foreign_family(unresolved, model.family)
            what = f"a {other} LoRA" if other else "made for another model"
            raise UnmappedKeys(f"{lf.name} looks like {what}: none of its {len(lf.modules)} modules exist in this "
                               f"{model.family_title} checkpoint (e.g. {sorted(unresolved)[0]})")
        if acc.unmapped and not allow_unmapped:
            raise UnmappedKeys(f"{lf.name}: {len(acc.unmapped)} of {len(lf.ckpt.keys())} keys cannot be applied: "
                               f"{_summarise(acc.unmapped)}. Use --allow-unmapped to merge the rest anyway")
        if acc.unmapped:
            warnings.append(f"{lf.name}: {len(acc.unmapped)} keys not applied (--allow-unmapped): {_summarise(acc.unmapped)}")
        if abs(lf.strength) < 1e-8:
            warnings.append(f"{lf.name}: strength 0 — this LoRA changes nothing")
        accounts.append(acc)

    _detect_shared_a(loras, ops)
    _check_smoothing_fusion(model, ops)

    lowrank_layers = [p for p, l in model.layers.items() if l.layout.is_svdq]
    added = max((op.added_rank for op in ops.values() if op.method == "lowrank_append"), default=0)
    new_rank = round16(model.rank + added) if added else model.rank
    if max_rank is not None:
        if max_rank % 16 or max_rank <= model.rank:
            raise MergeError(f"--max-rank must be a multiple of 16 above the base rank {model.rank}, got {max_rank}")
        if new_rank > max_rank:
            warnings.append(f"rank capped at {max_rank} (exact merge needs {new_rank}): layers whose LoRA part exceeds "
                            f"rank {max_rank - model.rank} keep its top singular directions; see the per-layer error")
            new_rank = max_rank
    if new_rank > MAX_RANK:
        raise MergeError(f"the merged rank would be {new_rank}, above Nunchaku's limit of {MAX_RANK}; "
                         "merge fewer or lower-rank LoRAs, or cap it with --max-rank")
    return Plan(model, loras, ops, new_rank, accounts, warnings, modulation_mode, lowrank_layers)


def _add_module(li: int, lf: LoraFile, mod: LoraModule, tname: str, segs: list[Segment], model: Model,
                ops: dict[str, LayerOp]) -> str | None:
    """Register the module's contributions; returns a reason string if it cannot be applied."""
    lora_rows = sum(s.rows for s in segs)
    in_features = model.layers[segs[0].target].in_features
    if "A" in mod.keys:
        a_shape, b_shape = lf.shape(mod.keys["A"]), lf.shape(mod.keys["B"])
        if a_shape[1] != in_features or b_shape[0] != lora_rows:
            raise ShapeMismatch(
                f"{lf.name}: module {mod.name} is {b_shape[0]}x{a_shape[1]} (out x in) but checkpoint layer "
                f"{tname} expects {lora_rows}x{in_features}: the LoRA was made for a different model size")
    for part in ("diff", "diff_b"):
        if part not in mod.keys:
            continue
        shape = lf.shape(mod.keys[part])
        layer = model.layers[segs[0].target]
        if part == "diff":
            if layer.layout.is_svdq or layer.layout == Layout.AWQ_W4A16:
                return "full-weight delta (.diff) on a 4-bit layer cannot be merged exactly"
            want = (lora_rows,) if layer.layout == Layout.VECTOR else (lora_rows, in_features)
        else:
            if not all(model.layers[s.target].has_bias for s in segs):
                return f"bias delta for {tname}, which has no bias"
            want = (lora_rows,)
        if tuple(shape) != want:
            raise ShapeMismatch(f"{lf.name}: {mod.keys[part]} has shape {tuple(shape)}, layer {tname} needs {want}")
    if "A" not in mod.keys and not any(p in mod.keys for p in ("diff", "diff_b")):
        return "alpha without LoRA weights"
    by_target: dict[str, list[Segment]] = defaultdict(list)
    for s in segs:
        by_target[s.target].append(s)
    for target, tsegs in by_target.items():
        layer = model.layers[target]
        op = ops.setdefault(target, LayerOp(layer, method_for(layer)))
        if "A" in mod.keys:
            op.contributions.append(Contribution(li, mod.name, "lowrank", tsegs, scale=lf.scale(mod),
                                                 rank=lf.shape(mod.keys["A"])[0], a_key=mod.keys["A"],
                                                 b_key=mod.keys["B"]))
        for part in ("diff", "diff_b"):
            if part in mod.keys:
                op.contributions.append(Contribution(li, mod.name, part, tsegs, scale=lf.strength, key=mod.keys[part]))
    return None


def _detect_shared_a(loras: list[LoraFile], ops: dict[str, LayerOp]) -> None:
    """q/k/v (or w3/w1) LoRAs trained with one shared A: append that A once, with the B's stacked."""
    for op in ops.values():
        low = [c for c in op.contributions if c.kind == "lowrank"]
        if len(low) < 2:
            continue
        cache: dict[int, bytearray] = {}
        for i, c in enumerate(op.contributions):
            if c.kind != "lowrank":
                continue
            for j in range(i):
                d = op.contributions[j]
                if d.kind != "lowrank" or d.shares_a_with is not None or d.lora != c.lora or d.rank != c.rank:
                    continue
                if d.scale != c.scale or any(s.target_start == t.target_start for s in c.segments for t in d.segments):
                    continue
                lf = loras[c.lora]
                if lf.shape(c.a_key) != lf.shape(d.a_key):
                    continue
                # bit-identical A (stricter than ==, which would also pair +0.0 with -0.0); each A read once
                for k, key in ((i, c.a_key), (j, d.a_key)):
                    if k not in cache:
                        cache[k] = lf.ckpt.read_bytes(key)
                if lf.ckpt.tensors[c.a_key].dtype == lf.ckpt.tensors[d.a_key].dtype and cache[i] == cache[j]:
                    c.shares_a_with = j
                    break


def _check_smoothing_fusion(model: Model, ops: dict[str, LayerOp]) -> None:
    """Layers whose smoothing deepcompressor fused into the layer before (smooth_factor all ones but
    smooth_factor_orig not) receive a pre-divided input, and the rows of the layer feeding them are divided
    too (attention output <- the V rows of both q/k/v projections, which joint attention mixes). The stock
    files do not use this; rather than merge such layers silently wrong, refuse."""
    if not model.fused_smoothing:
        return
    block_of = lambda p: (m.group(1) if (m := re.match(r"^([a-z_]+\.\d+)\.", p)) else "")
    attn_out_blocks = {block_of(p) for p in model.fused_smoothing if p.endswith(("to_out.0", "to_add_out"))}
    for p, op in ops.items():
        producer = block_of(p) in attn_out_blocks and p.endswith(("to_qkv", "add_qkv_proj"))
        if p in model.fused_smoothing or producer:
            raise MergeError(
                f"layer {p} {'feeds a layer whose' if producer else 'has its'} smoothing fused upstream "
                f"(smooth_factor all ones, smooth_factor_orig not): a LoRA cannot be merged into it exactly, "
                f"so nothing was written. Fused layers: {', '.join(sorted(model.fused_smoothing)[:4])}"
                f"{' ...' if len(model.fused_smoothing) > 4 else ''}")


def updated_metadata(plan: Plan, provenance: dict) -> dict[str, str]:
    meta = dict(plan.model.metadata)
    if plan.rank_changed:
        meta["quantization_config"] = _set_rank(meta.get("quantization_config"), plan.model.rank, plan.new_rank)
    meta["qwenlora_merge"] = json.dumps(provenance, separators=(",", ":"))
    return meta


def _set_rank(raw: str | None, old: int, new: int) -> str:
    if raw is None:
        return json.dumps({"method": "svdquant", "rank": new})
    qc = json.loads(raw)
    want = json.loads(raw)
    want["rank"] = new
    man = want.get("runtime_manifest")
    if isinstance(man, dict):
        for t in man.get("targets", []) or []:
            if isinstance(t, dict) and "rank" in t:
                t["rank"] = new
        req = man.get("requirements")
        if isinstance(req, dict) and "rank" in req:
            req["rank"] = new
    # keep the original text byte for byte except the number, when that is unambiguous
    if "runtime_manifest" not in qc:
        cand = re.sub(r'("rank"\s*:\s*)' + str(old) + r"\b", lambda m: m.group(1) + str(new), raw)
        try:
            if json.loads(cand) == want:
                return cand
        except json.JSONDecodeError:
            pass
    return json.dumps(want)

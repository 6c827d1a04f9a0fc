"""LoRA modules + family tables -> a Plan: every decision made up front, nothing read but headers (and the
small down factors of fused groups, to detect a shared one). Executing a Plan (converter.pipeline) needs no
further choices. No torch here: planning overlaps torch's import."""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping

from mappings import FAMILIES, FOREIGN_SIGNATURES

from .adapters import Adapter
from .errors import MergeError, ShapeMismatch, UnmappedKeys
from .layers import LayerKind, kind_of
from .layout import MAX_RANK, MODULATION_MODES, SVD_RANK, Layer, Layout, Segment, round16
from .lorafile import LoraFile, LoraModule
from .model import Model
from .naming import pattern
from .repeats import Repeat, find_repeats, fold_repeats

if TYPE_CHECKING:
    from .st_reader import TensorInfo


def rank_needed(op: LayerOp, svd_rank: int) -> int:
    """The uniform-rank room a layer's LoRA part asks for: its exact parts, or the SVD budget of dense ones."""
    return max(op.added_rank, op.kind.dense_rank(op, svd_rank))


@dataclass
class Contribution:
    """One adapter's effect on one checkpoint layer."""

    lora: int  # index into Plan.loras
    module: str  # LoRA module name as in the file (after prefix stripping)
    adapter: Adapter
    segments: list[Segment]
    shares_down_with: int | None = None  # index (in the op's contributions) of a member with the same down
    exact: bool = True  # False: the layer kind takes this low-rank update as a dense ΔW (its rank is too large)

    @property
    def rank(self) -> int | None:
        return self.adapter.rank

    @property
    def low_rank(self) -> bool:
        """A weight update taken as exact factors."""
        return self.exact and self.adapter.applies_to == "weight" and self.adapter.rank is not None

    def place(self, src, out_rows: int):
        """Rows of the module's output (an up factor, a ΔW or a bias) placed onto the layer's rows (`src` itself
        when the module is the whole layer: no copy of a dense ΔW)."""
        if [(s.target_start, s.lora_start, s.rows) for s in self.segments] == [(0, 0, out_rows)] == [(0, 0, len(src))]:
            return src
        out = src.new_zeros((out_rows,) + tuple(src.shape[1:]))
        self.place_onto(out, src)
        return out

    def place_onto(self, out, src, accumulate: bool = False) -> None:
        """Write (or add) the rows of the module's output `src` into `out`, indexed by the layer's rows (e.g. the
        columns of a layer's up factor that this contribution owns)."""
        for seg in self.segments:
            rows = out[seg.target_start:seg.target_start + seg.rows]
            if accumulate:
                rows += src[seg.lora_start:seg.lora_start + seg.rows]
            else:
                rows[...] = src[seg.lora_start:seg.lora_start + seg.rows]


@dataclass
class LayerOp:
    layer: Layer
    kind: type[LayerKind]
    contributions: list[Contribution] = field(default_factory=list)
    # smoothing fused upstream (deepcompressor's fuse_when_possible): this layer's input is x / s of the layer
    # named here (itself), and rows [start, start+n) of its output are divided by s of the consumer named
    input_smoothing: str | None = None
    output_smoothing: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def weight_contributions(self) -> list[Contribution]:
        return [c for c in self.contributions if c.adapter.applies_to == "weight"]

    @property
    def bias_contributions(self) -> list[Contribution]:
        return [c for c in self.contributions if c.adapter.applies_to == "bias"]

    @property
    def needs_base(self) -> bool:
        return any(c.adapter.needs_base for c in self.contributions)

    @property
    def smoothed(self) -> bool:
        """Smoothing fused upstream rescales this layer's input columns or some of its output rows."""
        return bool(self.input_smoothing or self.output_smoothing)

    @property
    def has_dense(self) -> bool:
        """Some weight update is taken as a dense ΔW (not low-rank by construction, or too large a rank)."""
        return any(not c.low_rank for c in self.weight_contributions)

    @property
    def added_rank(self) -> int:
        return self.kind.added_rank(self)


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
    svd_rank: int = SVD_RANK
    max_rank: int | None = None  # --max-rank as asked (recorded in the provenance for `verify`)

    @property
    def rank_changed(self) -> bool:
        return self.new_rank != self.model.rank

    def out_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        prefix, _, part = name.rpartition(".")
        layer = self.model.layers.get(prefix)
        if self.rank_changed and layer is not None and part in kind_of(layer).rank_parts:
            return (shape[0], self.new_rank)
        return shape

    def added_bytes(self, base: Mapping[str, TensorInfo]) -> int:
        """How many bytes the output's tensors add to the base's `base` (the low-rank parts grown or shrunk to
        the new rank, each in its own dtype; the layer kinds say which parts carry the rank)."""
        added = 0
        for name, info in base.items():
            shape = self.out_shape(name, info.shape)
            if shape != info.shape:
                added += (math.prod(shape) - math.prod(info.shape)) * info.itemsize
        return added

    def rank_needed(self, op: LayerOp) -> int:
        return rank_needed(op, self.svd_rank)

    def touched_keys(self) -> set[str]:
        out: set[str] = set()
        for p, layer in self.model.layers.items():
            out |= kind_of(layer).touched(layer, self.ops.get(p), self)
        return out


# -- building a plan ----------------------------------------------------------------------------------------------
class _Targets:
    """The family's LoRA module names of this checkpoint, looked up in dotted or kohya underscore form."""

    def __init__(self, model: Model):
        self.segments = model.family.lora_targets(model.layers)
        self._underscore = {name.replace(".", "_"): name for name in self.segments}

    def resolve(self, mod: LoraModule) -> str | None:
        if not mod.underscore and mod.name in self.segments:
            return mod.name
        return self._underscore.get(mod.name.replace(".", "_"))


def build_plan(model: Model, loras: list[LoraFile], *, allow_unmapped: bool = False,
               modulation_mode: str = "calibrated", max_rank: int | None = None, svd_rank: int = SVD_RANK) -> Plan:
    if modulation_mode not in MODULATION_MODES:
        raise MergeError(f"unknown modulation mode {modulation_mode!r}; choose from {', '.join(MODULATION_MODES)}")
    targets = _Targets(model)
    ops: dict[str, LayerOp] = {}
    warnings: list[str] = []
    repeats = find_repeats(loras)
    folded = fold_repeats(loras, repeats, warnings)
    accounts = [KeyAccount(ignored=[(k, folded[li]) for k in lf.ckpt.keys()]) if li in folded else
                _plan_file(li, lf, model, targets, ops, modulation_mode) for li, lf in enumerate(loras)]
    for lf, acc in zip(loras, accounts):
        if acc.unmapped and not allow_unmapped:
            raise UnmappedKeys(f"{lf.name}: {len(acc.unmapped)} of {len(lf.ckpt.keys())} keys cannot be applied: "
                               f"{summarise(acc.unmapped)}. Use --allow-unmapped to merge the rest anyway")
        if acc.unmapped:
            warnings.append(f"{lf.name}: {len(acc.unmapped)} keys not applied (--allow-unmapped): {summarise(acc.unmapped)}")
        if abs(lf.strength) < 1e-8:
            warnings.append(f"{lf.name}: strength 0 — this LoRA changes nothing")
    _detect_shared_down(ops)
    _plan_smoothing(model, ops)
    new_rank = _new_rank(model, ops, max_rank, svd_rank, warnings)
    warnings.extend(_repeat_cost(model, loras, ops, svd_rank, rep) for rep in repeats if not rep.linear)
    return Plan(model, loras, ops, new_rank, accounts, warnings, modulation_mode, svd_rank, max_rank)


def _plan_file(li: int, lf: LoraFile, model: Model, targets: _Targets, ops: dict[str, LayerOp],
               modulation_mode: str) -> KeyAccount:
    """Every key of one LoRA file into applied / ignored / unmapped; the applied ones become contributions."""
    acc = KeyAccount(ignored=list(lf.ignored), unmapped=list(lf.unsupported))
    unresolved: list[str] = []
    resolved = {key: targets.resolve(mod) for key, mod in lf.modules.items()}
    for key, mod in lf.modules.items():
        keys = list(mod.keys.values())
        tname = resolved[key]
        if tname is None:
            unresolved.append(mod.name)
            acc.unmapped.extend((k, "no such layer in this checkpoint") for k in keys)
            continue
        copy_of = redundant_copy(tname, set(resolved.values()), model.family.redundant_copies)
        if copy_of:
            acc.ignored.extend((k, f"a second copy of {copy_of} of the same file (counted once)") for k in keys)
            continue
        segs = targets.segments[tname]
        if modulation_mode == "skip" and any(model.layers[s.target].layout == Layout.AWQ_W4A16 for s in segs):
            acc.ignored.extend((k, "modulation layer left unchanged (--mod skip)") for k in keys)
            continue
        bad = _add_module(li, lf, mod, tname, segs, model, ops)
        if bad:
            acc.unmapped.extend((k, bad) for k in keys)
            continue
        unused = set(mod.leftover.values())
        acc.applied.extend(k for k in keys if k not in unused)
        acc.ignored.extend((k, "alpha of an update that has no rank (unused)") for k in unused)
    if unresolved and len(unresolved) == len(lf.modules):
        other = _foreign_family(unresolved, model.family.name)
        what = f"a {other} LoRA" if other else "made for another model"
        raise UnmappedKeys(f"{lf.name} looks like {what}: none of its {len(lf.modules)} modules exist in this "
                           f"{model.family.title} checkpoint (e.g. {sorted(unresolved)[0]})")
    return acc


def _repeat_cost(model: Model, loras: list[LoraFile], ops: dict[str, LayerOp], svd_rank: int, rep: Repeat) -> str:
    """A file named several times that cannot be folded into one (DoRA): what its extra copies cost in rank."""
    extra = set(rep.members[1:])

    def uniform(keep) -> int:
        added = max((rank_needed(replace(op, contributions=[c for c in op.contributions if keep(c)]), svd_rank)
                     for op in ops.values()), default=0)
        return round16(model.rank + added) if added else model.rank

    with_copies, without = uniform(lambda c: True), uniform(lambda c: c.lora not in extra)
    kinds = ", ".join(sorted({a.title for i in rep.members for mod in loras[i].modules.values() for a in mod.adapters
                              if not a.linear}))
    return (f"{loras[rep.members[0]].name} is given {len(rep.members)} times (strengths {rep.strengths(loras)}) and "
            f"holds {kinds}, which is not linear in strength: merged {len(rep.members)} times, costing "
            f"{with_copies - without} extra rank on each W4A4 layer (uniform rank {with_copies} instead of {without})")


def redundant_copy(tname: str, names: set[str | None], copies: dict[str, tuple[str, ...]]) -> str | None:
    """The split modules a fused module `tname` duplicates when the file holds all of them (None: it does not)."""
    for fused, split in copies.items():
        if tname.endswith(fused):
            stem = tname[: -len(fused)]
            if all(stem + part in names for part in split):
                return ", ".join(stem + part for part in split)
    return None


def _foreign_family(names: list[str], own: str) -> str | None:
    votes: Counter = Counter()
    for n in names:
        for fam, pats in FOREIGN_SIGNATURES.items():
            if any(re.search(p, n) for p in pats):
                votes[fam] += 1
        for f in FAMILIES:
            if f.name != own and any(re.search(p, n) for p in f.signatures):
                votes[f.title] += 1
    if votes:
        fam, n = votes.most_common(1)[0]
        if n >= max(1, len(names) // 2):
            return fam
    return None


def summarise(keys: list[tuple[str, str]], limit: int = 8) -> str:
    c = Counter(f"{pattern(k)} ({why})" for k, why in keys)
    items = [f"{p} x{n}" for p, n in c.most_common(limit)]
    more = len(c) - limit
    return "; ".join(items) + (f"; ... {more} more patterns" if more > 0 else "")


def _check_shape(lf: LoraFile, mod: LoraModule, a: Adapter, tname: str, rows: int, layer: Layer) -> None:
    """The update must have the target's shape: (rows, in) for a weight, (rows,) for a bias or a 1-D weight."""
    vector = a.applies_to == "bias" or layer.layout == Layout.VECTOR
    want = (rows,) if vector else (rows, layer.in_features)
    got = tuple(a.shape)
    if got == want:
        return
    if len(got) == 2 and len(want) == 2 and a.rank is not None:
        raise ShapeMismatch(f"{lf.name}: module {mod.name} is {got[0]}x{got[1]} (out x in) but checkpoint layer "
                            f"{tname} expects {want[0]}x{want[1]}: the LoRA was made for a different model size")
    raise ShapeMismatch(f"{lf.name}: {', '.join(a.keys.values())} has shape {got}, layer {tname} needs {want}")


def _add_module(li: int, lf: LoraFile, mod: LoraModule, tname: str, segs: list[Segment], model: Model,
                ops: dict[str, LayerOp]) -> str | None:
    """Register the module's contributions; returns a reason string if it cannot be applied."""
    first = model.layers[segs[0].target]
    for a in mod.adapters:
        _check_shape(lf, mod, a, tname, sum(s.rows for s in segs), first)
    if not mod.adapters:
        return "alpha without LoRA weights" if "alpha" in mod.leftover else "no update in this module"
    by_target: dict[str, list[Segment]] = defaultdict(list)
    for s in segs:
        by_target[s.target].append(s)
    for target in by_target:
        layer = model.layers[target]
        reason = next((r for a in mod.adapters if (r := kind_of(layer).refuse(layer, a))), None)
        if reason:
            return reason
    for target, tsegs in by_target.items():
        layer = model.layers[target]
        kind = kind_of(layer)
        op = ops.setdefault(target, LayerOp(layer, kind))
        limit = kind.max_exact_rank(layer, model.rank)
        op.contributions.extend(Contribution(li, mod.name, a, tsegs, exact=a.rank is None or a.rank <= limit)
                                for a in mod.adapters)
    return None


def _detect_shared_down(ops: dict[str, LayerOp]) -> None:
    """q/k/v (or w3/w1) LoRAs trained with one shared A: append that A once, with the B's stacked. Members
    pair when they come from one file, have the same rank, land on different rows and have bit-identical
    down factors (`Adapter.down_identity`, read once each)."""
    for op in ops.values():
        low = [(i, c) for i, c in enumerate(op.contributions) if c.low_rank]
        if len(low) < 2:
            continue
        ident: dict[int, bytes | None] = {}
        for n, (i, c) in enumerate(low):
            for j, d in low[:n]:
                if d.shares_down_with is not None or d.lora != c.lora or d.rank != c.rank:
                    continue
                if any(s.target_start == t.target_start for s in c.segments for t in d.segments):
                    continue
                for k, member in ((i, c), (j, d)):
                    if k not in ident:
                        ident[k] = member.adapter.down_identity()
                if ident[i] is not None and ident[i] == ident[j]:
                    c.shares_down_with = j
                    break


def _new_rank(model: Model, ops: dict[str, LayerOp], max_rank: int | None, svd_rank: int,
              warnings: list[str]) -> int:
    """One uniform rank: the base's plus the largest exact LoRA part of a layer (or the SVD budget of dense
    updates), a multiple of 16; capped by --max-rank, refused above the kernel's limit (a file no loader can
    build), with --max-rank as the way out."""
    if svd_rank % 16 or svd_rank <= 0:
        raise MergeError(f"--svd-rank must be a positive multiple of 16, got {svd_rank}")
    added = max((rank_needed(op, svd_rank) for op in ops.values()), default=0)
    new_rank = round16(model.rank + added) if added else model.rank
    dense = sorted(p for p, op in ops.items() if op.has_dense and op.kind.dense_rank(op, svd_rank))
    if dense:
        warnings.append(f"{len(dense)} W4A4 layers take updates that are not low-rank ({_dense_kinds(ops, dense)}): "
                        f"stored by truncated SVD in the rank the uniform rank leaves them (at least "
                        f"{min(svd_rank, (max_rank or 1 << 30) - model.rank)}; --svd-rank sets it); the captured "
                        f"fraction of each is reported")
    if max_rank is not None:
        if max_rank % 16 or max_rank <= model.rank:
            raise MergeError(f"--max-rank must be a multiple of 16 above the base rank {model.rank}, got {max_rank}")
        if max_rank > MAX_RANK:
            raise MergeError(f"--max-rank {max_rank} is above Nunchaku's limit of {MAX_RANK} (no loader can build such "
                             f"a file); give at most {MAX_RANK}")
        if new_rank > max_rank:
            warnings.append(f"rank capped at {max_rank} (exact merge needs {new_rank}): layers whose LoRA part exceeds "
                            f"rank {max_rank - model.rank} keep its top singular directions; see the per-layer error")
            new_rank = max_rank
        return new_rank
    if new_rank > MAX_RANK:
        raise MergeError(f"the merged rank would be {new_rank}, above Nunchaku's limit of {MAX_RANK}; "
                         "merge fewer or lower-rank LoRAs, or cap it with --max-rank (lossy, reported per layer)")
    return new_rank


def _dense_kinds(ops: dict[str, LayerOp], names: list[str]) -> str:
    return ", ".join(sorted({c.adapter.title for p in names for c in ops[p].weight_contributions if not c.low_rank}))


def _plan_smoothing(model: Model, ops: dict[str, LayerOp]) -> None:
    """Layers whose smoothing deepcompressor fused upstream (smooth_factor all ones, smooth_factor_orig = s)
    see the input x / s, and the rows that produce their input hold their true output divided by s (the
    V rows of the q/k/v projections for an attention output). Merged exactly as docs/format.md §7
    says: A' = A·diag(s) on the layer, B' = diag(1/s)·B (and Δb / s) on the producer rows. Where the family
    does not know the producers, refuse rather than merge silently wrong."""
    for p in sorted(model.fused_smoothing):
        producers = model.family.smoothing_producers(p, model.layers)
        if producers is None:
            if p in ops:
                raise MergeError(f"layer {p} has its smoothing fused upstream (smooth_factor all ones, "
                                 "smooth_factor_orig not) into layers this tool cannot identify, so a LoRA cannot be "
                                 "merged into it exactly; nothing was written")
            continue
        if p in ops:
            ops[p].input_smoothing = p
        for seg in producers:
            if seg.target in ops:
                _add_output_smoothing(model, ops[seg.target], seg, p)


def _add_output_smoothing(model: Model, op: LayerOp, seg: Segment, consumer: str) -> None:
    for start, rows, other in op.output_smoothing:
        if (start, rows) == (seg.target_start, seg.rows):
            if model.smoothing_bytes(other) != model.smoothing_bytes(consumer):
                raise MergeError(f"rows {start}:{start + rows} of {op.layer.prefix} feed {other} and {consumer}, whose "
                                 "fused smoothing vectors differ: the checkpoint is inconsistent; nothing was written")
            return
    op.output_smoothing.append((seg.target_start, seg.rows, consumer))


# -- the output's metadata ----------------------------------------------------------------------------------------
def updated_metadata(plan: Plan, provenance: dict) -> dict[str, str]:
    meta = dict(plan.model.metadata)
    if plan.rank_changed:
        meta["quantization_config"] = _set_rank(meta.get("quantization_config"), plan.model.rank, plan.new_rank)
    meta["qwenlora_merge"] = json.dumps(provenance, separators=(",", ":"))
    return meta


def _set_rank(raw: str | None, old: int, new: int) -> str:
    if raw is None:
        return json.dumps({"method": "svdquant", "rank": new})
    want = json.loads(raw)
    had_manifest = "runtime_manifest" in want
    want["rank"] = new
    man = want.get("runtime_manifest")
    if isinstance(man, dict):
        for t in man.get("targets", []) or []:
            if isinstance(t, dict) and "rank" in t:
                t["rank"] = new
        req = man.get("requirements")
        if isinstance(req, dict) and "rank" in req:
            req["rank"] = new
    if not had_manifest:  # keep the original text byte for byte except the number, when that is unambiguous
        cand = re.sub(r'("rank"\s*:\s*)' + str(old) + r"\b", lambda m: m.group(1) + str(new), raw)
        try:
            if json.loads(cand) == want:
                return cand
        except json.JSONDecodeError:
            pass
    return json.dumps(want)

"""SVDQ W4A4 layers (int4 and nvfp4): the LoRA is appended to the 16-bit low-rank branch `proj_down` /
`proj_up`, which reads the raw layer input, so the merge is exact up to 16-bit storage. Every W4A4 layer gets
the plan's one uniform rank (zero-padded), with or without a LoRA; qweight, wscales and smoothing stay
untouched; bias deltas go into the bias in pack_scale order."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..layout import Layout
from .base import LayerKind

if TYPE_CHECKING:
    import torch

    from ..factors import Factors
    from ..layout import Layer
    from ..planner import LayerOp, Plan
    from . import MergeContext, VerifyContext

LOWRANK_TOL = 1e-2  # verify: the appended branch is exact up to 16-bit storage


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


class LowRankAppend(LayerKind, layouts=(Layout.SVDQ_INT4, Layout.SVDQ_NVFP4)):
    name = "lowrank_append"
    takes_dense = False
    plot_label = "W4A4 low-rank rel. error"

    @classmethod
    def added_rank(cls, op: LayerOp) -> int:
        return sum(c.rank for c in op.contributions if c.low_rank and c.shares_down_with is None)

    @classmethod
    def touched(cls, layer: Layer, op: LayerOp | None, plan: Plan) -> set[str]:
        out = {layer.key("proj_down"), layer.key("proj_up")} if op is not None or plan.rank_changed else set()
        return out | ({layer.key("bias")} if op is not None and op.bias_contributions else set())

    @classmethod
    def apply(cls, ctx: MergeContext, plan: Plan, layer: Layer, op: LayerOp | None):
        """Append (exact), zero-pad to the plan's rank; if the LoRA part does not fit (--max-rank) it is
        replaced by its best approximation of the rank that fits. The base's packed tiles are moved, never
        unpacked (codecs.lowrank.append_packed)."""
        from ..codecs.lowrank import append_packed

        pd, pu = ctx.base.get(layer.key("proj_down")), ctx.base.get(layer.key("proj_up"))
        d_add = u_add = rec = None
        if op is not None and cls.added_rank(op):
            d_add, u_add, rec = _lowrank_part(op, pd.dtype, plan.new_rank - pd.shape[1])
        out = {}
        if plan.new_rank != pd.shape[1]:
            out = {layer.key("proj_down"): append_packed(pd, d_add, down=True, rank=plan.new_rank),
                   layer.key("proj_up"): append_packed(pu, u_add, down=False, rank=plan.new_rank)}
        if op is not None and op.bias_contributions:
            out[layer.key("bias")], norm = _new_bias(ctx, layer, op)
            rec = (rec or {}) | {"bias_delta_norm": norm}
        return out, rec

    @classmethod
    def verify(cls, ctx: VerifyContext, plan: Plan, layer: Layer, op: LayerOp | None) -> dict:
        from ..codecs import layer_codec
        from .deltas import lowrank_factors

        p = layer.prefix
        probs = [f"{part} changed" for part in layer_codec(layer.layout).weight_parts
                 if layer.key(part) in ctx.base and not ctx.unchanged(layer.key(part))]
        rec: dict = {"layer": p, "kind": cls.name}
        f = lowrank_factors(op) if op is not None else None
        if f is None:
            rec["targeted"] = False
            if not _branch_kept(ctx, layer, extra_zero=True):
                probs.append("low-rank branch changed although no LoRA targets this layer")
        else:
            rec["rel_error"], moved = _appended_error(ctx, layer, f)
            if moved:
                probs.append("the base low-rank branch was altered")
            if rec["rel_error"] > LOWRANK_TOL:
                probs.append(f"low-rank error {rec['rel_error']:.3g} > {LOWRANK_TOL}")
        if layer.has_bias and not _bias_ok(ctx, layer, op):
            probs.append("bias differs from base + bias delta")
        return rec | {"ok": not probs, "problems": probs}


# -- merging ----------------------------------------------------------------------------------------------------
def _lowrank_part(op: LayerOp, dtype: torch.dtype, room: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The appended (down, up) in the checkpoint dtype, rank a multiple of 16, and the layer's record."""
    import torch

    from ..factors import PROBES, check_finite, lowrank_error, truncate
    from .deltas import lowrank_factors

    rank = LowRankAppend.added_rank(op)
    direct = _direct_parts(op, dtype, _round16(rank)) if rank <= room else None
    if direct is not None:  # the common case: no fp32 factors at all
        d_add, u_add, err = direct
        return check_finite(op.layer.prefix, d_add), check_finite(op.layer.prefix, u_add), \
            {"rel_error": err, "rank_added": rank}
    ideal = lowrank_factors(op)
    f, dropped = truncate(ideal, room) if ideal.rank > room else (ideal, 0.0)
    r = f.rank
    d_add = torch.zeros(_round16(r), op.layer.in_features, dtype=dtype)
    u_add = torch.zeros(op.layer.out_features, _round16(r), dtype=dtype)
    d_add[:r].copy_(check_finite(op.layer.prefix, f.down))
    u_add[:, :r].copy_(check_finite(op.layer.prefix, f.up))
    stored = (u_add.float(), d_add.float()) if dropped else (u_add, d_add)
    err, _ = lowrank_error(*stored, ideal, n_probes=0 if dropped else PROBES)
    rec = {"rel_error": err, "rank_added": ideal.rank}
    if dropped:
        rec |= {"rank_kept": r, "truncation_error": dropped}
    return d_add, u_add, rec


def _direct_parts(op: LayerOp, dtype: torch.dtype, used: int):
    """The LoRA part built straight in the checkpoint's dtype: down (used, I) and up (O, used), zero past the
    LoRA rank, with its estimated error. Each stored value is rounded once, exactly as the fp32 route rounds
    it, without fp32 temporaries. Only for adapters stored in the checkpoint's dtype (`factors_in`) with no
    down factor shared between members (shared ones sum up columns: that takes the fp32 route)."""
    import torch

    low = [c for c in op.contributions if c.low_rank]
    if any(c.shares_down_with is not None for c in low):
        return None
    parts = [c.adapter.factors_in(dtype) for c in low]
    if any(p is None for p in parts):
        return None
    lay = op.layer
    down = torch.zeros(used, lay.in_features, dtype=dtype)
    up = torch.zeros(lay.out_features, used, dtype=dtype)
    j = 0
    for c, (d, u) in zip(low, parts):
        down[j:j + c.rank] = d
        for sg in c.segments:
            up[sg.target_start:sg.target_start + sg.rows, j:j + c.rank] = u[sg.lora_start:sg.lora_start + sg.rows]
        j += c.rank
    return down, up, _direct_error(down, up, low)


def _direct_error(down: torch.Tensor, up: torch.Tensor, low: list) -> float:
    """The probe estimate of the error for _direct_parts: zero when no factor was rounded; otherwise the
    stored part against the exact factors, seen on fixed input directions."""
    import torch

    from ..factors import PROBES, probe_rows, probes, relative

    if all(c.adapter.factors_exact_in_storage for c in low):
        return 0.0
    omega = probes(down.shape[1], PROBES)
    u = up[probe_rows(up.shape[0])].float()
    ideal = torch.cat([c.adapter.factors().down @ omega for c in low])
    return relative(u @ (down.float() @ omega), u[:, :ideal.shape[0]] @ ideal)[0]


def _new_bias(ctx: MergeContext, layer: Layer, op: LayerOp) -> tuple[torch.Tensor, float]:
    from ..codecs.svdq_scales import PackedVector
    from ..factors import check_finite
    from .deltas import bias_delta

    db = bias_delta(op)
    b = ctx.base.get(layer.key("bias"))
    new = PackedVector.unpack(b).float() + db
    return PackedVector.pack(check_finite(layer.key("bias"), new).to(b.dtype)), float(db.norm())


# -- verifying --------------------------------------------------------------------------------------------------
def _branches(ctx: VerifyContext, layer: Layer):
    from ..codecs.lowrank import LowRankDown, LowRankUp

    def unpack(ck):
        return (LowRankDown.unpack(ck.get(layer.key("proj_down"))).float(),
                LowRankUp.unpack(ck.get(layer.key("proj_up"))).float())

    return unpack(ctx.base), unpack(ctx.merged)


def _branch_kept(ctx: VerifyContext, layer: Layer, extra_zero: bool) -> bool:
    """Whether the merged branch starts with the base branch unchanged (and, with extra_zero, adds nothing)."""
    import torch

    (d0, u0), (d1, u1) = _branches(ctx, layer)
    r0 = d0.shape[0]
    same = d1.shape[0] >= r0 and torch.equal(d1[:r0], d0) and torch.equal(u1[:, :r0], u0)
    if same and extra_zero and d1.shape[0] > r0:
        same = not bool((u1[:, r0:] @ d1[r0:]).abs().max() > 0)
    return same


def _appended_error(ctx: VerifyContext, layer: Layer, f: Factors) -> tuple[float, bool]:
    """(relative error of the appended part against the LoRA's factors, whether the base part moved)."""
    import torch

    from ..factors import Factors, lowrank_error

    (d0, u0), (d1, u1) = _branches(ctx, layer)
    r0 = d0.shape[0]
    if d1.shape[0] >= r0 and torch.equal(d1[:r0], d0) and torch.equal(u1[:, :r0], u0):
        return lowrank_error(u1[:, r0:], d1[r0:], f)[0], False
    both = Factors(torch.cat([d0, f.down], 0), torch.cat([u0, f.up], 1))  # compare whole branches
    return lowrank_error(u1, d1, both)[0], True


def _bias_ok(ctx: VerifyContext, layer: Layer, op: LayerOp | None) -> bool:
    import torch

    from ..codecs.svdq_scales import PackedVector
    from .deltas import bias_delta

    key = layer.key("bias")
    db = bias_delta(op) if op is not None else None
    b0, b1 = PackedVector.unpack(ctx.base.get(key)).float(), PackedVector.unpack(ctx.merged.get(key)).float()
    want = b0 if db is None else (b0 + db).to(ctx.base.get(key).dtype).float()
    return torch.allclose(b1, want, rtol=1e-2, atol=1e-3 * (1 + float(want.abs().max())))

"""SVDQ W4A4 layers (int4 and nvfp4): the LoRA is appended to the 16-bit low-rank branch `proj_down` /
`proj_up`, which reads the raw layer input, so the merge is exact up to 16-bit storage. Every W4A4 layer gets
the plan's one uniform rank (zero-padded), with or without a LoRA; qweight, wscales and smoothing stay
untouched; bias deltas go into the bias in pack_scale order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ..errors import ExportError, MergeError
from ..layout import MAX_RANK, Layer, Layout, round16
from .base import LayerKind, count_layers, is_qweight, keep_freed_memory

if TYPE_CHECKING:
    import torch

    from ..engine import OutTensor
    from ..export.transform import LayerSources
    from ..export.tree import TreeBuilder
    from ..factors import Factors
    from ..planner import LayerOp, Plan
    from ..st_reader import TensorInfo
    from . import MergeContext, VerifyContext

LOWRANK_TOL = 1e-2  # verify: the appended branch is exact up to 16-bit storage
# the parameters of diffusers' SVDQW4A4Linear (quantizers/nunchaku/utils.py); smooth_factor_orig has none: dropped
EXPORT_PARTS = frozenset({"qweight", "wscales", "bias", "smooth_factor", "proj_down", "proj_up", "wcscales",
                          "wtscale"})
ROW_TILE = 128  # a packed qweight's outermost tile holds 128 output rows: whole tiles are whole rows on disk


class LowRankAppend(LayerKind, layouts=(Layout.SVDQ_INT4, Layout.SVDQ_NVFP4)):
    name = "lowrank_append"
    plot_label = "W4A4 low-rank rel. error"
    plot_limit = LOWRANK_TOL
    rank_parts = ("proj_down", "proj_up")

    @classmethod
    def detect(cls, path: str, tensors: Mapping[str, TensorInfo], prefix: str, part: str, info: TensorInfo
               ) -> Layer | None:
        """An int8 `qweight` (two 4-bit codes a byte) with its low-rank branch; fp8 wscales tell nvfp4 from int4."""
        down, up = tensors.get(f"{prefix}.proj_down"), tensors.get(f"{prefix}.proj_up")
        wscales = tensors.get(f"{prefix}.wscales")
        if not is_qweight(path, tensors, part, info, "I8", ("qweight", "proj_down", "proj_up")):
            return None
        if down is None or up is None or wscales is None:
            raise MergeError(f"{path}: SVDQ layer {prefix} lacks proj_down/proj_up/wscales")
        layout = Layout.SVDQ_NVFP4 if wscales.dtype.startswith("F8") else Layout.SVDQ_INT4
        out_features, in_features = info.shape[0], info.shape[1] * 2
        if down.shape != (in_features, down.shape[1]) or up.shape != (out_features, down.shape[1]):
            raise MergeError(f"{path}: {prefix} has inconsistent proj_down/proj_up shapes")
        return Layer(prefix, layout, in_features, out_features, f"{prefix}.bias" in tensors, rank=down.shape[1],
                     dtype=down.dtype)

    @classmethod
    def max_exact_rank(cls, layer: Layer, base_rank: int) -> int:
        """A factorization of rank at least half the layer's smaller side saves nothing over the dense ΔW (and
        one above the kernel's limit cannot load): such updates go in by truncated SVD, like a full diff."""
        return min(MAX_RANK - base_rank, min(layer.in_features, layer.out_features) // 2)

    @classmethod
    def added_rank(cls, op: LayerOp) -> int:
        return sum(c.rank for c in op.contributions if c.low_rank and c.shares_down_with is None)

    @classmethod
    def dense_rank(cls, op: LayerOp, svd_rank: int) -> int:
        return max(svd_rank, cls.added_rank(op)) if op.has_dense else 0

    @classmethod
    def touched(cls, layer: Layer, op: LayerOp | None, plan: Plan) -> set[str]:
        out = {layer.key(part) for part in cls.rank_parts} if op is not None or plan.rank_changed else set()
        return out | ({layer.key("bias")} if op is not None and op.bias_contributions else set())

    @classmethod
    def export_outputs(cls, tree: TreeBuilder, layer: Layer, names: list[str]) -> None:
        """Each diffusers part (a row range: to_q/to_k/to_v of a fused qkv) takes its rows of the per-output tensors,
        cut in packed space; the per-input ones (smooth_factor, proj_down) are shared; nvfp4 gets wcscales and
        wtscale in the compute dtype (ones where the file has none); an activation shift goes into the bias."""
        parts = tree.parts_by_name(layer, names, EXPORT_PARTS | {"smooth_factor_orig"})
        if layer.layout != Layout.SVDQ_NVFP4 and ({"wcscales", "wtscale"} & set(parts)):
            raise ExportError(f"int4 layer {layer.prefix} carries wcscales/wtscale, which diffusers' int4 module has "
                              "no parameter for; nothing was written")
        for index, part in enumerate(tree.parts_of(layer)):
            tree.target("svdq_w4a4", layer, index, part.name)
            _export_part(tree, layer, parts, part.name, (part.start, part.stop))

    @classmethod
    def export_tensor(cls, sources: LayerSources, out: OutTensor, tensor: torch.Tensor | None) -> torch.Tensor:
        from ..codecs.lowrank import up_rows
        from ..codecs.svdq_scales import vector_rows, wscales_rows
        from ..codecs.svdq_weight import qweight_rows

        cuts = {"qweight_rows": qweight_rows, "wscales_rows": wscales_rows, "vector_rows": vector_rows,
                "up_rows": up_rows}
        if out.op in cuts:
            return cuts[out.op](tensor, *out.rows)
        if out.op == "shifted_bias":
            shift = sources.family.activation_shift(sources.layer)
            return vector_rows(sources.derived("#shifted_bias", lambda: shifted_bias(sources, shift)), *out.rows)
        if out.op == "wtscale":
            return tensor.reshape(1)
        return super().export_tensor(sources, out, tensor)

    @classmethod
    def apply(cls, ctx: MergeContext, plan: Plan, layer: Layer, op: LayerOp | None):
        """Append (exact), zero-pad to the plan's rank; if the LoRA part does not fit (--max-rank) it is
        replaced by its best approximation of the rank that fits. The base's packed tiles are moved, never
        unpacked (codecs.lowrank.append_packed)."""
        from ..codecs.lowrank import append_packed

        pd, pu = ctx.base.get(layer.key("proj_down")), ctx.base.get(layer.key("proj_up"))
        d_add = u_add = rec = None
        if op is not None and op.has_dense:
            if ctx.device == "cpu":
                ctx.shared("heap_kept", keep_freed_memory)
            with ctx.all_threads():  # O x I products and a randomized SVD: every thread helps
                d_add, u_add, rec = _svd_part(ctx, op, pd.dtype, plan.new_rank - pd.shape[1])
        elif op is not None and cls.added_rank(op):
            d_add, u_add, rec = _lowrank_part(ctx, op, pd.dtype, plan.new_rank - pd.shape[1])
        out = {}
        if plan.new_rank != pd.shape[1]:
            out = {layer.key("proj_down"): append_packed(pd, d_add, down=True, rank=plan.new_rank),
                   layer.key("proj_up"): append_packed(pu, u_add, down=False, rank=plan.new_rank)}
        if op is not None and op.bias_contributions:
            out[layer.key("bias")], norm = _new_bias(ctx, layer, op)
            rec = (rec or {}) | {"bias_delta_norm": norm}
        return out, rec

    @classmethod
    def summarize(cls, records: list[dict]) -> dict:
        """The exact layers' error; apart from them, the layers truncated by the rank cap (their dropped
        fraction) and those stored by truncated SVD (their captured fraction)."""
        exact = [r for r in records if not r.get("svd") and "truncation_error" not in r]
        out = super().summarize(exact) | {"layers": len(records)}
        out["exact_layers"] = sum("rel_error" in r for r in exact)
        out["exact_out_of_tolerance"] = sum(r.get("rel_error", 0) > LOWRANK_TOL for r in exact)
        cut = [r for r in records if "truncation_error" in r]
        if cut:
            dropped = sorted(r["truncation_error"] for r in cut)
            out["truncated"] = {"layers": len(cut), "rank_kept": min(r["rank_kept"] for r in cut),
                                "dropped_max": dropped[-1], "dropped_median": dropped[len(dropped) // 2],
                                "rel_error_max": max(r["rel_error"] for r in cut)}
        svd = [r for r in records if r.get("svd")]
        if svd:
            c = sorted(r["captured"] for r in svd)
            out["svd"] = {"layers": len(svd), "captured_min": c[0], "captured_median": c[len(c) // 2],
                          "rel_error_max": max(r["rel_error"] for r in svd)}
        return out

    @classmethod
    def render_summary(cls, d: dict) -> str | None:
        parts = []
        if d.get("rel_error_max") is not None:
            exact, bad = d.get("exact_layers", d["layers"]), d.get("exact_out_of_tolerance", 0)
            verdict = f"{bad} of {exact} OUT OF TOLERANCE" if bad else f"{exact} exact up to 16-bit storage"
            parts.append(f"{verdict} (rel. error max {d['rel_error_max']:.2e}, tolerance {LOWRANK_TOL:g})")
        if "truncated" in d:
            cut = d["truncated"]
            parts.append(f"{cut['layers']} truncated by the rank cap to their best rank-{cut['rank_kept']} "
                         f"approximation, dropping {cut['dropped_max']:.3f} (max) / {cut['dropped_median']:.3f} "
                         f"(median) of ||dW|| (rel. error max {cut['rel_error_max']:.3f})")
        if "svd" in d:
            s = d["svd"]
            parts.append(f"{s['layers']} by truncated SVD, captured {s['captured_min']:.3f} (min) / "
                         f"{s['captured_median']:.3f} (median) of ||dW||")
        return f"fidelity {cls.name} {count_layers(d['layers'])}: " + ("; ".join(parts) or "bias only")

    @classmethod
    def render_layer(cls, rec: dict) -> str:
        if "truncation_error" in rec:
            return (f"truncated to rank {rec['rank_kept']} by the rank cap: dropped {rec['truncation_error']:.3f} of "
                    f"||dW||, rel. error {rec['rel_error']:.3f}")
        if rec.get("svd"):
            return f"truncated SVD: captured {rec['captured']:.3f} of ||dW||, rel. error {rec['rel_error']:.3f}"
        return f"exact: rel. error {rec['rel_error']:.2e}" if "rel_error" in rec else "bias only"

    @classmethod
    def plot_point(cls, rec: dict) -> tuple[str, float, float | None] | None:
        """Exact layers against the 16-bit tolerance; truncated ones against the best their rank allows."""
        if "rel_error" not in rec:
            return None
        if "truncation_error" in rec:
            return "truncated by the rank cap", rec["rel_error"], rec["truncation_error"] + LOWRANK_TOL
        if rec.get("svd") and "captured_best" in rec:
            best = max(0.0, 1 - rec["captured_best"] ** 2) ** 0.5
            return "truncated SVD", rec["rel_error"], best + LOWRANK_TOL
        return "exact", rec["rel_error"], LOWRANK_TOL

    @classmethod
    def verify(cls, ctx: VerifyContext, plan: Plan, layer: Layer, op: LayerOp | None) -> dict:
        from ..codecs import layer_codec
        from .deltas import lowrank_factors

        p = layer.prefix
        probs = [f"{part} changed" for part in layer_codec(layer.layout).weight_parts
                 if layer.key(part) in ctx.base and not ctx.unchanged(layer.key(part))]
        rec: dict = {"layer": p, "kind": cls.name}
        if op is None or not op.weight_contributions:
            if not _branch_kept(ctx, layer, extra_zero=True):
                probs.append("low-rank branch changed although no LoRA targets this layer")
        elif op.has_dense:
            rec |= _svd_figures(ctx, layer, op, probs)
        else:
            rec |= _appended_figures(ctx, layer, lowrank_factors(op, ctx.base), plan, probs)
        if layer.has_bias and not _bias_ok(ctx, layer, op):
            probs.append("bias differs from base + bias delta")
        return rec | {"ok": not probs, "problems": probs}


# -- merging ----------------------------------------------------------------------------------------------------
def _lowrank_part(ctx: MergeContext, op: LayerOp, dtype: torch.dtype, room: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The appended (down, up) in the checkpoint dtype, rank a multiple of 16, and the layer's record."""
    import torch

    from ..factors import PROBES, check_finite, lowrank_error, truncate
    from .deltas import lowrank_factors

    rank = LowRankAppend.added_rank(op)
    direct = _direct_parts(op, dtype, round16(rank)) if rank <= room and not op.smoothed else None
    if direct is not None:  # the common case: no fp32 factors at all
        d_add, u_add, err = direct
        return check_finite(op.layer.prefix, d_add), check_finite(op.layer.prefix, u_add), \
            {"rel_error": err, "rank_added": rank}
    ideal = lowrank_factors(op, ctx.base)
    f, dropped = truncate(ideal, room) if ideal.rank > room else (ideal, 0.0)
    r = f.rank
    d_add = torch.zeros(round16(r), op.layer.in_features, dtype=dtype)
    u_add = torch.zeros(op.layer.out_features, round16(r), dtype=dtype)
    d_add[:r].copy_(check_finite(op.layer.prefix, f.down))
    u_add[:, :r].copy_(check_finite(op.layer.prefix, f.up))
    stored = (u_add.float(), d_add.float()) if dropped else (u_add, d_add)
    err, _ = lowrank_error(*stored, ideal, n_probes=0 if dropped else PROBES)
    rec = {"rel_error": err, "rank_added": ideal.rank}
    if dropped:
        rec |= {"rank_kept": r, "truncation_error": dropped}
    return d_add, u_add, rec


def _svd_part(ctx: MergeContext, op: LayerOp, dtype: torch.dtype, room: int):
    """A layer whose LoRA part is not low-rank by construction (a full diff, DoRA, a LoKr/LoHa of too large a
    rank): its whole ΔW (the exact parts included) by truncated SVD to the room the uniform rank leaves, with
    the captured fraction ‖ΔW_k‖/‖ΔW‖ and the error of what is stored."""
    import torch

    from ..factors import check_finite, dense_error, svd_truncate
    from .deltas import dense_delta

    base = effective_weight(ctx.base, op.layer, ctx.device) if op.needs_base else None
    dw = check_finite(op.layer.prefix, dense_delta(op, ctx.device, base=base, ck=ctx.base))
    del base  # an O x I array no longer needed while the SVD runs
    f, captured = svd_truncate(dw, room)
    d_add = torch.zeros(round16(room), op.layer.in_features, dtype=dtype)
    u_add = torch.zeros(op.layer.out_features, round16(room), dtype=dtype)
    d_add[:f.rank].copy_(check_finite(op.layer.prefix, f.down))
    u_add[:, :f.rank].copy_(check_finite(op.layer.prefix, f.up))
    rec = {"rel_error": dense_error(u_add[:, :f.rank].float(), d_add[:f.rank].float(), dw), "captured": captured,
           "rank_added": room, "svd": True,
           "adapters": sorted({c.adapter.name for c in op.weight_contributions if not c.low_rank})}
    return d_add, u_add, rec


def effective_weight(ck, layer: Layer, device: str = "cpu") -> torch.Tensor:
    """The layer's whole weight W_eff = main · diag(1/smooth) + U·D (fp32, (O, I)), what it applies to its raw
    input: dequantizing it costs one unpack of the 4-bit codes and an O×I product (DoRA needs its row norms).
    Computed on `device` (the packed tensors go there, a quarter of the fp32 result's size)."""
    from ..codecs import layer_codec
    from ..codecs.lowrank import LowRankDown, LowRankUp
    from ..codecs.svdq_scales import PackedVector

    codec = layer_codec(layer.layout)
    t = {p: ck.get(layer.key(p)).to(device) for p in codec.weight_parts if layer.key(p) in ck}
    main = codec.dequantize(t).div_(PackedVector.unpack(t["smooth_factor"]).float()[None, :])
    d = LowRankDown.unpack(ck.get(layer.key("proj_down")).to(device)).float()
    u = LowRankUp.unpack(ck.get(layer.key("proj_up")).to(device)).float()
    return main.addmm_(u, d)


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
        c.place_onto(up[:, j:j + c.rank], u)
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

    db = bias_delta(op, ctx.base)
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


def _appended_figures(ctx: VerifyContext, layer: Layer, factors: Factors, plan: Plan, probs: list[str]) -> dict:
    """The appended part against the LoRA's factors; where the plan's rank cap left less room than the LoRA's
    rank, against the best approximation of that rank (what the merge stores), with the fraction dropped."""
    from ..factors import truncate

    rec: dict = {}
    rec["rel_error"], moved = _appended_error(ctx, layer, factors)
    if moved:
        probs.append("the base low-rank branch was altered")
    room = plan.new_rank - plan.model.rank
    if factors.rank <= room:
        if rec["rel_error"] > LOWRANK_TOL:
            probs.append(f"low-rank error {rec['rel_error']:.3g} > {LOWRANK_TOL}")
        return rec
    rec["rank_kept"], rec["truncation_error"] = room, truncate(factors, room)[1]
    if rec["rel_error"] > rec["truncation_error"] + LOWRANK_TOL:
        probs.append(f"low-rank error {rec['rel_error']:.3g} above the best rank-{room} error "
                     f"{rec['truncation_error']:.3g} + {LOWRANK_TOL}")
    return rec


def _svd_figures(ctx: VerifyContext, layer: Layer, op: LayerOp, probs: list[str]) -> dict:
    """A layer stored by truncated SVD: the stored part's error and captured fraction, against the best that
    its rank allows (an exact SVD of the same ΔW)."""
    import torch

    from ..factors import dense_error, svd_truncate
    from .deltas import dense_delta

    dw = dense_delta(op, base=effective_weight(ctx.base, layer) if op.needs_base else None, ck=ctx.base)
    (d0, u0), (d1, u1) = _branches(ctx, layer)
    r0 = d0.shape[0]
    if not (torch.equal(d1[:r0], d0) and torch.equal(u1[:, :r0], u0)):
        probs.append("the base low-rank branch was altered")
    u, d = u1[:, r0:], d1[r0:]
    err = dense_error(u, d, dw)
    ref2 = float((dw.double() ** 2).sum())
    captured = (float(((u.double().T @ u.double()) * (d.double() @ d.double().T)).sum()) / ref2) ** 0.5 if ref2 else 1.0
    best = svd_truncate(dw, u.shape[1])[1]
    floor = max(0.0, 1 - best * best) ** 0.5
    if err > floor + LOWRANK_TOL:
        probs.append(f"truncated-SVD error {err:.3g} above the best rank-{u.shape[1]} error {floor:.3g} + {LOWRANK_TOL}")
    return {"rel_error": err, "captured": captured, "captured_best": best, "svd": True}


def _bias_ok(ctx: VerifyContext, layer: Layer, op: LayerOp | None) -> bool:
    import torch

    from ..codecs.svdq_scales import PackedVector
    from .deltas import bias_delta

    key = layer.key("bias")
    db = bias_delta(op, ctx.base) if op is not None else None
    b0, b1 = PackedVector.unpack(ctx.base.get(key)).float(), PackedVector.unpack(ctx.merged.get(key)).float()
    want = b0 if db is None else (b0 + db).to(ctx.base.get(key).dtype).float()
    return torch.allclose(b1, want, rtol=1e-2, atol=1e-3 * (1 + float(want.abs().max())))


# -- the diffusers export ----------------------------------------------------------------------------------------
def _export_part(tree: TreeBuilder, layer: Layer, parts: dict[str, str], name: str, rows: tuple[int, int]) -> None:
    """The tensors of diffusers module `name`, rows `rows` of the layer."""
    count = rows[1] - rows[0]
    cut = "same" if rows == (0, layer.out_features) else None
    qweight = parts["qweight"]
    tree.add(f"{name}.qweight", layer, qweight, cut or "qweight_rows", shape=(count, layer.in_features // 2),
             rows=rows, byte_range=None if cut else _untouched_tiles(tree, qweight, rows))
    wscales = tree.base.tensors[parts["wscales"]].shape
    tree.add(f"{name}.wscales", layer, parts["wscales"], cut or "wscales_rows", shape=(wscales[0], count), rows=rows)
    if "bias" in parts:
        op = "shifted_bias" if tree.family.activation_shift(layer) else cut or "vector_rows"
        tree.add(f"{name}.bias", layer, parts["bias"], op, shape=(count,), rows=rows)
    tree.add(f"{name}.smooth_factor", layer, parts["smooth_factor"])
    tree.add(f"{name}.proj_down", layer, parts["proj_down"])
    up = parts["proj_up"]
    tree.add(f"{name}.proj_up", layer, up, cut or "up_rows",
             shape=(count, tree.plan.out_shape(up, tree.base.tensors[up].shape)[1]), rows=rows)
    if layer.layout == Layout.SVDQ_NVFP4:
        wcscales, wtscale = parts.get("wcscales"), parts.get("wtscale")
        tree.add(f"{name}.wcscales", layer, wcscales, "ones" if wcscales is None else cut or "vector_rows",
                 dtype=tree.compute_dtype, shape=(count,), rows=rows)
        tree.add(f"{name}.wtscale", layer, wtscale, "ones" if wtscale is None else "wtscale",
                 dtype=tree.compute_dtype, shape=(1,))


def _untouched_tiles(tree: TreeBuilder, qweight: str, rows: tuple[int, int]) -> tuple[int, int] | None:
    """The bytes of rows `rows` of a qweight the merge leaves alone, when they are whole tiles (copied from the
    base by the writer, never read into memory); else None."""
    if qweight in tree.touched or rows[0] % ROW_TILE or rows[1] % ROW_TILE:
        return None
    info = tree.base.tensors[qweight]
    row_bytes = info.nbytes // info.shape[0]
    return rows[0] * row_bytes, rows[1] * row_bytes


def shifted_bias(sources: LayerSources, shift: float) -> torch.Tensor:
    """The packed bias of an SVDQ layer whose Nunchaku runtime feeds the 4-bit path (x + shift) / smooth while
    diffusers' module feeds it x / smooth: b + shift·Σ_j Ŵ[o, j] / smooth[j] (Ŵ the dequantized 4-bit weight,
    logical order), so both compute the same output. The low-rank branch reads the unshifted input in both
    (nunchaku's epilogue order), so it needs nothing. int4 only (nvfp4 has no shift); in fp64, one rounding:
    Σ_g wscales[o, g]·Σ_{j in g} q[o, j]/smooth[j], the inner sums taken in packed space (group_dots)."""
    from ..codecs.svdq_scales import PackedVector, WScalesInt4
    from ..codecs.svdq_weight import group_dots

    layer = sources.layer
    if layer.layout != Layout.SVDQ_INT4:
        raise ExportError(f"{layer.prefix}: an activation shift is an int4 fact; this layer is {layer.layout.value}")
    inv_smooth = 1.0 / PackedVector.unpack(sources.get(layer.key("smooth_factor"))).double()
    dots = group_dots(sources.get(layer.key("qweight")), inv_smooth)
    rowsum = (dots * WScalesInt4.unpack(sources.get(layer.key("wscales"))).double()).sum(1)
    bias = sources.get(layer.key("bias"))
    return PackedVector.pack((PackedVector.unpack(bias).double() + shift * rowsum).to(bias.dtype))

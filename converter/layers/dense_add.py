"""16-bit layers (bf16/fp16 `nn.Linear` weights, and 1-D parameters such as norm weights): W += ΔW in fp32,
stored once in the original dtype, so the only error is the rounding of W + ΔW itself (the floor)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Mapping

from ..layout import Layer, Layout
from .base import LayerKind, count_layers

if TYPE_CHECKING:
    from ..st_reader import TensorInfo
    from ..planner import LayerOp, Plan
    from . import MergeContext, VerifyContext

DENSE_FLOOR_FACTOR = 1.5  # verify: within 1.5x the rounding floor of W+ΔW
FRACTION_TOL = 1e-2
FLOAT_DTYPES = ("BF16", "F16", "F32")  # the dtypes of the weights these kinds take (safetensors names)


class DenseAdd(LayerKind, layouts=(Layout.DENSE,)):
    name = "dense_add"
    plot_label = "16-bit layers: rel. error / rounding floor"
    plot_limit = DENSE_FLOOR_FACTOR

    @classmethod
    def detect(cls, path: str, tensors: Mapping[str, TensorInfo], prefix: str, part: str, info: TensorInfo
               ) -> Layer | None:
        return _float_weight(tensors, prefix, part, info, Layout.DENSE, 2)

    @classmethod
    def apply(cls, ctx: MergeContext, plan: Plan, layer: Layer, op: LayerOp | None):
        from ..factors import check_finite, dense_record
        from .deltas import bias_delta, dense_delta

        if op is None:
            return {}, None
        out, rec = {}, {}
        if op.weight_contributions:
            w = ctx.base.get(layer.key("weight"))
            dw = dense_delta(op, ctx.device, base=w.to(ctx.device).float() if op.needs_base else None, ck=ctx.base)
            new = (w.to(ctx.device, dtype=dw.dtype) + dw).to(w.dtype)
            out[layer.key("weight")] = check_finite(layer.key("weight"), new).cpu()
            rec = dense_record(w.to(ctx.device), new, dw)
        if op.bias_contributions:
            b, db = ctx.base.get(layer.key("bias")), bias_delta(op, ctx.base)
            new = (b.float() + db).to(b.dtype)
            out[layer.key("bias")] = check_finite(layer.key("bias"), new)
            rec["bias"] = dense_record(b, new, db)
        return out, rec

    @classmethod
    def verify(cls, ctx: VerifyContext, plan: Plan, layer: Layer, op: LayerOp | None) -> dict | None:
        probs: list[str] = []
        rec: dict = {"layer": layer.prefix, "kind": cls.name}
        if op is None or not op.weight_contributions:
            if not ctx.unchanged(layer.key("weight")):
                probs.append("weight changed although no LoRA targets it")
        else:
            rec |= _weight_figures(ctx, layer, op, probs)
        if layer.has_bias:
            _check_bias(ctx, layer, op, probs)
        return rec | {"ok": not probs, "problems": probs}

    @classmethod
    def summarize(cls, records: list[dict]) -> dict:
        out = super().summarize(records)
        fl = [r["rel_error"] / r["rounding_floor"] for r in records if r.get("rounding_floor")]
        if fl:
            out["max_over_rounding_floor"] = max(fl)
            out["above_tolerance"] = sum(ratio > DENSE_FLOOR_FACTOR for ratio in fl)
        fr = [r["applied_fraction"] for r in records if "applied_fraction" in r]
        if fr:
            out["applied_fraction_min"], out["applied_fraction_max"] = min(fr), max(fr)
            out["applied_fraction_median"] = statistics.median(fr)
        return out

    @classmethod
    def render_summary(cls, d: dict) -> str | None:
        """Verdict first (the error of a 16-bit layer is the rounding of W + ΔW, large against a small ΔW), then
        the figures."""
        if d.get("rel_error_max") is None:
            return None
        head = f"fidelity {cls.name} {count_layers(d['layers'])}: "
        ratio = d.get("max_over_rounding_floor")
        if ratio is None:
            return head + f"rel. error max {d['rel_error_max']:.2e}"
        one = d["layers"] == 1
        figures = (f"rel. error {d['rel_error_max']:.2e} = {ratio:.2f}x floor" if one else
                   f"rel. error max {d['rel_error_max']:.2e}, at most {ratio:.2f}x floor")
        if ratio <= DENSE_FLOOR_FACTOR:
            line = head + f"at the 16-bit rounding floor ({figures})"
        else:
            bad = "" if one else f"{d.get('above_tolerance', d['layers'])} of them "
            line = head + f"{bad}ABOVE the 16-bit rounding floor ({figures}; tolerance {DENSE_FLOOR_FACTOR}x)"
        if "applied_fraction_min" in d:
            low, high = d["applied_fraction_min"], d["applied_fraction_max"]
            line += f", applied fraction {low:.4f}" + (f"..{high:.4f}" if high != low else "")
        return line

    @classmethod
    def render_layer(cls, rec: dict) -> str:
        if not rec.get("rounding_floor"):
            return super().render_layer(rec)
        return (f"rel. error {rec['rel_error']:.2e} = {rec['rel_error'] / rec['rounding_floor']:.2f}x the 16-bit "
                f"rounding floor, applied fraction {rec['applied_fraction']:.4f}")

    @classmethod
    def plot_point(cls, rec: dict) -> tuple[str, float, float | None] | None:
        if not rec.get("rounding_floor"):
            return None
        return cls.name, rec["rel_error"] / rec["rounding_floor"], DENSE_FLOOR_FACTOR


class VectorAdd(DenseAdd, layouts=(Layout.VECTOR,)):
    """1-D parameters (norm weights): the same maths on a vector."""

    name = "vector_add"
    plot_label = "16-bit vectors: rel. error / rounding floor"

    @classmethod
    def detect(cls, path: str, tensors: Mapping[str, TensorInfo], prefix: str, part: str, info: TensorInfo
               ) -> Layer | None:
        return _float_weight(tensors, prefix, part, info, Layout.VECTOR, 1)


def _float_weight(tensors: Mapping[str, TensorInfo], prefix: str, part: str, info: TensorInfo, layout: Layout,
                  ndim: int) -> Layer | None:
    """The 16- or 32-bit layer whose `weight` of `ndim` dimensions is `prefix.part` (`info`), if it is one."""
    if part != "weight" or info.dtype not in FLOAT_DTYPES or len(info.shape) != ndim:
        return None
    return Layer(prefix, layout, info.shape[-1], info.shape[0], f"{prefix}.bias" in tensors, dtype=info.dtype)


def _weight_figures(ctx: VerifyContext, layer: Layer, op: LayerOp, probs: list[str]) -> dict:
    from ..factors import dense_record
    from .deltas import dense_delta

    w0, w1 = ctx.base.get(layer.key("weight")), ctx.merged.get(layer.key("weight"))
    rec = dense_record(w0, w1, dense_delta(op, base=w0.float() if op.needs_base else None, ck=ctx.base))
    rec.pop("delta_norm")
    if rec["rel_error"] > DENSE_FLOOR_FACTOR * rec["rounding_floor"] + 1e-7:
        probs.append(f"error {rec['rel_error']:.3g} above {DENSE_FLOOR_FACTOR}x the rounding floor "
                     f"{rec['rounding_floor']:.3g}")
    if abs(rec["applied_fraction"] - 1) > FRACTION_TOL:
        probs.append(f"applied fraction {rec['applied_fraction']:.4f}")
    return rec


def _check_bias(ctx: VerifyContext, layer: Layer, op: LayerOp | None, probs: list[str]) -> None:
    import torch

    from .deltas import bias_delta

    db = bias_delta(op, ctx.base) if op is not None else None
    b0, b1 = ctx.base.get(layer.key("bias")), ctx.merged.get(layer.key("bias"))
    if db is None and not ctx.unchanged(layer.key("bias")):
        probs.append("bias changed although no LoRA targets it")
    elif db is not None and not torch.allclose(b1.float(), (b0.float() + db).to(b0.dtype).float()):
        probs.append("bias differs from base + bias delta")

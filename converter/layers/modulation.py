"""AWQ W4A16 modulation layers (Qwen `img_mod.1` / `txt_mod.1`): no low-rank branch, so the LoRA enters by
requantization, calibrated on the layers' real inputs x(σ) = SiLU(temb(σ)) (converter.modulation). The
LoRA's rows are first permuted into the family's stored row order (Qwen's interleave). Whatever is written is
never worse than the base layer on held-out timesteps (e_mod ≤ 1)."""

from __future__ import annotations

import statistics
import threading
from collections import Counter
from typing import TYPE_CHECKING, Mapping

from ..errors import ExportError, MergeError
from ..layout import Layer, Layout
from .base import LayerKind, count_layers, is_qweight, keep_freed_memory

if TYPE_CHECKING:
    import torch

    from ..engine import OutTensor
    from ..export.transform import LayerSources
    from ..export.tree import TreeBuilder
    from ..planner import LayerOp, Plan
    from ..st_reader import TensorInfo
    from . import MergeContext, VerifyContext

MOD_TOL = 1.0  # verify: never worse than leaving the layer as it was
WEIGHT_PARTS = ("qweight", "wscales", "wzeros")
EXPORT_PARTS = frozenset(WEIGHT_PARTS + ("bias",))  # the parameters of diffusers' AWQW4A16Linear


class ModulationInputs:
    """The modulation layers' inputs x(σ) = SiLU(temb(σ)), computed once from the checkpoint's own timestep
    embedder at the calibration and the held-out sigmas, and the calibration built from them (on first use)."""

    def __init__(self, ctx: MergeContext):
        from .. import modulation as M

        keys = ctx.model.family.timestep_keys
        need = [keys[k] + part for k in ("linear_1", "linear_2") for part in (".weight", ".bias")] if keys else []
        missing = [k for k in need if k not in ctx.base] or ([] if keys else ["its timestep embedder"])
        if missing:
            raise MergeError(f"cannot calibrate the modulation layers: the checkpoint lacks {missing[0]}; "
                             "use --mod skip")
        w1, b1, w2, b2 = (ctx.base.get(k) for k in need)
        add = ctx.base.get(keys["addition_t_embedding"]) if keys.get("addition_t_embedding") in ctx.base else None
        self.device = ctx.device
        self.x_calib = M.modulation_inputs(w1, b1, w2, b2, M.calibration_sigmas(), addition_t_embedding=add)
        self.x_eval = M.modulation_inputs(w1, b1, w2, b2, M.evaluation_sigmas(), addition_t_embedding=add)
        self._calibration = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, ctx: MergeContext) -> ModulationInputs:
        def make() -> ModulationInputs:
            if ctx.device == "cpu":
                ctx.shared("heap_kept", keep_freed_memory)
            return cls(ctx)

        return ctx.shared("modulation", make)

    @property
    def calibration(self):
        """Everything that depends on the calibration inputs alone: built once, shared by every layer (on a CUDA
        device finished before it is handed out: the layers that use it may run on other streams)."""
        with self._lock:
            if self._calibration is None:
                from ..modulation import ModulationCalibration

                calibration = ModulationCalibration.build(self.x_calib, device=self.device)
                if calibration.device.type == "cuda":
                    import torch

                    torch.cuda.current_stream(calibration.device).synchronize()
                self._calibration = calibration
            return self._calibration


class Modulation(LayerKind, layouts=(Layout.AWQ_W4A16,)):
    name = "modulation"
    verify_figure = "e_mod"
    plot_label = "modulation e_mod (1 = LoRA lost)"
    plot_limit = MOD_TOL

    @classmethod
    def detect(cls, path: str, tensors: Mapping[str, TensorInfo], prefix: str, part: str, info: TensorInfo
               ) -> Layer | None:
        """An int32 `qweight` (eight 4-bit codes a word) with its group scales and zeros."""
        if not is_qweight(path, tensors, part, info, "I32", ("qweight", "wzeros")):
            return None
        wscales = tensors.get(f"{prefix}.wscales")
        if wscales is None or f"{prefix}.wzeros" not in tensors:
            raise MergeError(f"{path}: AWQ layer {prefix} lacks wscales/wzeros")
        return Layer(prefix, Layout.AWQ_W4A16, info.shape[1] * 2, info.shape[0] * 4, f"{prefix}.bias" in tensors,
                     dtype=wscales.dtype)

    @classmethod
    def export_outputs(cls, tree: TreeBuilder, layer: Layer, names: list[str]) -> None:
        """One diffusers module, never split; rows stored in another order (Qwen's interleave) are permuted to
        diffusers' order, padding rows of the group params dropped, a bias constant the family folded taken out."""
        parts = tree.parts_by_name(layer, names, EXPORT_PARTS)
        diffusers_parts = tree.parts_of(layer)
        if len(diffusers_parts) != 1 or (diffusers_parts[0].start, diffusers_parts[0].stop) != (0, layer.out_features):
            raise ExportError(f"AWQ layer {layer.prefix} would be split, which the export does not do; nothing was "
                              "written")
        name = diffusers_parts[0].name
        tree.target("awq_w4a16", layer, 0, name)
        reordered = tree.family.row_order(layer.prefix) is not None
        groups = layer.in_features // layer.layout.group_size
        tree.add(f"{name}.qweight", layer, parts["qweight"], "awq_qweight" if reordered else "same")
        for part in ("wscales", "wzeros"):  # the stored group params may carry padding rows: diffusers' have none
            padded = tree.base.tensors[parts[part]].shape[0] != groups
            tree.add(f"{name}.{part}", layer, parts[part], "awq_params" if reordered or padded else "same",
                     shape=(groups, layer.out_features))
        if "bias" in parts:
            folded = reordered or tree.family.folded_bias(layer)
            tree.add(f"{name}.bias", layer, parts["bias"], "awq_bias" if folded else "same")

    @classmethod
    def export_tensor(cls, sources: LayerSources, out: OutTensor, tensor: torch.Tensor | None) -> torch.Tensor:
        from ..codecs.awq_w4a16 import permute_group_params, permute_qweight_rows

        perm = sources.perm() if out.op.startswith("awq_") else None
        if out.op == "awq_qweight":
            return permute_qweight_rows(tensor, perm) if perm is not None else tensor
        if out.op == "awq_params":
            tensor = tensor[: sources.layer.in_features // sources.layer.layout.group_size]
            return permute_group_params(tensor, perm) if perm is not None else tensor
        if out.op == "awq_bias":
            bias = (tensor[perm] if perm is not None else tensor).float()
            for start, stop, constant in sources.family.folded_bias(sources.layer):
                bias[start:stop] -= constant
            return bias.to(tensor.dtype)
        return super().export_tensor(sources, out, tensor)

    @classmethod
    def touched(cls, layer: Layer, op: LayerOp | None, plan: Plan) -> set[str]:
        if op is None:
            return set()
        return {layer.key(p) for p in WEIGHT_PARTS} | ({layer.key("bias")} if layer.has_bias else set())

    @classmethod
    def apply(cls, ctx: MergeContext, plan: Plan, layer: Layer, op: LayerOp | None):
        if op is None:
            return {}, None
        with ctx.all_threads():  # the modulation layers' big products get every thread
            res = _requantize(ctx, plan, layer, op)
        rec = {"action": res.action, "asked": res.mode, "e_mod": res.e_mod, "e_asked": res.e_asked, "e_biasfold": res.e_biasfold,
               "e_biasfold_ideal": res.e_biasfold_ideal, "e_skip": res.e_skip, "e_requant": res.e_requant,
               "codes_changed": res.codes_changed, "zeros_changed": res.zeros_changed,
               "bias_changed": res.bias_changed, "why": res.why, "written_unchanged": res.action == "skip"}
        return ({} if res.action == "skip" else _pack(ctx, layer, res)), rec

    @classmethod
    def verify(cls, ctx: VerifyContext, plan: Plan, layer: Layer, op: LayerOp | None) -> dict:
        rec: dict = {"layer": layer.prefix, "kind": cls.name}
        probs: list[str] = []
        if op is None:
            parts = WEIGHT_PARTS + (("bias",) if layer.has_bias else ())
            if not all(ctx.unchanged(layer.key(p)) for p in parts):
                probs.append("changed although no LoRA targets it")
        else:
            rec["e_mod"], rec["kept_base"] = _held_out_error(ctx, layer, op)
            rec["action"], rec["asked"] = _written_action(ctx, layer), plan.modulation_mode
            if rec["e_mod"] > MOD_TOL + 1e-6:
                probs.append(f"e_mod {rec['e_mod']:.3f} > {MOD_TOL} (worse than leaving the layer unchanged)")
        return rec | {"ok": not probs, "problems": probs}

    @classmethod
    def summarize(cls, records: list[dict]) -> dict:
        e = [r["e_mod"] for r in records if r.get("e_mod") is not None]
        out = {"layers": len(records), "actions": dict(Counter(r["action"] for r in records)),
               "asked": sorted({r["asked"] for r in records if r.get("asked")}),
               "e_mod_median": statistics.median(e) if e else None, "e_mod_max": max(e) if e else None}
        for k in ("e_biasfold", "e_requant"):
            v = [r[k] for r in records if r.get(k) is not None]
            if v:
                out[k + "_median"] = statistics.median(v)
        return out

    @classmethod
    def render_summary(cls, d: dict) -> str:
        from ..modulation.merge import ACTION_LABELS

        acts = ", ".join(f"{ACTION_LABELS.get(k, k)} {v}" for k, v in sorted(d["actions"].items()))
        if set(d["actions"]) - set(d.get("asked", [])):  # something other than asked was written: say so
            acts = f"asked {'/'.join(d['asked'])}; wrote {acts}"
        if d["e_mod_median"] is None:
            return f"fidelity modulation {count_layers(d['layers'])} ({acts})"
        extra = f"; bias-fold would give {d['e_biasfold_median']:.3f}" if d.get("e_biasfold_median") is not None else ""
        if d.get("e_requant_median") is not None:
            extra += f", plain requant {d['e_requant_median']:.3f}"
        return (f"fidelity modulation {count_layers(d['layers'])} ({acts}): e_mod median {d['e_mod_median']:.3f} max "
                f"{d['e_mod_max']:.3f}{extra}  (1.0 = LoRA effect lost)")


def _delta_in_stored_rows(ctx: MergeContext, layer: Layer, op: LayerOp):
    """(ΔW as (up, down) factors, or dense when some update is not low-rank; Δb or None), rows permuted into the
    layer's stored order."""
    import torch

    from ..codecs import layer_codec
    from .deltas import bias_delta, dense_delta, lowrank_factors

    order = ctx.model.family.row_order(layer.prefix)
    to_stored = order.to_checkpoint if order is not None else (lambda t: t)
    db = bias_delta(op)
    db = to_stored(db) if db is not None else None
    if op.has_dense:
        base = None
        if op.needs_base:  # the base weight in the LoRA's row order (DoRA)
            base = layer_codec(layer.layout).dequantize({p: ctx.base.get(layer.key(p)) for p in WEIGHT_PARTS})
            base = order.to_lora(base) if order is not None else base
        return to_stored(dense_delta(op, base=base)), db
    f = lowrank_factors(op)
    if f is None:  # a bias-only delta: an exact bias update
        return (torch.zeros(layer.out_features, 1), torch.zeros(1, layer.in_features)), db
    return (to_stored(f.up), f.down), db


def _requantize(ctx: MergeContext, plan: Plan, layer: Layer, op: LayerOp):
    import torch

    from ..codecs.awq_w4a16 import GROUP, AwqGroupParams
    from ..modulation import merge_modulation

    inputs = ModulationInputs.of(ctx)
    ng = layer.in_features // GROUP
    qweight = ctx.base.get(layer.key("qweight"))  # packed: only the code columns that may change are unpacked
    scales = AwqGroupParams.unpack(ctx.base.get(layer.key("wscales"))[:ng]).float()
    zeros = AwqGroupParams.unpack(ctx.base.get(layer.key("wzeros"))[:ng]).float()
    bias = ctx.base.get(layer.key("bias")).float() if layer.has_bias else torch.zeros(layer.out_features)
    delta_w, db = _delta_in_stored_rows(ctx, layer, op)
    return merge_modulation(qweight, scales, zeros, bias, delta_w, db, inputs.calibration, inputs.x_eval,
                            mode=plan.modulation_mode, group_size=GROUP, device=ctx.device)


def _pack(ctx: MergeContext, layer: Layer, res) -> dict[str, torch.Tensor]:
    import torch

    from ..codecs.awq_w4a16 import GROUP, AwqGroupParams

    ng = layer.in_features // GROUP
    ws, wz = ctx.base.get(layer.key("wscales")), ctx.base.get(layer.key("wzeros"))
    bias_dtype = ctx.base.tensors[layer.key("bias")].torch_dtype if layer.has_bias else None
    written = [("wscales", res.scales, ws.dtype), ("wzeros", res.zeros, wz.dtype)]
    if layer.has_bias:
        written.append(("bias", res.bias, bias_dtype))
    for part, values, dtype in written:  # on the fp32 results: isfinite on 16-bit tensors is several times slower
        if not float(values.abs().amax()) <= torch.finfo(dtype).max:  # NaN fails the comparison too
            raise MergeError(f"modulation merge produced non-finite values in {layer.key(part)}")
    new_ws, new_wz = ws.clone(), wz.clone()  # keep any padding rows of the stored group params
    new_ws[:ng] = AwqGroupParams.pack(res.scales).to(ws.dtype)
    new_wz[:ng] = AwqGroupParams.pack(res.zeros).to(wz.dtype)
    out = {layer.key("qweight"): res.qweight, layer.key("wscales"): new_ws, layer.key("wzeros"): new_wz}
    if layer.has_bias:
        out[layer.key("bias")] = res.bias.to(bias_dtype)
    return out


def _written_action(ctx: VerifyContext, layer: Layer) -> str:
    """What the merged file holds for a targeted layer, read from which tensors changed: "skip" (the base kept),
    "biasfold" (only the bias), "requant" (a fresh grid: the scales changed) or "calibrated" (codes / zeros)."""
    same = {p: ctx.unchanged(layer.key(p)) for p in WEIGHT_PARTS + (("bias",) if layer.has_bias else ())}
    if all(same[p] for p in WEIGHT_PARTS):
        return "skip" if all(same.values()) else "biasfold"
    return "calibrated" if same["wscales"] else "requant"


def _held_out_error(ctx: VerifyContext, layer: Layer, op: LayerOp) -> tuple[float, bool]:
    """(e_mod of the merged layer on the held-out sigmas, whether it kept the base layer)."""
    import torch

    from ..codecs import layer_codec
    from ..modulation import e_mod

    codec = layer_codec(layer.layout)
    w0, w1 = (codec.dequantize({p: ck.get(layer.key(p)) for p in WEIGHT_PARTS}) for ck in (ctx.base, ctx.merged))
    zeros = torch.zeros(w0.shape[0])
    b0, b1 = ((ck.get(layer.key("bias")).float() if layer.has_bias else zeros) for ck in (ctx.base, ctx.merged))
    delta_w, db = _delta_in_stored_rows(ctx, layer, op)
    x = ModulationInputs.of(ctx).x_eval
    ideal = (delta_w @ x.T if isinstance(delta_w, torch.Tensor) else delta_w[0] @ (delta_w[1] @ x.T))
    ideal = ideal + (db if db is not None else zeros)[:, None]
    got = (w1 - w0) @ x.T + (b1 - b0)[:, None]
    return e_mod(got - ideal, ideal), bool(torch.equal(w0, w1) and torch.equal(b0, b1))

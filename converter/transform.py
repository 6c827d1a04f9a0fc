"""Per-layer transforms of a merge: the torch side of the pipeline (converter.pipeline imports it only
when the first changed layer comes up, so that copying starts while torch loads)."""

from __future__ import annotations

import torch

from mappings import by_name

from .apply import apply_dense, apply_lowrank, delta_bias, lowrank_factors
from .codecs.awq_w4a16 import GROUP, AwqGroupParams, AwqQWeight
from .errors import MergeError
from .lora import LoraFile
from .model import Model
from .planner import LayerOp
from .st_io import Checkpoint


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep up to `limit` bytes of freed memory instead of handing it back to the
    kernel at once. A modulation layer allocates ~1 GB of short-lived fp32 temporaries; returned and faulted
    in again for every layer, the page faults took a third of its time (measured: 1.7 -> 1.2 s a layer,
    with the peak memory unchanged). Best effort: a no-op where the C library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return bool(libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, limit)
                    and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False


# -- modulation layers ------------------------------------------------------------------------------------
class ModulationContext:
    """The modulation layers' real inputs x(σ) = SiLU(temb(σ)), computed once from the checkpoint's own
    timestep embedder and shared by every modulation layer."""

    def __init__(self, base: Checkpoint, model: Model, device: str):
        from . import modulation as M

        keys = by_name(model.family).timestep_keys
        need = [keys["linear_1"] + ".weight", keys["linear_1"] + ".bias", keys["linear_2"] + ".weight",
                keys["linear_2"] + ".bias"]
        missing = [k for k in need if k not in base]
        if missing:
            raise MergeError(f"cannot calibrate the modulation layers: the checkpoint lacks {missing[0]}; "
                             "use --mod skip")
        w1, b1, w2, b2 = (base.get(k) for k in need)
        add = base.get(keys["addition_t_embedding"]) if keys.get("addition_t_embedding") in base else None
        self.M = M
        self.device = device
        if torch.device(device).type == "cpu":
            keep_freed_memory()
        self.x_calib = M.modulation_inputs(w1, b1, w2, b2, M.calibration_sigmas(), addition_t_embedding=add)
        self.x_eval = M.modulation_inputs(w1, b1, w2, b2, M.evaluation_sigmas(), addition_t_embedding=add)
        self._calibration = None

    @property
    def calibration(self):
        """Everything that depends on the calibration inputs alone: built once, shared by every layer."""
        if self._calibration is None:
            self._calibration = self.M.ModulationCalibration.build(self.x_calib, device=self.device)
        return self._calibration


def interleave_rows(t: torch.Tensor, splits: int | None) -> torch.Tensor:
    """diffusers row k*D+d -> Nunchaku row d*splits+k (modulation layers' output interleave)."""
    if not splits:
        return t
    d = t.shape[0] // splits
    return t.reshape(splits, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def apply_modulation(op: LayerOp, base: Checkpoint, loras: list[LoraFile], ctx: ModulationContext, splits: int | None,
                     mode: str) -> tuple[dict[str, torch.Tensor], dict]:
    """AWQ W4A16 modulation layer: the LoRA's rows permuted into Nunchaku's interleave, then requantized
    (converter.modulation); whatever is written is never worse than the base layer on held-out timesteps."""
    lay = op.layer
    qw, ws, wz = base.get(lay.key("qweight")), base.get(lay.key("wscales")), base.get(lay.key("wzeros"))
    ng = lay.in_features // GROUP
    codes = AwqQWeight.unpack(qw)
    scales = AwqGroupParams.unpack(ws[:ng]).float()
    zeros = AwqGroupParams.unpack(wz[:ng]).float()
    bias = base.get(lay.key("bias")).float() if lay.has_bias else torch.zeros(lay.out_features)
    f = lowrank_factors(op, loras)
    if any(c.kind == "diff" for c in op.contributions):
        raise MergeError(f"full-weight delta on the 4-bit layer {lay.prefix}")  # the planner rejects these
    delta_w = (interleave_rows(f.up, splits), f.down) if f is not None else None
    db = delta_bias(op, loras)
    db = interleave_rows(db, splits) if db is not None else None
    if db is not None and not lay.has_bias:
        raise MergeError(f"bias delta for {lay.prefix}, which has no bias")
    if delta_w is None:  # a bias-only delta: an exact bias update
        delta_w = (torch.zeros(lay.out_features, 1), torch.zeros(1, lay.in_features))
    res = ctx.M.merge_modulation(codes, scales, zeros, bias, delta_w, db, ctx.calibration, ctx.x_eval,
                                 mode="plain" if mode == "requant" else mode, group_size=GROUP, device=ctx.device)
    rec = {"action": res.action, "e_mod": res.e_written, "e_method": res.e_mod, "e_biasfold": res.e_biasfold,
           "e_biasfold_ideal": res.e_biasfold_ideal, "e_skip": res.e_skip, "e_plain": res.e_plain,
           "codes_changed": res.codes_changed, "zeros_changed": res.zeros_changed, "bias_changed": res.bias_changed}
    if res.action == "skip":
        return {}, rec
    out = {lay.key("qweight"): AwqQWeight.pack(res.codes)}
    new_ws, new_wz = ws.clone(), wz.clone()  # keep any padding rows of the stored group params
    new_ws[:ng] = AwqGroupParams.pack(res.scales).to(ws.dtype)
    new_wz[:ng] = AwqGroupParams.pack(res.zeros).to(wz.dtype)
    out[lay.key("wscales")], out[lay.key("wzeros")] = new_ws, new_wz
    if lay.has_bias:
        out[lay.key("bias")] = res.bias.to(base.tensors[lay.key("bias")].torch_dtype)
    for k, t in out.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise MergeError(f"modulation merge produced non-finite values in {k}")
    return out, rec


class LayerTransformer:
    """Computes each changed layer's new tensors. Holds what layers share (the modulation inputs, made on
    first use) and torch's thread setting: the per-layer work outside the modulation layers is many small
    ops, so it runs on one intra-op thread, leaving the other cores to the writer threads (on 2 cores a
    12.7 GB merge took 32 s with 2 threads, 23 s with one); the modulation layers' big products get all."""

    def __init__(self, base: Checkpoint, model: Model, device: str):
        self.base, self.model, self.device = base, model, device
        self._ctx: ModulationContext | None = None
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def context(self) -> ModulationContext:
        if self._ctx is None:
            self._ctx = ModulationContext(self.base, self.model, self.device)
        return self._ctx

    def __call__(self, s, prefix: str) -> tuple[dict[str, torch.Tensor], dict | None]:
        """The new tensors of layer `prefix` under session `s`'s plan, and its fidelity record."""
        plan, layer = s.plan, s.model.layers[prefix]
        op = plan.ops.get(prefix)
        if layer.layout.is_svdq:  # every W4A4 layer: its rank follows the plan even without a LoRA
            out, rec = apply_lowrank(op, layer, s.base, s.loras, plan.new_rank)
            return out, ({"layer": prefix, "method": "lowrank_append"} | rec) if rec else None
        if op is None:
            return {}, None
        if op.method != "modulation":
            out, rec = apply_dense(op, s.base, s.loras, self.device)
            return out, {"layer": prefix, "method": op.method} | rec
        torch.set_num_threads(self._threads)  # the modulation layers' big products get every thread
        try:
            out, rec = apply_modulation(op, s.base, s.loras, self.context(),
                                        by_name(s.model.family).modulation_splits(prefix), plan.modulation_mode)
        finally:
            torch.set_num_threads(1)
        return out, {"layer": prefix, "method": "modulation"} | rec

    def close(self) -> None:
        torch.set_num_threads(self._threads)

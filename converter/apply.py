"""Per-layer transforms: (LayerOp, base tensors, LoRA tensors) -> new tensors + a fidelity record.

ΔW of a LoRA module is scale·B·A (PEFT's get_delta_weight), with scale = strength·alpha/rank of that module.
All maths in fp32 (fp64 for norms), cast once to the checkpoint dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codecs.lowrank import append_packed
from .codecs.svdq_scales import PackedVector
from .errors import MergeError
from .lora import LoraFile
from .model import Layer
from .planner import Contribution, LayerOp, round16
from .st_io import DTYPES, Checkpoint


LOWRANK_PROBES = 16  # input directions for the merge-time estimate of a low-rank layer's error


@dataclass
class Factors:
    down: torch.Tensor  # (r, I) fp32, scale folded in
    up: torch.Tensor  # (O, r) fp32, rows placed on the layer's output rows


def _place(c: Contribution, src: torch.Tensor, out_rows: int) -> torch.Tensor:
    """Rows of a LoRA module's output (B rows or a bias/diff) placed onto the target layer's rows."""
    out = src.new_zeros((out_rows,) + tuple(src.shape[1:]))
    for s in c.segments:
        out[s.target_start:s.target_start + s.rows] = src[s.lora_start:s.lora_start + s.rows]
    return out


def lowrank_factors(op: LayerOp, loras: list[LoraFile]) -> Factors | None:
    """The LoRA part of a layer as one low-rank pair (fp32); members sharing an A contribute one set of
    columns. Written straight into preallocated factors: this runs for every layer of a merge."""
    lay = op.layer
    low = [(i, c) for i, c in enumerate(op.contributions) if c.kind == "lowrank"]
    if not low:
        return None
    col: dict[int, int] = {}
    start = 0
    for i, c in low:
        if c.shares_a_with is None:
            col[i] = start
            start += c.rank
    down = torch.empty(start, lay.in_features)
    up = torch.zeros(lay.out_features, start)
    for i, c in low:
        lf = loras[c.lora]
        j = col[c.shares_a_with if c.shares_a_with is not None else i]
        if c.shares_a_with is None:
            torch.mul(lf.ckpt.get(c.a_key).float(), c.scale, out=down[j:j + c.rank])  # exact reference: fp32
        b = lf.ckpt.get(c.b_key)
        for s in c.segments:
            up[s.target_start:s.target_start + s.rows, j:j + c.rank] += b[s.lora_start:s.lora_start + s.rows]
    return Factors(down, up)


def delta_weight(op: LayerOp, loras: list[LoraFile], device: str = "cpu") -> torch.Tensor | None:
    lay = op.layer
    out = None
    f = lowrank_factors(op, loras)
    if f is not None:
        out = f.up.to(device) @ f.down.to(device)
    for c in op.contributions:
        if c.kind == "diff":
            d = _place(c, loras[c.lora].tensor(c.key), lay.out_features).to(device) * c.scale
            out = d if out is None else out + d
    return out


def delta_bias(op: LayerOp, loras: list[LoraFile]) -> torch.Tensor | None:
    out = None
    for c in op.contributions:
        if c.kind == "diff_b":
            d = _place(c, loras[c.lora].tensor(c.key), op.layer.out_features) * c.scale
            out = d if out is None else out + d
    return out


def _check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    # a sum is finite when every element is (barring overflow of the sum itself, then look element-wise)
    if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise MergeError(f"merging produced non-finite values in {name} (a LoRA tensor holds inf/nan, or the "
                         "strength is too large for the checkpoint dtype)")
    return t


_PROBES: dict[tuple[int, int], torch.Tensor] = {}


def _probes(n: int, k: int) -> torch.Tensor:
    """Fixed Gaussian directions (the same for every layer of a width: made once)."""
    if (n, k) not in _PROBES:
        _PROBES[(n, k)] = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return _PROBES[(n, k)]


def _probe_rows(out_rows: int) -> slice:
    return slice(None, None, max(1, out_rows // 1024))  # rounding noise is alike in every row


def _relative(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(||got − want|| / ||want||, ||want||)."""
    ref = float(want.norm())
    return (float((got - want).norm()) / ref if ref else 0.0), ref


def lowrank_error(u_app: torch.Tensor, d_app: torch.Tensor, f: Factors, probes: int = 0) -> tuple[float, float]:
    """(||U_app·D_app − ΔW|| / ||ΔW||, ||ΔW||) with ΔW = f.up·f.down, through r×r Gram matrices only.

    With `probes` > 0 both norms are instead estimated on that many fixed Gaussian input directions
    (E·Ω; the error is full-rank rounding noise, so a few probes give it to a few percent) at a tiny cost:
    the merge reports this estimate, `verify` computes the exact figure.

    u_app/d_app are what the file stores for the LoRA part (columns/rows after the base rank, padding
    included). When they have the LoRA's own shape the error is split as ΔU·D_app + U·ΔD, so nothing
    cancels and fp32 suffices; otherwise (truncated or foreign) the general stacked form runs in fp64."""
    if probes:
        omega = _probes(f.down.shape[1], probes)
        rows = _probe_rows(f.up.shape[0])
        err, ref = _relative(u_app[rows].float() @ (d_app.float() @ omega), f.up[rows] @ (f.down @ omega))
        return err, ref / probes ** 0.5
    r = f.down.shape[0]
    gu = f.up.T @ f.up
    ref2 = float((gu * (f.down @ f.down.T)).sum())
    ref = max(ref2, 0.0) ** 0.5
    if ref == 0:
        return 0.0, 0.0
    if u_app.shape[1] >= r and not u_app[:, r:].any() and not d_app[r:].any():
        du, dd, da = u_app[:, :r] - f.up, d_app[:r] - f.down, d_app[:r]
        err2 = float(((du.T @ du) * (da @ da.T)).sum() + (gu * (dd @ dd.T)).sum()
                     + 2 * ((du.T @ f.up) * (da @ dd.T)).sum())
    else:
        L = torch.cat([u_app, -f.up], 1).double()
        R = torch.cat([d_app, f.down], 0).double()
        err2 = float(((L.T @ L) * (R @ R.T)).sum())
    return max(err2, 0.0) ** 0.5 / ref, ref


def truncate(f: Factors, k: int) -> tuple[Factors, float]:
    """Best rank-k approximation of up·down (truncated SVD through two thin QRs); returns it and the
    relative Frobenius error of what was dropped."""
    qu, ru = torch.linalg.qr(f.up.double())
    qd, rd = torch.linalg.qr(f.down.double().T)
    p, sv, vh = torch.linalg.svd(ru @ rd.T)
    total = float((sv ** 2).sum())
    dropped = float((sv[k:] ** 2).sum())
    root = sv[:k].sqrt()
    up = (qu @ p[:, :k]) * root
    down = (root[:, None] * vh[:k]) @ qd.T
    return Factors(down.float(), up.float()), (dropped / total) ** 0.5 if total > 0 else 0.0


def _direct_parts(op: LayerOp, loras: list[LoraFile], dtype: torch.dtype, used: int
                  ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, Contribution]]] | None:
    """The LoRA part built straight in the checkpoint's dtype: down (used, I) and up (O, used), zero past the
    LoRA rank. Each stored value is rounded once, exactly as the fp32 route rounds it (scale·A in fp32, then
    to the dtype; B copied), without fp32 temporaries. Only for LoRAs in the checkpoint's dtype with no A
    shared between members (shared A sums B columns: that takes the fp32 route)."""
    low = [c for c in op.contributions if c.kind == "lowrank"]
    if not low or any(c.shares_a_with is not None for c in low):
        return None
    for c in low:
        lf = loras[c.lora]
        if lf.ckpt.tensors[c.a_key].torch_dtype != dtype or lf.ckpt.tensors[c.b_key].torch_dtype != dtype:
            return None
    lay = op.layer
    down = torch.empty(used, lay.in_features, dtype=dtype)
    up = torch.zeros(lay.out_features, used, dtype=dtype)
    cols, j = [], 0
    for c in low:
        lf = loras[c.lora]
        a = lf.ckpt.get(c.a_key)
        if c.scale == 1.0:
            down[j:j + c.rank].copy_(a)
        else:
            torch.mul(a, c.scale, out=down[j:j + c.rank])
        b = lf.ckpt.get(c.b_key)
        for sg in c.segments:
            up[sg.target_start:sg.target_start + sg.rows, j:j + c.rank] = b[sg.lora_start:sg.lora_start + sg.rows]
        cols.append((j, c))
        j += c.rank
    down[j:] = 0
    return down, up, cols


def _direct_error(down: torch.Tensor, up: torch.Tensor, cols: list[tuple[int, Contribution]], loras: list[LoraFile],
                  probes: int = LOWRANK_PROBES) -> float:
    """lowrank_error's probe estimate for _direct_parts: up is exact (copied), so the error is up·(down −
    scale·A), seen on fixed input directions; zero when every scale is 1 (nothing was rounded)."""
    if all(c.scale == 1.0 for _, c in cols):
        return 0.0
    omega = _probes(down.shape[1], probes)
    u = up[_probe_rows(up.shape[0])].float()
    ideal = torch.cat([(loras[c.lora].ckpt.get(c.a_key).float() @ omega) * c.scale for _, c in cols])
    return _relative(u @ (down.float() @ omega), u[:, :ideal.shape[0]] @ ideal)[0]


def apply_lowrank(op: LayerOp | None, layer: Layer, base: Checkpoint, loras: list[LoraFile], rank: int
                  ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """SVDQ layer: append the LoRA to proj_down/proj_up (exact), zero-pad to the uniform rank; bias deltas are
    added in pack_scale order. qweight, wscales, smooth factors stay untouched. If the LoRA part does not fit
    in `rank` (--max-rank), it is replaced by its best approximation of the rank that fits.
    The base's own packed tiles are moved, never unpacked (see append_packed)."""
    pd, pu = base.get(layer.key("proj_down")), base.get(layer.key("proj_up"))
    r0 = pd.shape[1]
    room = rank - r0
    rec = None
    d_add = u_add = None
    low_rank = sum(c.rank for c in op.contributions if c.kind == "lowrank" and c.shares_a_with is None) if op else 0
    direct = _direct_parts(op, loras, pd.dtype, round16(low_rank)) if op and low_rank <= room else None
    if direct is not None:  # the common case: no fp32 factors at all
        d_add, u_add, cols = direct
        _check_finite(layer.prefix, d_add)
        _check_finite(layer.prefix, u_add)
        rec = {"rel_error": _direct_error(d_add, u_add, cols, loras), "rank_added": low_rank}
    elif op and low_rank:
        f = lowrank_factors(op, loras)
        ideal, dropped = f, 0.0
        if f.down.shape[0] > room:
            f, dropped = truncate(f, room)
        r = f.down.shape[0]
        d_add = pd.new_zeros(round16(r), layer.in_features)
        u_add = pu.new_zeros(layer.out_features, round16(r))
        d_add[:r].copy_(_check_finite(layer.prefix, f.down))
        u_add[:, :r].copy_(_check_finite(layer.prefix, f.up))
        err, _ = lowrank_error(u_add if not dropped else u_add.float(), d_add if not dropped else d_add.float(), ideal,
                               probes=0 if dropped else LOWRANK_PROBES)
        rec = {"rel_error": err, "rank_added": ideal.down.shape[0]}
        if dropped:
            rec |= {"rank_kept": f.down.shape[0], "truncation_error": dropped}
    out = {}
    if room:
        out = {layer.key("proj_down"): append_packed(pd, d_add, down=True, rank=rank),
               layer.key("proj_up"): append_packed(pu, u_add, down=False, rank=rank)}
    db = delta_bias(op, loras) if op else None
    if db is not None:
        b = base.get(layer.key("bias"))
        new = PackedVector.unpack(b).float() + db
        out[layer.key("bias")] = PackedVector.pack(_check_finite(layer.key("bias"), new).to(b.dtype))
        rec = (rec or {}) | {"bias_delta_norm": float(db.norm())}
    return out, rec


def dense_record(w_old: torch.Tensor, w_new: torch.Tensor, dw: torch.Tensor) -> dict:
    """Error of the stored change against ΔW, next to the floor that storing W+ΔW in its dtype imposes."""
    got = w_new.double() - w_old.double()
    dw = dw.double()
    ref2 = float((dw * dw).sum())
    if ref2 == 0:
        return {"rel_error": 0.0, "rounding_floor": 0.0, "applied_fraction": 1.0, "delta_norm": 0.0}
    ideal = w_old.double() + dw
    floor = float((ideal.to(w_old.dtype).double() - ideal).norm()) / ref2 ** 0.5
    return {"rel_error": float((got - dw).norm()) / ref2 ** 0.5, "rounding_floor": floor,
            "applied_fraction": float((got * dw).sum()) / ref2, "delta_norm": ref2 ** 0.5}


def apply_dense(op: LayerOp, base: Checkpoint, loras: list[LoraFile], device: str = "cpu"
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """16-bit layer (or a 1-D norm weight): W += ΔW in fp32, stored once in the original dtype."""
    lay = op.layer
    out: dict[str, torch.Tensor] = {}
    rec: dict = {}
    dw = delta_weight(op, loras, device)
    if dw is not None:
        w = base.get(lay.key("weight"))
        new = (w.to(device, torch.float32) + dw).to(w.dtype)
        out[lay.key("weight")] = _check_finite(lay.key("weight"), new).cpu()
        rec = dense_record(w.to(device), new, dw)
    db = delta_bias(op, loras)
    if db is not None:
        b = base.get(lay.key("bias"))
        new = (b.float() + db).to(b.dtype)
        out[lay.key("bias")] = _check_finite(lay.key("bias"), new)
        rec["bias"] = dense_record(b, new, db)
    return out, rec


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]

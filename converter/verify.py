"""`verify`: recompute, from the files alone, how faithfully a merged checkpoint carries base + LoRAs, and
whether it keeps the stock loaders' contract. Shares the planner with `merge`, nothing else."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from mappings import by_name

from .apply import Factors, delta_bias, delta_weight, lowrank_error, lowrank_factors
from .codecs.awq_w4a16 import dequantize as awq_dequantize
from .codecs.lowrank import LowRankDown, LowRankUp
from .codecs.svdq_scales import PackedVector
from .errors import MergeError
from .model import Layout
from .pipeline import Options, Session, open_session
from .transform import interleave_rows
from .st_io import Checkpoint

LOWRANK_TOL = 1e-2  # W4A4 low-rank append is exact up to 16-bit storage
DENSE_FLOOR_FACTOR = 1.5  # 16-bit layers: within 1.5x the rounding floor of W+ΔW
FRACTION_TOL = 1e-2
MOD_TOL = 1.0  # never worse than leaving the layer as it was
MAIN_PARTS = ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "wcscales", "wtscale")


@dataclass
class VerifyResult:
    contract: list[str] = field(default_factory=list)  # loader-contract problems
    layers: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [l for l in self.layers if not l["ok"]]

    @property
    def ok(self) -> bool:
        return not self.contract and not self.failed


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def check_contract(base: Checkpoint, merged: Checkpoint, s: Session) -> list[str]:
    probs = []
    bk, mk = set(base.keys()), set(merged.keys())
    if bk != mk:
        miss, extra = sorted(bk - mk), sorted(mk - bk)
        if miss:
            probs.append(f"{len(miss)} keys missing (e.g. {miss[0]})")
        if extra:
            probs.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
    for k in sorted(bk & mk):
        a, b = base.tensors[k], merged.tensors[k]
        if a.dtype != b.dtype:
            probs.append(f"{k}: dtype {b.dtype}, base has {a.dtype}")
        part = k.rpartition(".")[2]
        if part in ("proj_down", "proj_up"):
            if a.shape[0] != b.shape[0]:
                probs.append(f"{k}: shape {b.shape}, base {a.shape}")
        elif a.shape != b.shape:
            probs.append(f"{k}: shape {b.shape}, base {a.shape}")
    ranks = {merged.tensors[k].shape[1] for k in mk if k.endswith((".proj_down", ".proj_up"))}
    qc_raw = merged.metadata.get("quantization_config")
    try:
        qc = json.loads(qc_raw) if qc_raw is not None else None
    except json.JSONDecodeError:
        qc = None
    if not isinstance(qc, dict):
        probs.append("metadata quantization_config is missing or not a JSON object")
    else:
        meta_rank = qc.get("rank", 32)
        if len(ranks) > 1:
            probs.append(f"SVDQ layers have different ranks {sorted(ranks)}; loaders build one rank for all")
        elif ranks and ranks != {meta_rank}:
            probs.append(f"metadata rank {meta_rank} does not match the layers' rank {ranks.pop()} (stale rank)")
        if any(r % 16 for r in ranks) or any(r > 1024 for r in ranks):
            probs.append(f"rank {sorted(ranks)} is not a multiple of 16 or above 1024")
        try:
            qb = json.loads(base.metadata.get("quantization_config", "{}"))
        except json.JSONDecodeError:
            qb = {}
        a, b = dict(qb), dict(qc)
        a.pop("rank", None), b.pop("rank", None)
        a.pop("runtime_manifest", None), b.pop("runtime_manifest", None)
        if a != b:
            probs.append("metadata quantization_config differs from the base beyond its rank")
    for k, v in base.metadata.items():
        if k != "quantization_config" and merged.metadata.get(k) != v:
            probs.append(f"metadata {k!r} differs from the base")
    extra_meta = set(merged.metadata) - set(base.metadata) - {"qwenlora_merge"}
    if extra_meta:
        probs.append(f"metadata has unexpected keys {sorted(extra_meta)}")
    return probs


def _lowrank_layer(p: str, s: Session, base: Checkpoint, merged: Checkpoint) -> dict:
    rec: dict = {"layer": p, "kind": "lowrank_append"}
    probs = [part for part in MAIN_PARTS if f"{p}.{part}" in base and not _same_bytes(base.get(f"{p}.{part}"), merged.get(f"{p}.{part}"))]
    d0, u0 = LowRankDown.unpack(base.get(f"{p}.proj_down")).float(), LowRankUp.unpack(base.get(f"{p}.proj_up")).float()
    d1, u1 = LowRankDown.unpack(merged.get(f"{p}.proj_down")).float(), LowRankUp.unpack(merged.get(f"{p}.proj_up")).float()
    op = s.plan.ops.get(p)
    f = lowrank_factors(op, s.loras) if op else None
    if f is None:
        r0 = d0.shape[0]
        rec["targeted"] = False
        same = d1.shape[0] >= r0 and torch.equal(d1[:r0], d0) and torch.equal(u1[:, :r0], u0)
        if not same or bool((u1[:, r0:] @ d1[r0:]).abs().max() > 0 if d1.shape[0] > r0 else False):
            probs.append("low-rank branch changed although no LoRA targets this layer")
    else:
        r0 = d0.shape[0]
        if d1.shape[0] >= r0 and torch.equal(d1[:r0], d0) and torch.equal(u1[:, :r0], u0):
            err, _ = lowrank_error(u1[:, r0:], d1[r0:], f)
        else:  # the base part itself moved: compare whole branches
            both = Factors(torch.cat([d0, f.down], 0), torch.cat([u0, f.up], 1))
            err, _ = lowrank_error(u1, d1, both)
            probs.append("the base low-rank branch was altered")
        rec["rel_error"] = err
        if err > LOWRANK_TOL:
            probs.append(f"low-rank error {err:.3g} > {LOWRANK_TOL}")
    bkey = f"{p}.bias"
    if bkey in base:
        db = delta_bias(op, s.loras) if op else None
        b0, b1 = PackedVector.unpack(base.get(bkey)).float(), PackedVector.unpack(merged.get(bkey)).float()
        want = b0 if db is None else (b0 + db).to(base.get(bkey).dtype).float()
        if not torch.allclose(b1, want, rtol=1e-2, atol=1e-3 * (1 + float(want.abs().max()))):
            probs.append("bias differs from base + bias delta")
    rec["ok"] = not probs
    rec["problems"] = probs
    return rec


def _dense_layer(p: str, s: Session, base: Checkpoint, merged: Checkpoint) -> dict:
    rec: dict = {"layer": p, "kind": "dense"}
    probs = []
    op = s.plan.ops.get(p)
    dw = delta_weight(op, s.loras) if op else None
    w0, w1 = base.get(f"{p}.weight"), merged.get(f"{p}.weight")
    if dw is None:
        if not _same_bytes(w0, w1):
            probs.append("weight changed although no LoRA targets it")
    else:
        ideal = w0.double() + dw.double()
        floor = float((ideal.to(w0.dtype).double() - ideal).norm() / dw.double().norm()) if dw.norm() > 0 else 0.0
        got = w1.double() - w0.double()
        err = float((got - dw.double()).norm() / dw.double().norm()) if dw.norm() > 0 else float(got.norm())
        frac = float((got * dw.double()).sum() / (dw.double() ** 2).sum()) if dw.norm() > 0 else 1.0
        rec |= {"rel_error": err, "rounding_floor": floor, "applied_fraction": frac}
        if err > DENSE_FLOOR_FACTOR * floor + 1e-7:
            probs.append(f"error {err:.3g} above {DENSE_FLOOR_FACTOR}x the rounding floor {floor:.3g}")
        if abs(frac - 1) > FRACTION_TOL:
            probs.append(f"applied fraction {frac:.4f}")
    bkey = f"{p}.bias"
    if bkey in base:
        db = delta_bias(op, s.loras) if op else None
        b0, b1 = base.get(bkey), merged.get(bkey)
        if db is None and not _same_bytes(b0, b1):
            probs.append("bias changed although no LoRA targets it")
        elif db is not None and not torch.allclose(b1.float(), (b0.float() + db).to(b0.dtype).float()):
            probs.append("bias differs from base + bias delta")
    rec["ok"] = not probs
    rec["problems"] = probs
    return rec


def _modulation_layer(p: str, s: Session, base: Checkpoint, merged: Checkpoint, x_eval: torch.Tensor) -> dict:
    rec: dict = {"layer": p, "kind": "modulation"}
    splits = by_name(s.model.family).modulation_splits(p)
    op = s.plan.ops.get(p)
    w0 = awq_dequantize(base.get(f"{p}.qweight"), base.get(f"{p}.wscales"), base.get(f"{p}.wzeros"))
    w1 = awq_dequantize(merged.get(f"{p}.qweight"), merged.get(f"{p}.wscales"), merged.get(f"{p}.wzeros"))
    has_b = f"{p}.bias" in base
    b0 = base.get(f"{p}.bias").float() if has_b else torch.zeros(w0.shape[0])
    b1 = merged.get(f"{p}.bias").float() if has_b else torch.zeros(w0.shape[0])
    dw = delta_weight(op, s.loras) if op else None
    probs = []
    if dw is None:
        same = all(_same_bytes(base.get(f"{p}.{k}"), merged.get(f"{p}.{k}")) for k in ("qweight", "wscales", "wzeros"))
        if not same or not torch.equal(b0, b1):
            probs.append("changed although no LoRA targets it")
    else:
        from . import modulation as M

        dw = interleave_rows(dw, splits)
        db = delta_bias(op, s.loras)
        db = interleave_rows(db, splits) if db is not None else torch.zeros_like(b0)
        y_ideal_minus_base = dw @ x_eval.T + db[:, None]
        y_new_minus_base = (w1 - w0) @ x_eval.T + (b1 - b0)[:, None]
        e = M.e_mod(y_new_minus_base - y_ideal_minus_base, y_ideal_minus_base)
        rec["e_mod"] = e
        rec["kept_base"] = bool(torch.equal(w0, w1) and torch.equal(b0, b1))
        if e > MOD_TOL + 1e-6:
            probs.append(f"e_mod {e:.3f} > {MOD_TOL} (worse than leaving the layer unchanged)")
    rec["ok"] = not probs
    rec["problems"] = probs
    return rec


def verify(base_path: str, merged_path: str, lora_specs: list[str], *, allow_unmapped: bool = False,
           progress=None) -> tuple[VerifyResult, Session]:
    opts = Options(modulation="calibrated", allow_unmapped=allow_unmapped)
    s = open_session(base_path, lora_specs, opts)
    res = VerifyResult()
    try:
        with Checkpoint(merged_path) as merged:
            res.contract = check_contract(s.base, merged, s)
            layers = s.model.layers
            x_eval = None
            todo = [p for p, l in layers.items() if l.layout in (Layout.SVDQ_INT4, Layout.SVDQ_NVFP4, Layout.AWQ_W4A16, Layout.DENSE)]
            for i, p in enumerate(todo):
                lay = layers[p]
                if any(k not in merged for k in (f"{p}.qweight", f"{p}.weight") if k in s.base):
                    continue  # reported by the contract check
                if lay.layout.is_svdq:
                    res.layers.append(_lowrank_layer(p, s, s.base, merged))
                elif lay.layout == Layout.AWQ_W4A16:
                    if x_eval is None and p in s.plan.ops:
                        from .transform import ModulationContext

                        x_eval = ModulationContext(s.base, s.model, "cpu").x_eval
                    res.layers.append(_modulation_layer(p, s, s.base, merged, x_eval))
                else:
                    res.layers.append(_dense_layer(p, s, s.base, merged))
                if progress:
                    progress(i + 1, len(todo), p)
            for p, l in layers.items():  # norm weights and other 1-D parameters
                if l.layout == Layout.VECTOR and f"{p}.weight" in merged:
                    op = s.plan.ops.get(p)
                    if op is None and not _same_bytes(s.base.get(f"{p}.weight"), merged.get(f"{p}.weight")):
                        res.layers.append({"layer": p, "kind": "vector", "ok": False,
                                           "problems": ["changed although no LoRA targets it"]})
    except BaseException:
        s.close()
        raise
    return res, s


def block_index(name: str) -> int | None:
    m = re.match(r"^[a-z_]+\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot(res: VerifyResult, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergeError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, kind, key, label in ((axes[0], "lowrank_append", "rel_error", "W4A4 low-rank rel. error"),
                                 (axes[1], "modulation", "e_mod", "modulation e_mod (1 = LoRA lost)")):
        pts = [(block_index(l["layer"]), l[key]) for l in res.layers if l["kind"] == kind and key in l]
        pts = [(b, v) for b, v in pts if b is not None]
        if pts:
            ax.scatter([b for b, _ in pts], [v for _, v in pts], s=12)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="red", lw=0.8)
    axes[1].set_xlabel("block")
    fig.suptitle("qwenlora-merge verify: per-block fidelity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

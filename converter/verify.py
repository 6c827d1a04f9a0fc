"""`verify`: recompute, from the files alone, how faithfully a merged checkpoint carries base + LoRAs, and
whether it keeps the stock loaders' contract. Shares the planner with `merge`; each layer is checked by its
layer kind (converter.layers)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .errors import MergeError
from .layers import BY_NAME, VerifyContext, kind_of
from .pipeline import Options, Session, open_session
from .st_reader import Checkpoint


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


def _tensor_problems(base: Checkpoint, merged: Checkpoint) -> list[str]:
    """Same keys and dtypes; same shapes except the rank axis of the low-rank branch."""
    probs = []
    bk, mk = set(base.keys()), set(merged.keys())
    miss, extra = sorted(bk - mk), sorted(mk - bk)
    if miss:
        probs.append(f"{len(miss)} keys missing (e.g. {miss[0]})")
    if extra:
        probs.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
    for k in sorted(bk & mk):
        a, b = base.tensors[k], merged.tensors[k]
        if a.dtype != b.dtype:
            probs.append(f"{k}: dtype {b.dtype}, base has {a.dtype}")
        lowrank = k.rpartition(".")[2] in ("proj_down", "proj_up")
        if (a.shape[0] != b.shape[0]) if lowrank else (a.shape != b.shape):
            probs.append(f"{k}: shape {b.shape}, base {a.shape}")
    return probs


def _json_object(raw: str | None) -> dict | None:
    try:
        qc = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, RecursionError):
        return None
    return qc if isinstance(qc, dict) else None


def _rank_problems(base: Checkpoint, merged: Checkpoint) -> list[str]:
    """One rank for every low-rank branch, a multiple of 16 within the kernel's limit, equal to the metadata's;
    quantization_config otherwise unchanged."""
    qc = _json_object(merged.metadata.get("quantization_config"))
    if qc is None:
        return ["metadata quantization_config is missing or not a JSON object"]
    probs = []
    ranks = {merged.tensors[k].shape[1] for k in merged.keys() if k.endswith((".proj_down", ".proj_up"))}
    meta_rank = qc.get("rank", 32)
    if len(ranks) > 1:
        probs.append(f"SVDQ layers have different ranks {sorted(ranks)}; loaders build one rank for all")
    elif ranks and ranks != {meta_rank}:
        probs.append(f"metadata rank {meta_rank} does not match the layers' rank {next(iter(ranks))} (stale rank)")
    if any(r % 16 for r in ranks) or any(r > 1024 for r in ranks):
        probs.append(f"rank {sorted(ranks)} is not a multiple of 16 or above 1024")
    a, b = dict(_json_object(base.metadata.get("quantization_config", "{}")) or {}), dict(qc)
    for d in (a, b):
        d.pop("rank", None), d.pop("runtime_manifest", None)
    if a != b:
        probs.append("metadata quantization_config differs from the base beyond its rank")
    return probs


def check_contract(base: Checkpoint, merged: Checkpoint) -> list[str]:
    probs = _tensor_problems(base, merged) + _rank_problems(base, merged)
    for k, v in base.metadata.items():
        if k != "quantization_config" and merged.metadata.get(k) != v:
            probs.append(f"metadata {k!r} differs from the base")
    extra_meta = set(merged.metadata) - set(base.metadata) - {"qwenlora_merge"}
    if extra_meta:
        probs.append(f"metadata has unexpected keys {sorted(extra_meta)}")
    return probs


def verify(base_path: str, merged_path: str, lora_specs: list[str], *, allow_unmapped: bool = False,
           progress=None) -> tuple[VerifyResult, Session]:
    s = open_session(base_path, lora_specs, Options(modulation="calibrated", allow_unmapped=allow_unmapped))
    res = VerifyResult()
    try:
        with Checkpoint(merged_path) as merged:
            res.contract = check_contract(s.base, merged)
            ctx = VerifyContext(s.base, merged, s.model)
            layers = list(s.model.layers.values())
            for i, layer in enumerate(layers):
                if any(layer.key(part) in s.base and layer.key(part) not in merged for part in ("qweight", "weight")):
                    continue  # reported by the contract check
                rec = kind_of(layer).verify(ctx, s.plan, layer, s.plan.ops.get(layer.prefix))
                if rec is not None:
                    res.layers.append(rec)
                if progress:
                    progress(i + 1, len(layers), layer.prefix)
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
    kinds = [k for k in BY_NAME.values() if k.plot_label]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3 * len(kinds)), sharex=True, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        key = kind.verify_figure
        pts = [(block_index(l["layer"]), l[key]) for l in res.layers if l["kind"] == kind.name and key in l]
        pts = [(b, v) for b, v in pts if b is not None]
        if pts:
            ax.scatter([b for b, _ in pts], [v for _, v in pts], s=12)
        if kind.plot_limit is not None:
            ax.axhline(kind.plot_limit, color="red", lw=0.8)
        ax.set_ylabel(kind.plot_label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("block")
    fig.suptitle("qwenlora-merge verify: per-block fidelity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""A layer's LoRA part assembled from its contributions (placed on the layer's rows, in the LoRA's row
order): the exact low-rank factors, the dense ΔW and the bias delta. Shared by every layer kind and by
`verify`, which recompute the same thing from the same plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..factors import Factors

if TYPE_CHECKING:
    from ..planner import LayerOp


def lowrank_factors(op: LayerOp) -> Factors | None:
    """The exact low-rank contributions as one pair (fp32, scale in `down`); members that share a down factor
    contribute one set of columns (their up rows add)."""
    low = [(i, c) for i, c in enumerate(op.contributions) if c.low_rank]
    if not low:
        return None
    col: dict[int, int] = {}
    start = 0
    for i, c in low:
        if c.shares_down_with is None:
            col[i] = start
            start += c.rank
    lay = op.layer
    down = torch.empty(start, lay.in_features)
    up = torch.zeros(lay.out_features, start)
    for i, c in low:
        f = c.adapter.factors()
        j = col[c.shares_down_with if c.shares_down_with is not None else i]
        if c.shares_down_with is None:
            down[j:j + c.rank] = f.down
        for s in c.segments:
            up[s.target_start:s.target_start + s.rows, j:j + c.rank] += f.up[s.lora_start:s.lora_start + s.rows]
    return Factors(down, up)


def dense_delta(op: LayerOp, device: str = "cpu", base: torch.Tensor | None = None, *,
                lowrank: bool = True) -> torch.Tensor | None:
    """ΔW (O, I) or (O,) for a 1-D parameter, fp32, of the weight contributions: the exact low-rank ones (unless
    `lowrank` is False) and the dense ones. `base`: the layer's current weight in the LoRA's row order, for
    adapters that need it (DoRA)."""
    out = None
    f = lowrank_factors(op) if lowrank else None
    if f is not None:
        out = f.dense(device)
    for c in op.weight_contributions:
        if c.low_rank:
            continue
        d = c.place(c.adapter.delta(_rows_of(base, c) if c.adapter.needs_base else None), op.layer.out_features)
        out = d.to(device) if out is None else out + d.to(device)
    return out


def _rows_of(base: torch.Tensor | None, c) -> torch.Tensor | None:
    """The base rows a contribution's own module covers (in the module's row order)."""
    if base is None:
        return None
    rows = [base[s.target_start:s.target_start + s.rows] for s in sorted(c.segments, key=lambda s: s.lora_start)]
    return torch.cat(rows, 0)


def bias_delta(op: LayerOp) -> torch.Tensor | None:
    """Δb (O,) fp32, in the LoRA's row order."""
    out = None
    for c in op.bias_contributions:
        d = c.place(c.adapter.delta(), op.layer.out_features)
        out = d if out is None else out + d
    return out

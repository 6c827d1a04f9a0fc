"""A layer's LoRA part assembled from its contributions (placed on the layer's rows, in the LoRA's row
order): the exact low-rank factors, the dense ΔW and the bias delta, in the space the stored layer works in
(smoothing fused upstream rescales its input columns or output rows: `runtime_scales`). Shared by every layer
kind and by `verify`, which recompute the same thing from the same plan. `ck`: the base checkpoint, needed
only by layers with fused smoothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..factors import Factors

if TYPE_CHECKING:
    from ..planner import LayerOp


def runtime_scales(op: LayerOp, ck) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(col (I,), row (O,)): the stored layer computes diag(row)·W·diag(col) of the true map W (None: ones)."""
    from ..codecs.svdq_scales import PackedVector

    def smooth(prefix: str) -> torch.Tensor:
        return PackedVector.unpack(ck.get(f"{prefix}.smooth_factor_orig")).float()

    col = smooth(op.input_smoothing) if op.input_smoothing else None
    row = None
    if op.output_smoothing:
        row = torch.ones(op.layer.out_features)
        for start, n, consumer in op.output_smoothing:
            row[start:start + n] /= smooth(consumer)
    return col, row


def lowrank_factors(op: LayerOp, ck=None) -> Factors | None:
    """The exact low-rank contributions as one pair (fp32, scale in `down`); members that share a down factor
    contribute one set of columns (their up rows add)."""
    low = [(i, c) for i, c in enumerate(op.contributions) if c.low_rank]
    if not low:
        return None
    first_column: dict[int, int] = {}
    start = 0
    for i, c in low:
        if c.shares_down_with is None:
            first_column[i] = start
            start += c.rank
    lay = op.layer
    down = torch.empty(start, lay.in_features)
    up = torch.zeros(lay.out_features, start)
    for i, c in low:
        f = c.adapter.factors()
        j = first_column[c.shares_down_with if c.shares_down_with is not None else i]
        if c.shares_down_with is None:
            down[j:j + c.rank] = f.down
        c.place_onto(up[:, j:j + c.rank], f.up, accumulate=True)
    if op.smoothed:
        col, row = runtime_scales(op, ck)
        if col is not None:
            down *= col
        if row is not None:
            up *= row[:, None]
    return Factors(down, up)


def dense_delta(op: LayerOp, device: str = "cpu", base: torch.Tensor | None = None, *, ck=None) -> torch.Tensor | None:
    """ΔW (O, I) or (O,) for a 1-D parameter, fp32, of the weight contributions, exact low-rank ones included.
    `base`: the layer's current (stored) weight, for adapters that need it (DoRA)."""
    col, row = runtime_scales(op, ck) if op.smoothed else (None, None)
    if base is not None and (col is not None or row is not None):
        base = base / (row.to(base.device)[:, None] if row is not None else 1)
        base = base / (col.to(base.device) if col is not None else 1)
    out = None
    for c in op.weight_contributions:
        if c.low_rank:
            continue
        d = c.place(c.adapter.delta(_rows_of(base, c) if c.adapter.needs_base else None), op.layer.out_features)
        out = d.to(device) if out is None else out + d.to(device)
    if out is not None and (col is not None or row is not None):
        out = out * (row.to(device)[:, None] if row is not None else 1) * (col.to(device) if col is not None else 1)
    f = lowrank_factors(op, ck)
    if f is not None:
        out = f.dense(device) if out is None else out + f.dense(device)
    return out


def _rows_of(base: torch.Tensor | None, c) -> torch.Tensor | None:
    """The base rows a contribution's own module covers (in the module's row order)."""
    if base is None:
        return None
    rows = [base[s.target_start:s.target_start + s.rows] for s in sorted(c.segments, key=lambda s: s.lora_start)]
    return rows[0] if len(rows) == 1 else torch.cat(rows, 0)


def bias_delta(op: LayerOp, ck=None) -> torch.Tensor | None:
    """Δb (O,) fp32, in the LoRA's row order."""
    out = None
    for c in op.bias_contributions:
        d = c.place(c.adapter.delta(), op.layer.out_features)
        out = d if out is None else out + d
    if out is not None and op.output_smoothing:
        out = out * runtime_scales(op, ck)[1]
    return out

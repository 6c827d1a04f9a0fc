"""Low-rank branch `proj_down` / `proj_up`: 16x16 tiles, channel-tile-major.

Logical down is (R, I) like lora_A and is stored as (I, R); logical up is (O, R) like lora_B and is stored
as (O, R). Within a tile the element at (n-role = s*8+l, k-role = t*8+q*2+e) lives at ((l*4+q)*2+s)*4+t*2+e,
where the n-role is the rank for down and the out channel for up.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import RANK_STEP
from .base import Codec, require

# a tile is RANK_STEP x RANK_STEP = 16 x 16: its inner geometry below (2 x 8 rows, 2 x 4 column pairs) is that size
assert RANK_STEP == 16


def _check(rank: int, channels: int, what: str) -> None:
    require(rank % RANK_STEP == 0 and channels % RANK_STEP == 0,
            f"{what}: rank {rank} and channels {channels} must both be multiples of {RANK_STEP}")


# The element pair (e) is innermost both before and after packing, so the permutation runs on int32 pairs, in
# numpy: its strided copy is about 10x faster than torch's for these many small axes, and this is the merge's
# hot loop (every layer's appended branch).
#   n-role = s*8 + l, k-role pair = t*4 + q   ->   pair index in the tile ((l*4 + q)*2 + s)*2 + t
def _pairs(t: torch.Tensor) -> np.ndarray:
    require(t.element_size() == 2, f"low-rank tensors are 16-bit, got {t.dtype}")
    return t.detach().cpu().contiguous().view(torch.int32).numpy()


def _from_pairs(a: np.ndarray, like: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(like.dtype).reshape(shape).to(like.device)


class _LowRankTiles(Codec):
    """One 16-bit factor of the low-rank branch. Logical (rows, cols) is (R, I) for down and (O, R) for up;
    stored (channels, R): the channel axis is the one the tiles are major in (I for down, O for up)."""

    channels_are_rows: bool

    @classmethod
    def _tiled(cls, t: torch.Tensor) -> np.ndarray:
        """Logical (rows, cols) as int32 pairs, axes permuted into the packed order (ct, rt, l, q, s, t):
        a strided view. The row coordinate is s*8+l, the column pair t*4+q."""
        rows, cols = t.shape
        _check(*((cols, rows) if cls.channels_are_rows else (rows, cols)), cls.name)
        a = _pairs(t).reshape(rows // 16, 2, 8, cols // 16, 2, 4)  # row tile, s, l, column tile, t, q
        return a.transpose(0, 3, 2, 5, 1, 4) if cls.channels_are_rows else a.transpose(3, 0, 2, 5, 1, 4)

    @classmethod
    def pack(cls, t: torch.Tensor) -> torch.Tensor:
        """Logical (R, I) -> (I, R) for down; (O, R) -> (O, R) for up."""
        rows, cols = t.shape
        return _from_pairs(cls._tiled(t), t, (rows, cols) if cls.channels_are_rows else (cols, rows))

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> torch.Tensor:
        c, r = packed.shape
        _check(r, c, cls.name)
        a = _pairs(packed).reshape(c // 16, r // 16, 8, 4, 2, 2)  # ct, rt, l, q, s, t
        if cls.channels_are_rows:
            return _from_pairs(a.transpose(0, 4, 2, 1, 5, 3), packed, (c, r))
        return _from_pairs(a.transpose(1, 4, 2, 0, 5, 3), packed, (r, c))


class LowRankDown(_LowRankTiles, name="lowrank_down"):
    channels_are_rows = False


class LowRankUp(_LowRankTiles, name="lowrank_up"):
    channels_are_rows = True


def pad_rank(t: torch.Tensor, rank: int, down: bool) -> torch.Tensor:
    """Zero-pad a logical down (R, I) along rows or up (O, R) along columns to `rank`."""
    cur = t.shape[0] if down else t.shape[1]
    require(cur <= rank, f"cannot pad rank {cur} down to {rank}")
    if cur == rank:
        return t
    if down:
        return torch.cat([t, t.new_zeros(rank - cur, t.shape[1])], dim=0)
    return torch.cat([t, t.new_zeros(t.shape[0], rank - cur)], dim=1)


def append_packed(packed: torch.Tensor, extra: torch.Tensor | None, down: bool, rank: int) -> torch.Tensor:
    """Packed (C, R0) branch + logical extra rank -> packed (C, rank), zero-padded, without unpacking the
    base part.

    Tiles are channel-tile-major ([C/16][R/16][256]), so the base's tiles keep their content and only move
    to make room; only `extra` ((r, C) for down, (C, r) for up; r a multiple of 16) is packed, and the
    padding tiles are zeros in either layout."""
    c, r0 = packed.shape
    r = 0 if extra is None else (extra.shape[0] if down else extra.shape[1])
    require(r % RANK_STEP == 0 and r0 + r <= rank and rank % RANK_STEP == 0,
            f"cannot append rank {r} to {r0} within {rank}")
    require(packed.device.type == "cpu", "append_packed works on cpu tensors")
    out = packed.new_empty(c, rank)
    ov = _pairs(out).reshape(c // 16, rank // 16, 128)  # numpy view of `out`, in int32 pairs
    ov[:, : r0 // 16] = _pairs(packed).reshape(c // 16, r0 // 16, 128)
    if r:  # permuted straight into its place: no packed temporary
        ov[:, r0 // 16: (r0 + r) // 16].reshape(c // 16, r // 16, 8, 4, 2, 2)[...] = \
            (LowRankDown if down else LowRankUp)._tiled(extra)
    ov[:, (r0 + r) // 16:] = 0
    return out


def up_rows(packed_up: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output channels [start, stop) of a packed proj_up (O, R): channel tiles of 16 are outermost, so whole
    tiles are a plain row slice. (proj_down is per input channel: a row split shares it unchanged.)"""
    from .svdq_scales import check_rows

    check_rows(packed_up.shape[0], start, stop, 16, "proj_up")
    return packed_up[start:stop].contiguous()

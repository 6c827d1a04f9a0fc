"""Low-rank branch `proj_down` / `proj_up`: 16x16 tiles, channel-tile-major.

Logical down is (R, I) like lora_A and is stored as (I, R); logical up is (O, R) like lora_B and is stored
as (O, R). Within a tile the element at (n-role = s*8+l, k-role = t*8+q*2+e) lives at ((l*4+q)*2+s)*4+t*2+e,
where the n-role is the rank for down and the out channel for up.
"""

from __future__ import annotations

import torch

from . import Codec, require


def _check(rows: int, cols: int, what: str) -> None:
    require(rows % 16 == 0 and cols % 16 == 0, f"{what}: shape {(rows, cols)} is not a multiple of 16 in both axes")


def _tiles_to_disk(t: torch.Tensor) -> torch.Tensor:
    # t: (c_tiles, r_tiles, 16 n-role, 16 k-role) -> inner order (l, q, s, t, e)
    ct, rt = t.shape[:2]
    return t.reshape(ct, rt, 2, 8, 2, 4, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(ct, rt, 256)


def _disk_to_tiles(d: torch.Tensor, ct: int, rt: int) -> torch.Tensor:
    return d.reshape(ct, rt, 8, 4, 2, 2, 2).permute(0, 1, 4, 2, 5, 3, 6).reshape(ct, rt, 16, 16)


class LowRankDown(Codec, name="lowrank_down"):
    @classmethod
    def pack(cls, down: torch.Tensor) -> torch.Tensor:
        """(R, I) -> (I, R)."""
        r, c = down.shape
        _check(r, c, "proj_down")
        t = down.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)
        return _tiles_to_disk(t).reshape(c, r)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> torch.Tensor:
        """(I, R) -> (R, I)."""
        c, r = packed.shape
        _check(r, c, "proj_down")
        t = _disk_to_tiles(packed, c // 16, r // 16)
        return t.permute(1, 2, 0, 3).reshape(r, c)


class LowRankUp(Codec, name="lowrank_up"):
    @classmethod
    def pack(cls, up: torch.Tensor) -> torch.Tensor:
        """(O, R) -> (O, R)."""
        c, r = up.shape
        _check(r, c, "proj_up")
        t = up.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
        return _tiles_to_disk(t).reshape(c, r)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> torch.Tensor:
        c, r = packed.shape
        _check(r, c, "proj_up")
        t = _disk_to_tiles(packed, c // 16, r // 16)
        return t.permute(0, 2, 1, 3).reshape(c, r)


def pad_rank(t: torch.Tensor, rank: int, down: bool) -> torch.Tensor:
    """Zero-pad a logical down (R, I) along rows or up (O, R) along columns to `rank`."""
    cur = t.shape[0] if down else t.shape[1]
    require(cur <= rank, f"cannot pad rank {cur} down to {rank}")
    if cur == rank:
        return t
    if down:
        return torch.cat([t, t.new_zeros(rank - cur, t.shape[1])], dim=0)
    return torch.cat([t, t.new_zeros(t.shape[0], rank - cur)], dim=1)

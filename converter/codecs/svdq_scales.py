"""SVDQ per-channel vectors and weight scales.

* `pack_scale` order for vectors (bias, smooth_factor, smooth_factor_orig, wcscales): inside each block of
  128 channels, packed[a*16 + c*4 + b*2 + d] = v[a*16 + b*8 + c*2 + d] (a<8, b<2, c<4, d<2).
* int4 `wscales` (I/64, O): S[n, g] stored at flat [t][g][a][c][b][d] with n = t*128 + a*16 + b*8 + c*2 + d.
* nvfp4 `wscales` (I/16, O) float8_e4m3fn micro-scales: S[n, g] with n = t*128 + sp*32 + c*8 + l and
  g = kt*4 + j stored at flat [t][kt][l][c][sp][j].
Only the flat order matters; the 2-D shapes are what the loaders check.
"""

from __future__ import annotations

import torch

from .base import Codec, require


class PackedVector(Codec, name="svdq_vector"):
    """(N,) <-> (N,) in pack_scale order."""

    @classmethod
    def pack(cls, v: torch.Tensor) -> torch.Tensor:
        require(v.ndim == 1 and v.shape[0] % 128 == 0, f"packed vector needs a multiple of 128 entries, got {tuple(v.shape)}")
        return v.reshape(-1, 8, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1)

    @classmethod
    def unpack(cls, v: torch.Tensor) -> torch.Tensor:
        require(v.ndim == 1 and v.shape[0] % 128 == 0, f"packed vector needs a multiple of 128 entries, got {tuple(v.shape)}")
        return v.reshape(-1, 8, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1)


class WScalesInt4(Codec, name="svdq_wscales_int4"):
    """S (O, I/64) 16-bit <-> packed (I/64, O)."""

    @classmethod
    def pack(cls, s: torch.Tensor) -> torch.Tensor:
        o, ng = s.shape
        require(o % 128 == 0, f"wscales: out_features {o} is not a multiple of 128")
        return s.reshape(o // 128, 8, 2, 4, 2, ng).permute(0, 5, 1, 3, 2, 4).reshape(ng, o)

    @classmethod
    def unpack(cls, p: torch.Tensor) -> torch.Tensor:
        ng, o = p.shape
        require(o % 128 == 0, f"wscales: out_features {o} is not a multiple of 128")
        return p.reshape(o // 128, ng, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(o, ng)


class WScalesNvfp4(Codec, name="svdq_wscales_nvfp4"):
    """S (O, I/16) float8_e4m3fn <-> packed (I/16, O) float8_e4m3fn."""

    @classmethod
    def pack(cls, s: torch.Tensor) -> torch.Tensor:
        o, ng = s.shape
        require(o % 128 == 0 and ng % 4 == 0, f"nvfp4 wscales: bad logical shape {(o, ng)}")
        # byte view: permutes are dtype-agnostic, and fp8 permute support varies across torch versions
        b = s.contiguous().view(torch.uint8)
        b = b.reshape(o // 128, 4, 4, 8, ng // 4, 4).permute(0, 4, 3, 2, 1, 5).reshape(ng, o)
        return b.contiguous().view(s.dtype)

    @classmethod
    def unpack(cls, p: torch.Tensor) -> torch.Tensor:
        ng, o = p.shape
        require(o % 128 == 0 and ng % 4 == 0, f"nvfp4 wscales: bad packed shape {(ng, o)}")
        b = p.contiguous().view(torch.uint8)
        b = b.reshape(o // 128, ng // 4, 8, 4, 4, 4).permute(0, 4, 3, 2, 1, 5).reshape(o, ng)
        return b.contiguous().view(p.dtype)


# -- output-row ranges in packed space (the diffusers export splits fused layers) ---------------------------------
def check_rows(n: int, start: int, stop: int, unit: int, what: str) -> None:
    """Rows [start, stop) of an n-row packed tensor can be cut without unpacking only at multiples of its tile."""
    require(0 <= start < stop <= n and start % unit == 0 and stop % unit == 0,
            f"{what}: rows {start}:{stop} of {n} are not whole {unit}-row tiles")


def vector_rows(v: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Entries [start, stop) of a per-output-channel vector in pack_scale order (bias, wcscales): the order
    permutes within blocks of 128 only, so whole blocks slice directly."""
    check_rows(v.shape[0], start, stop, 128, "packed vector")
    return v[start:stop].contiguous()


def wscales_rows(p: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output channels [start, stop) of packed wscales (int4 (I/64, O) or nvfp4 (I/16, O)). Both layouts keep
    the 128-channel tile outermost in memory ([O/128][group...][128]), so the rows are one flat stretch; the
    2-D column slice p[:, start:stop] would NOT be them."""
    ng, o = p.shape
    check_rows(o, start, stop, 128, "wscales")
    return p.contiguous().reshape(-1)[start * ng: stop * ng].reshape(ng, stop - start).clone()

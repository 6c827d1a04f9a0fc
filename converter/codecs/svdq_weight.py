"""SVDQ W4A4 `qweight`: 4-bit codes in Nunchaku's MMA tile order, stored as int8 (O, I/2).

Logical index n = nt*128 + p*16 + s*8 + l (p<8, s<2, l<8), k = kt*64 + sk*32 + lk*8 + r (sk<2, lk<4, r<8).
One int32 holds the 8 nibbles r of a (n, k/8) run at bits 4r; the int32s are ordered
[nt][kt][p][l][lk][s][sk]. int4 codes are two's-complement nibbles; nvfp4 codes are e2m1 (bit 3 = sign).
"""

from __future__ import annotations

import torch

from ..layout import Layout
from .base import Codec, LayerCodec, group_dequantize, require
from .svdq_scales import PackedVector, WScalesInt4, WScalesNvfp4

# (nt, p, s, l, kt, sk, lk, r) -> on-disk order (nt, kt, p, l, lk, s, sk, r)
_TO_DISK = (0, 4, 1, 3, 6, 2, 5, 7)
_FROM_DISK = (0, 2, 5, 3, 1, 6, 4, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
_DOT_GROUPS = 16  # input groups per step of group_dots: 0.5 MB of fp64 codes (a whole 128-row tile took 2x longer)

# e2m1 magnitudes for codes 0..7; codes 8..15 are the negatives.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _check_shape(o: int, i: int) -> None:
    require(o % 128 == 0, f"SVDQ qweight: out_features {o} is not a multiple of 128")
    require(i % 128 == 0, f"SVDQ qweight: in_features {i} is not a multiple of 128")


class _SvdqQWeight(Codec):
    signed = True

    @classmethod
    def pack(cls, codes: torch.Tensor) -> torch.Tensor:
        """codes (O, I) integer tensor (int4: -8..7, nvfp4: 0..15) -> int8 (O, I/2)."""
        o, i = codes.shape
        _check_shape(o, i)
        nib = (codes.to(torch.int32) & 0xF).reshape(o // 128, 8, 2, 8, i // 64, 2, 4, 8)
        nib = nib.permute(*_TO_DISK).contiguous()
        words = (nib << _SHIFTS.to(nib.device)).sum(dim=-1, dtype=torch.int32)
        return words.view(torch.int8).reshape(o, i // 2)

    @classmethod
    def unpack(cls, qweight: torch.Tensor) -> torch.Tensor:
        """int8 (O, I/2) -> int8 codes (O, I)."""
        require(qweight.dtype == torch.int8 and qweight.ndim == 2, "SVDQ qweight must be a 2-D int8 tensor")
        o, half = qweight.shape
        i = half * 2
        _check_shape(o, i)
        # byte j of an int32 holds the nibbles r = 2j (low) and 2j + 1 (high): split bytes, not int32 words
        # (int8 throughout: 4x less memory traffic than shifting int32s by all eight nibble offsets)
        packed = qweight.contiguous().reshape(o // 128, i // 64, 8, 8, 4, 2, 2, 4)
        if cls.signed:  # arithmetic shifts of int8 sign-extend the nibble
            nib = torch.stack([(packed << 4) >> 4, packed >> 4], dim=-1)
        else:
            unsigned = packed.view(torch.uint8)
            nib = torch.stack([unsigned & 0xF, unsigned >> 4], dim=-1).view(torch.int8)
        return nib.reshape(o // 128, i // 64, 8, 8, 4, 2, 2, 8).permute(*_FROM_DISK).reshape(o, i)


class SvdqQWeightInt4(_SvdqQWeight, name="svdq_qweight_int4"):
    signed = True


class SvdqQWeightNvfp4(_SvdqQWeight, name="svdq_qweight_nvfp4"):
    """Codes are e2m1 bit patterns 0..15; `E2M1_VALUES[codes]` gives their values."""

    signed = False


class _SvdqLayer(LayerCodec):
    """Nunchaku's `SVDQW4A4Linear` main path: `dequantize` gives Ŵ·diag(wcscales)·wtscale, the weight that
    multiplies the smoothed input x ⊘ smooth_factor (the low-rank branch is separate: codecs.lowrank)."""

    weight_parts = ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "wcscales", "wtscale")
    required_parts = ("qweight", "wscales")
    codes: type[_SvdqQWeight]
    scales: type[Codec]

    @classmethod
    def logical_shape(cls, qweight: torch.Tensor) -> tuple[int, int]:
        return qweight.shape[0], qweight.shape[1] * 2

    @classmethod
    def _dequantize(cls, t, o: int, i: int) -> torch.Tensor:
        s = cls.scales.unpack(t["wscales"])
        require(tuple(s.shape) == (o, i // cls.group_size), f"{cls.layout.value}: wscales do not fit {(o, i)}")
        return cls._channel_scales(group_dequantize(cls._values(cls.codes.unpack(t["qweight"])), s), t)

    @classmethod
    def _values(cls, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()

    @classmethod
    def _channel_scales(cls, w: torch.Tensor, t) -> torch.Tensor:
        return w


class SvdqInt4Layer(_SvdqLayer, layout=Layout.SVDQ_INT4):
    codes, scales = SvdqQWeightInt4, WScalesInt4


class SvdqNvfp4Layer(_SvdqLayer, layout=Layout.SVDQ_NVFP4):
    """e2m1 codes, fp8 micro-scales per 16 inputs, then the per-tensor wtscale and per-channel wcscales."""

    codes, scales = SvdqQWeightNvfp4, WScalesNvfp4

    @classmethod
    def _values(cls, codes: torch.Tensor) -> torch.Tensor:
        return E2M1_VALUES[codes.long()]

    @classmethod
    def _channel_scales(cls, w: torch.Tensor, t) -> torch.Tensor:
        if "wtscale" in t:
            w = w * t["wtscale"].float().reshape(())
        if "wcscales" in t:
            w = w * PackedVector.unpack(t["wcscales"]).float()[:, None]
        return w


def qweight_rows(qweight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output rows [start, stop) of a packed SVDQ qweight (int4 or nvfp4 codes). The 128-row tile (nt) is
    outermost on disk, so whole tiles are a plain row slice of the packed (O, I/2) tensor."""
    from .svdq_scales import check_rows

    check_rows(qweight.shape[0], start, stop, 128, "SVDQ qweight")
    return qweight[start:stop].contiguous()


def group_dots(qweight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp64 (O, I/64): D[n, g] = Σ_{k in group g} q[n, k]·v[k] for signed int4 codes q, computed in packed space:
    a group of 64 inputs is one kt tile, so the nibbles are taken in their stored order and v is laid out to
    match, instead of unpacking; one 128-row tile at a time (a 3072x12288 layer: ~0.06 s on one thread)."""
    require(qweight.dtype == torch.int8 and qweight.ndim == 2, "SVDQ qweight must be a 2-D int8 tensor")
    o, half = qweight.shape
    i = half * 2
    _check_shape(o, i)
    require(v.shape == (i,), f"group_dots: vector of {tuple(v.shape)} for {i} inputs")
    ng = i // 64
    # v as (nibble of the byte, kt, (lk, sk, byte)): the low nibble of byte j is r = 2j, the high one r = 2j + 1
    vt = v.double().reshape(ng, 2, 4, 4, 2).permute(4, 0, 2, 1, 3).reshape(2, ng, 32, 1)
    out = torch.empty(o, ng, dtype=torch.float64)
    for row in range(0, o, 128):  # one 128-row tile: bytes in stored order [kt][p][l][lk][s][sk][byte]
        tile = qweight[row:row + 128].reshape(ng, 8, 8, 4, 2, 2, 4).permute(0, 1, 4, 2, 3, 5, 6).reshape(ng, 128, 32)
        # a few groups at a time, so that their fp64 copies stay in cache (each group's product is unchanged)
        for group in range(0, ng, _DOT_GROUPS):
            part, vpart = tile[group:group + _DOT_GROUPS], vt[:, group:group + _DOT_GROUPS]
            low, high = (part << 4) >> 4, part >> 4  # arithmetic shifts: the two signed nibbles
            dots = torch.bmm(low.to(torch.float64), vpart[0]) + torch.bmm(high.to(torch.float64), vpart[1])
            # rows of the tile in (p, s, l) order: n = p*16 + s*8 + l
            out[row:row + 128, group:group + _DOT_GROUPS] = dots.reshape(-1, 128).t()
    return out

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
    """fp64 (O, I/64): D[n, g] = Σ_{k in group g} q[n, k]·v[k] for signed int4 codes q, computed in packed space
    and exact up to v's 63rd bit below each group's largest |v| (then one fp64 rounding per piece).

    A group of 64 inputs is one kt tile: a 64-byte run of each row, nibbles in stored order, so v is laid out to
    match instead of unpacking. v is split per group into signed 7-bit integer pieces; the int8 nibbles times the
    int8 pieces sum exactly in int32 (an int8 matrix product), and the pieces' sums are scaled back in fp64. The
    fp64 products this replaces cost 43 ms on one thread for a 3072 x 12288 layer, this 32 ms."""
    require(qweight.dtype == torch.int8 and qweight.ndim == 2, "SVDQ qweight must be a 2-D int8 tensor")
    o, half = qweight.shape
    i = half * 2
    _check_shape(o, i)
    require(v.shape == (i,), f"group_dots: vector of {tuple(v.shape)} for {i} inputs")
    require(bool(torch.isfinite(v).all()), "group_dots: the vector holds inf or NaN (a zero smoothing factor?)")
    ng, nt = i // 64, o // 128
    # v as (kt, lk, sk, byte, nibble): k = kt*64 + sk*32 + lk*8 + r, and nibble r of a byte is 2*byte + (0 low, 1 high)
    pieces, exponent = _int8_pieces(v.double().reshape(ng, 2, 4, 4, 2).permute(0, 2, 1, 3, 4).reshape(ng, 64))
    weights = _tile_weights(pieces.view(ng, 4, 2, 4, 2, _PIECES))
    # each group's bytes of every row together: (kt, (nt, p, l), (lk, s, sk, byte))
    codes = qweight.view(nt, ng, 64, 64).transpose(0, 1).contiguous().view(ng, nt * 64, 64)
    sums = torch.empty(ng, nt * 64, 2 * _PIECES, dtype=torch.int32)
    for kt in range(ng):
        tile = codes[kt]
        torch.add(_int8_mm((tile << 4) >> 4, weights[0, kt]), _int8_mm(tile >> 4, weights[1, kt]), out=sums[kt])
    unit = torch.pow(2.0, -_PIECE_BITS * torch.arange(1, _PIECES + 1, dtype=torch.float64))
    dots = sums.view(-1, _PIECES).double().mv(unit).view(ng, nt, 8, 8, 2)
    dots *= torch.pow(2.0, exponent).view(ng, 1, 1, 1, 1)
    return dots.permute(1, 2, 4, 3, 0).reshape(o, ng)  # (kt, nt, p, l, s) -> n = nt*128 + p*16 + s*8 + l


_PIECE_BITS, _PIECES = 7, 9  # signed 7-bit pieces: |nibble x piece| <= 8 * 127, 64 of them fit int32 and fp32


def _int8_pieces(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v (groups, K) fp64 -> (pieces (groups, K, P) int8, exponent (groups,) fp64) with
    v = 2^exponent · Σ_p pieces[..., p] · 2^(-7(p+1)) up to the last piece (every step exact in fp64)."""
    _, exponent = torch.frexp(v.abs().amax(1))  # |v| < 2^exponent in each group
    rest = v * torch.pow(2.0, -exponent.double())[:, None]
    pieces = []
    for _ in range(_PIECES):
        rest = rest * (1 << _PIECE_BITS)
        whole = rest.trunc()
        pieces.append(whole)
        rest = rest - whole
    return torch.stack(pieces, -1).to(torch.int8), exponent.double()


def _tile_weights(pieces: torch.Tensor) -> torch.Tensor:
    """(nibble, kt, (lk, s, sk, byte), (s', piece)) int8: a row's 64 stored bytes of group kt times these give the
    piece sums of its two output rows s' = 0, 1 (the bytes of s hold row s's codes)."""
    ng = pieces.shape[0]
    weights = torch.zeros(2, ng, 4, 2, 2, 4, 2, _PIECES, dtype=torch.int8)
    for s in range(2):
        weights[:, :, :, s, :, :, s] = pieces.permute(4, 0, 1, 2, 3, 5)
    return weights.view(2, ng, 64, 2 * _PIECES)


_INT8_MM: list[bool] = []  # whether torch._int_mm runs here (checked once)


def _int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> int32, exact: torch._int_mm where the build has it on the CPU, else an
    fp32 product (exact too: every partial sum here is an integer below 2^24)."""
    if not _INT8_MM:
        try:
            _INT8_MM.append(torch.equal(torch._int_mm(a, b), (a.float() @ b.float()).to(torch.int32)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT8_MM.append(False)
    if _INT8_MM[0]:
        return torch._int_mm(a, b)
    return (a.float() @ b.float()).to(torch.int32)

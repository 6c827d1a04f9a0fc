"""AWQ W4A16 (TinyChat) layer of Nunchaku's `AWQW4A16Linear`, group size 64.

`qweight` int32 (O/4, I/2): viewed as int16 (O/4, I), the int16 at [n4, c64*64 + r*16 + h*8 + b] holds the
unsigned codes q[n = 4*n4 + r, k = 64*c64 + 32*h + 8*a + b] at bits 4a (a<4).
`wscales`, `wzeros` (I/64, O): dequantization is W[n, k] = q[n, k] * wscales[k//64, n] + wzeros[k//64, n]
(the stored zero is already scaled and negated).
"""

from __future__ import annotations

import torch

from ..layout import AWQ_GROUP, Layout
from .base import Codec, LayerCodec, group_dequantize, require

GROUP = AWQ_GROUP


class AwqQWeight(Codec, name="awq_qweight"):
    """The nibble permutation runs on uint8 (codes fit in a byte): int32 intermediates made the full-size
    layers 3x slower, and the 120 modulation layers are unpacked and packed on every merge that touches them."""

    @classmethod
    def pack(cls, codes: torch.Tensor) -> torch.Tensor:
        """uint codes (O, I) in 0..15 -> int32 (O/4, I/2)."""
        o, i = codes.shape
        require(o % 4 == 0 and i % 64 == 0, f"AWQ qweight: bad shape {(o, i)}")
        q = (codes.to(torch.uint8) & 0xF).reshape(o // 4, 4, i // 64, 2, 4, 8)  # n4, r, c64, h, a, b
        q = q.permute(0, 2, 1, 3, 5, 4)  # n4, c64, r, h, b, a
        lo = q[..., 0] | (q[..., 1] << 4)  # byte 0 of the little-endian int16: nibbles a = 0, 1
        hi = q[..., 2] | (q[..., 3] << 4)  # byte 1: nibbles a = 2, 3
        return torch.stack([lo, hi], dim=-1).reshape(o // 4, i * 2).view(torch.int32)

    @classmethod
    def unpack(cls, qweight: torch.Tensor) -> torch.Tensor:
        """int32 (O/4, I/2) -> uint8 codes (O, I)."""
        require(qweight.dtype == torch.int32 and qweight.ndim == 2, "AWQ qweight must be a 2-D int32 tensor")
        o4, half = qweight.shape
        i = half * 2
        by = qweight.contiguous().view(torch.uint8).reshape(o4, i // 64, 4, 2, 8, 2)  # n4, c64, r, h, b, byte
        nib = torch.stack([by[..., 0] & 0xF, by[..., 0] >> 4, by[..., 1] & 0xF, by[..., 1] >> 4], dim=-1)
        return nib.permute(0, 2, 1, 3, 5, 4).reshape(o4 * 4, i)  # n4, r, c64, h, a, b


def _column_bytes(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For input columns `idx` (m,): the byte of each (r, column) in the (O/4, 2I) uint8 view, (4, m), and
    which nibble of it holds the code (0 low, 1 high), (m,). The int16 at [n4, c64*64 + r*16 + h*8 + b] holds
    nibble a at bits 4a: byte a // 2 of it (little-endian), nibble a % 2 of that byte."""
    c64, h, a, b = idx // 64, (idx % 64) // 32, (idx % 32) // 8, idx % 8
    r = torch.arange(4, device=idx.device)[:, None]
    return 2 * (c64 * 64 + r * 16 + h * 8 + b) + a // 2, a % 2


def qweight_columns(qweight: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The codes of input columns `idx` (m,) of a packed qweight, (m, O) of `dtype` (a column per row: the layout
    the modulation merge works in), without unpacking the others."""
    m = idx.numel()
    if m == 0:
        return torch.empty(0, qweight.shape[0] * 4, dtype=dtype, device=qweight.device)
    where, high = _column_bytes(idx.to(qweight.device))
    # the bytes in (column, r) order: a packed row's four r of one column are then one int32, so the transpose to
    # a column per row moves int32s (torch moves single bytes, and 3-D permutations, several times slower); gather
    # on dim 1 walks the packed rows in turn (index_select on dim 1 goes column by column: 4x slower)
    o4, at = qweight.shape[0], where.T.reshape(-1)
    picked = torch.gather(qweight.contiguous().view(torch.uint8), 1, at.expand(o4, -1))  # (O/4, (column, r))
    columns = picked.view(torch.int32).T.contiguous().view(torch.uint8)  # (m, O)
    columns = columns.bitwise_right_shift_((4 * high).to(torch.uint8)[:, None]).bitwise_and_(0xF)
    return columns if dtype == torch.uint8 else columns.to(dtype)


def replace_qweight_columns(qweight: torch.Tensor, idx: torch.Tensor, codes: torch.Tensor,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of a packed qweight whose input columns `idx` (m,) hold `codes` (m, O) 0..15 (a column per row);
    every other nibble is copied as it is. `out`: a contiguous copy of qweight to write into instead of a new
    one. Two columns may share a byte (its low and its high nibble), so the low nibbles are written first, then
    the high ones: within one half every byte is another. `idx` may stay on the CPU for a qweight on a GPU (its
    split into halves then needs no wait for the device)."""
    o4, m = qweight.shape[0], idx.numel()
    out = qweight.contiguous().clone() if out is None else out
    if m == 0:
        return out
    where, high = _column_bytes(idx)
    shifted = codes.to(torch.uint8) << (4 * high).to(device=codes.device, dtype=torch.uint8)[:, None]
    fields = shifted.view(torch.int32).T.contiguous().view(torch.uint8).view(o4, m, 4)  # (O/4, column, r)
    out_bytes = out.view(torch.uint8)
    for half, keep in ((0, 0xF0), (1, 0x0F)):
        cols = (high == half).nonzero().squeeze(1)
        if cols.numel():
            at = where[:, cols].T.reshape(-1).to(qweight.device).expand(o4, -1)
            new = fields.index_select(1, cols.to(qweight.device)).reshape(o4, -1)
            # gather / scatter on dim 1 walk the packed rows in turn (index_select / index_copy_: column by column)
            out_bytes.scatter_(1, at, torch.gather(out_bytes, 1, at).bitwise_and_(keep).bitwise_or_(new))
    return out


class AwqGroupParams(Codec, name="awq_group_params"):
    """Per-group scales or zeros: logical (O, I/64) <-> stored (I/64, O) (a transpose)."""

    @classmethod
    def pack(cls, s: torch.Tensor) -> torch.Tensor:
        return s.t().contiguous()

    @classmethod
    def unpack(cls, p: torch.Tensor) -> torch.Tensor:
        return p.t().contiguous()


class AwqW4A16Layer(LayerCodec, layout=Layout.AWQ_W4A16):
    """Nunchaku's `AWQW4A16Linear`: W = q·wscales + wzeros per group of 64 inputs, exactly as the gemv kernel
    decodes it. The stored group params may carry padding rows past I/64 (kept, never read)."""

    weight_parts = ("qweight", "wscales", "wzeros")
    required_parts = weight_parts

    @classmethod
    def logical_shape(cls, qweight: torch.Tensor) -> tuple[int, int]:
        return qweight.shape[0] * 4, qweight.shape[1] * 2

    @classmethod
    def _dequantize(cls, t, o: int, i: int) -> torch.Tensor:
        ng = i // GROUP
        ws, wz = t["wscales"], t["wzeros"]
        require(ws.shape[0] >= ng and ws.shape[1] == o and wz.shape == ws.shape,
                f"AWQ wscales/wzeros shape {tuple(ws.shape)} does not fit {(o, i)}")
        return group_dequantize(AwqQWeight.unpack(t["qweight"]), AwqGroupParams.unpack(ws[:ng]),
                                AwqGroupParams.unpack(wz[:ng]))


def dequantize(qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor) -> torch.Tensor:
    """Packed AWQ tensors -> fp32 W (O, I)."""
    return AwqW4A16Layer.dequantize({"qweight": qweight, "wscales": wscales, "wzeros": wzeros})


# -- output-row permutations in packed space (the diffusers export de-interleaves Qwen's modulation rows) ----------
# In the int32 view of qweight (O/4, I/2) the eight words (n4, c64*32 + r*8 + w), w < 8, are channel n = 4*n4 + r's
# codes for the inputs of group c64 (the int16 layout above): a row permutation moves whole 32-byte chunks.
_CHUNK_MAPS: dict[tuple, torch.Tensor] = {}  # (shape, permutation) -> source chunk of every output chunk
_CHUNK_MAPS_KEPT = 8


def _chunk_map(o4: int, half: int, perm: torch.Tensor) -> torch.Tensor:
    """Flat index of the source 32-byte chunk of each chunk of the permuted qweight, computed once per shape and
    permutation (the 120 modulation layers of a Qwen checkpoint share both)."""
    key = (o4, half, perm.numpy().tobytes())
    found = _CHUNK_MAPS.get(key)
    if found is None:
        groups = half // 32
        channel = perm.reshape(o4, 1, 4)  # output chunk (n4, c64, r) holds source channel perm[4*n4 + r]
        group = torch.arange(groups, dtype=torch.int64).reshape(1, groups, 1)
        found = ((channel // 4) * (half // 8) + group * 4 + channel % 4).reshape(-1)
        if len(_CHUNK_MAPS) >= _CHUNK_MAPS_KEPT:
            _CHUNK_MAPS.clear()
        _CHUNK_MAPS[key] = found
    return found


def permute_qweight_rows(qweight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Packed qweight of the layer whose output row i is row perm[i] of this one: whole 32-byte words move, no
    nibble is unpacked (one gather of chunks)."""
    require(qweight.dtype == torch.int32 and qweight.ndim == 2 and qweight.shape[1] % 32 == 0,
            "AWQ qweight must be a 2-D int32 tensor of whole 64-input groups")
    o4, half = qweight.shape
    require(perm.shape == (o4 * 4,), f"permutation of {tuple(perm.shape)} rows for an AWQ layer of {o4 * 4}")
    chunks = qweight.contiguous().view(torch.int64).reshape(-1, 4)  # a chunk: 8 int32 words = 4 int64
    return chunks.index_select(0, _chunk_map(o4, half, perm.long())).view(torch.int32).reshape(o4, half)


def permute_group_params(p: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Stored wscales / wzeros (I/64, O) of the row-permuted layer: one column per output row."""
    require(p.ndim == 2 and perm.shape == (p.shape[1],),
            f"permutation of {tuple(perm.shape)} rows for group params {tuple(p.shape)}")
    return p[:, perm.long()].contiguous()

"""CPU reference forwards built from the packed tensors with our codecs (the maths of docs/format.md §5 and
§8). Used by the tests only; slow but obviously right.

SVDQ W4A4:  y = ((x ⊘ s)·Ŵᵀ) ⊙ wcscales + bias + (x·Dᵀ)·Uᵀ
            Ŵ[n,k] = q[n,k]·wscales[n,k//64] (int4) or e2m1(q)·fp8(wscales[n,k//16])·wtscale (nvfp4)
AWQ W4A16:  y = x·Wᵀ + bias with W = q·scale + zero; Qwen's modulation output is then de-interleaved.
"""

from __future__ import annotations

import torch

from converter.codecs import layer_codec
from converter.codecs.lowrank import LowRankDown, LowRankUp
from converter.codecs.svdq_scales import PackedVector
from converter.layout import Layout


def svdq_main_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Ŵ·diag(wcscales) of the 4-bit path, fp32 (O, I): the weight that multiplies x ⊘ smooth."""
    nvfp4 = t["wscales"].dtype == torch.float8_e4m3fn
    return layer_codec(Layout.SVDQ_NVFP4 if nvfp4 else Layout.SVDQ_INT4).dequantize(t)


def svdq_lowrank(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(D (R, I), U (O, R)) unpacked, fp32."""
    return LowRankDown.unpack(t["proj_down"]).float(), LowRankUp.unpack(t["proj_up"]).float()


def svdq_forward(t: dict[str, torch.Tensor], x: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
    """Reference forward of an SVDQW4A4Linear; x (B, I) fp32. With act_quant the smoothed input is
    fake-quantized per token in groups of 64 (int4 symmetric), as the kernel does for int4."""
    s = PackedVector.unpack(t["smooth_factor"]).float()
    xs = x / s
    if act_quant:
        b, i = xs.shape
        g = xs.reshape(b, i // 64, 64)
        sc = g.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
        xs = (torch.round(g / sc).clamp(-8, 7) * sc).reshape(b, i)
    y = xs @ svdq_main_weight(t).T
    if "bias" in t:
        y = y + PackedVector.unpack(t["bias"]).float()
    d, u = svdq_lowrank(t)
    return y + (x @ d.T) @ u.T


def awq_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return layer_codec(Layout.AWQ_W4A16).dequantize(t)


def awq_forward(t: dict[str, torch.Tensor], x: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """Reference forward of AWQW4A16Linear; with `splits` the output is de-interleaved into diffusers order
    (`view(B, -1, splits).transpose(1, 2)`), as Nunchaku's Qwen block does right after the layer."""
    y = x @ awq_weight(t).T
    if "bias" in t:
        y = y + t["bias"].float()
    if splits:
        b = y.shape[0]
        y = y.reshape(b, -1, splits).transpose(1, 2).reshape(b, -1)
    return y


def dense_forward(t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = x @ t["weight"].float().T
    return y + t["bias"].float() if "bias" in t else y


def layer_tensors(ckpt, prefix: str) -> dict[str, torch.Tensor]:
    """All tensors `prefix.*` of a checkpoint (a converter.st_io.Checkpoint) keyed by their last part."""
    out = {}
    for name in ckpt.keys():
        p, _, part = name.rpartition(".")
        if p == prefix:
            out[part] = ckpt.get(name)
    return out

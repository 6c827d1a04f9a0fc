"""Synthetic Nunchaku 4-bit checkpoints for tests (Qwen-Image and Z-Image-Turbo).

Every packed tensor is produced by deepcompressor's packers (a third party, test-only oracle), so the
layouts are independent of our own codecs. Key names, dtypes and the metadata contract follow
docs/format.md §1, §2, §3, §8 and §10.

Public API
----------
build_qwen_checkpoint(path, *, blocks=2, dim=256, text_dim=256, rank=32, precision="int4", seed=0,
                      fused_smooth=()) -> dict
build_zimage_checkpoint(path, *, layers=2, dim=384, rank=32, precision="int4", skip_refiners=False,
                        seed=0) -> dict

Both write ``path`` (a .safetensors file) and return a "truth" dict, see ``_new_truth`` below:

truth["path"]          str path written
truth["family"]        "qwen" | "zimage"
truth["precision"]     "int4" | "nvfp4"
truth["rank"]          rank written in the metadata and used by every SVDQ layer
truth["metadata"]      the exact str->str metadata written
truth["keys"]          sorted list of tensor keys written
truth["state_dict"]    {key: tensor} exactly as written (do not mutate: fixtures are session scoped)
truth["weights"]       {module: bf16 (O, I)} the unquantized weight each linear started from, in the
                       LOGICAL (diffusers) domain: for AWQ layers diffusers row order (not interleaved),
                       for fused layers the fused rows ([q;k;v], Z-Image [w3;w1]).
truth["biases"]        {module: bf16 (O,)} logical biases (diffusers order, AWQ without the +1)
truth["svdq"]          {module: layer truth} for SVDQW4A4 layers:
    "weight"            bf16 (O, I) logical weight (same as truth["weights"][module])
    "bias"              bf16 (O,) logical bias or None
    "smooth"            bf16 (I,) plain-order smoothing vector s (what smooth_factor_orig unpacks to)
    "smooth_runtime"    bf16 (I,) plain-order runtime divisor (== smooth, or ones if fused upstream)
    "fused_smooth"      bool
    "lora_down"         bf16 (R, I) plain original low-rank down (acts on the layer's runtime input)
    "lora_up"           bf16 (O, R) plain original low-rank up
    "q"                 int8 (O, I) quantized codes (int4: -8..7; nvfp4: e2m1 nibble 0..15)
    "wscales"           fp32 (O, I/gs) plain group scales as stored (nvfp4: the fp8 micro-scales)
    "wcscales"          fp32 (O,) plain (nvfp4 only, else None)
    "wtscale"           float (nvfp4 only, else None)
    "bias_stored"       bf16 (O,) plain bias as stored (V rows divided by s if the block is fused)
    "w_eff"             fp32 (O, I) exact effective weight of the stored layer on its runtime input:
                        diag(wcscales)·What·diag(1/smooth_runtime) + lora_up·lora_down
    "w_deq"             fp32 (O, I) same map expressed in the logical domain (≈ "weight")
    "b_deq"             fp32 (O,) logical-domain bias (≈ "bias"), None if no bias
truth["awq"]           {module: layer truth} for Qwen img_mod.1 / txt_mod.1:
    "weight", "bias"    bf16 logical diffusers-order weight (6D, D) and bias (6D,)
    "q"                 uint8 (O, I) codes 0..15, INTERLEAVED row order (nunchaku order)
    "wscales","wzeros"  bf16 (I/64, O) as stored (interleaved columns)
    "bias_stored"       bf16 (O,) interleaved, +1 folded into the scale entries
    "w_deq"             fp32 (O, I) dequantized weight, DIFFUSERS row order
    "b_deq"             fp32 (O,) stored bias de-interleaved, minus the +1
truth["dense"]         {key: bf16 tensor} every bf16 parameter outside the quantized layers
truth["lora_targets"]  {canonical diffusers module: (out, in)} shapes to feed random_lora_modules
truth["target_map"]    {canonical module: (checkpoint module, row_start, row_stop)} where a LoRA on the
                       canonical module lands (rows in logical/diffusers order of the checkpoint module)
Qwen also: "dim", "text_dim", "blocks", "fused_smooth" (sorted list of SVDQ modules with ones/orig=s).
Z-Image also: "dim", "layers", "ffn_dim", "skip_refiners", "cap_feat_dim".

Helpers: quantization_config(precision, rank, **extra) -> dict, qwen_config(blocks, dim, text_dim) -> dict,
zimage_config(layers, dim, cap_feat_dim) -> dict, zimage_ffn_dim(dim) -> int, E2M1_VALUES (code -> value).

Builds run single-threaded (restored afterwards): the tensors are small and intra-op threads only add
overhead. nvfp4 builds swap deepcompressor's fp_quantize for an equivalent bucketize (FAST_FP_QUANTIZE;
tests/test_fixtures.py proves the bytes are identical with it off).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import deepcompressor.backend.nunchaku.utils as _dc_nunchaku
from deepcompressor.backend.nunchaku.utils import (
    convert_to_nunchaku_w4x4y16_linear_weight,
    convert_to_nunchaku_w4x16_linear_weight,
)

__all__ = [
    "build_qwen_checkpoint",
    "build_zimage_checkpoint",
    "quantization_config",
    "qwen_config",
    "zimage_config",
    "zimage_ffn_dim",
    "E2M1_VALUES",
]

BF16 = torch.bfloat16
HEAD_DIM = 128
ADALN_EMBED_DIM = 256
QWEN_TIMESTEP_DIM = 256
# nvfp4 only: swap deepcompressor's fp_quantize (argmin over an (N,16) temporary) for an equivalent
# bucketize during the build; set False to run deepcompressor's own rounding (slower, same bytes).
FAST_FP_QUANTIZE = True
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)


# --------------------------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _randn(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32) * std


def _linear(g: torch.Generator, out_f: int, in_f: int) -> torch.Tensor:
    return _randn(g, out_f, in_f, std=1.0 / math.sqrt(in_f)).to(BF16)


def _bias(g: torch.Generator, n: int, std: float = 0.02) -> torch.Tensor:
    return _randn(g, n, std=std).to(BF16)


def _norm_weight(g: torch.Generator, n: int) -> torch.Tensor:
    return (1.0 + _randn(g, n, std=0.05)).to(BF16)


def _smooth(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.exp(_randn(g, n, std=0.4)).to(BF16)


def _check_precision(precision: str) -> None:
    if precision not in ("int4", "nvfp4"):
        raise ValueError(f"precision must be 'int4' or 'nvfp4', got {precision!r}")


def _check_rank(rank: int) -> None:
    if rank <= 0 or rank % 16:
        raise ValueError(f"rank must be a positive multiple of 16, got {rank}")


def quantization_config(precision: str, rank: int, **extra) -> dict:
    """The metadata ``quantization_config`` object nunchaku's merge_safetensors writes."""
    _check_precision(precision)
    if precision == "int4":
        spec = {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    else:
        spec = {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
    qc = {"method": "svdquant", "weight": dict(spec), "activation": dict(spec), "rank": rank}
    qc.update(extra)
    return qc


# ------------------------------------------------------------------------------------ SVDQ W4A4 layers


@contextlib.contextmanager
def _single_thread():
    """The tensors here are small: intra-op threading only costs (badly so on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _single_thread():
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _quiet_dc():
    """deepcompressor's pad() indexes with a list of slices (a torch UserWarning); keep test output clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
        yield


def _svdq_layer(
    g: torch.Generator,
    prefix: str,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor,
    *,
    fused: bool,
    rank: int,
    precision: str,
    sd: dict,
) -> dict:
    """Quantize one SVDQW4A4Linear through deepcompressor and write its keys into ``sd``.

    target: fp32 (O, I) the map from the layer's RUNTIME input to its output that the stored layer
            must approximate (for a fused-smoothing layer the runtime input is x/s).
    bias:   bf16 (O,) stored (plain order) bias, or None (no bias key written).
    smooth: bf16 (I,) smoothing vector s.  fused -> runtime divisor is ones, orig = s.
    """
    out_f, in_f = target.shape
    smooth_rt = torch.ones_like(smooth) if fused else smooth
    lora_down = _randn(g, rank, in_f, std=1.0 / math.sqrt(in_f)).to(BF16)
    lora_up = _randn(g, out_f, rank, std=0.1 / math.sqrt(rank)).to(BF16)
    # SVDQuant: the 4-bit part carries the residual of the low-rank branch, smoothed.
    residual = target - lora_up.float() @ lora_down.float()
    w_s = (residual * smooth_rt.float()[None, :]).to(BF16)

    if precision == "int4":
        gs = 64
        ng = in_f // gs
        scale = (w_s.float().view(out_f, ng, gs).abs().amax(-1) / 7.0).clamp_min(1e-8).to(BF16)
        # deepcompressor divides by the scale it is GIVEN (fp32) but stores scale.to(bf16):
        # pass bf16-exact scales so codes and stored scales agree.
        with _quiet_dc():
            qweight, wscales, bias_p, smooth_p, lora_p, _ = convert_to_nunchaku_w4x4y16_linear_weight(
                w_s,
                scale.view(out_f, 1, ng, 1),
                bias=None if bias is None else bias.clone(),
                smooth=smooth_rt.clone(),
                lora=(lora_down, lora_up),
            )
        q = (w_s.float().view(out_f, 1, ng, gs) / scale.float().view(out_f, 1, ng, 1)).round().view(out_f, in_f)
        w_hat = (q.view(out_f, ng, gs) * scale.float()[..., None]).view(out_f, in_f)
        wscales_plain = scale.float()
        wcscales_plain = None
        wtscale = None
        extra = {}
    else:
        gs = 16
        ng = in_f // gs
        # per-channel c = wcscales * wtscale; wtscale is a power of two so dividing by it is exact
        c = w_s.float().abs().amax(1).clamp_min(1e-8) / (6.0 * 64.0)
        wtscale = float(2.0 ** round(math.log2(float(c.median()))))
        wcscales = (c / wtscale).to(BF16)
        w_in = (w_s.float() / wtscale).to(BF16)
        sub = w_in.float().view(out_f, ng, gs).abs().amax(-1) / 6.0 / wcscales.float()[:, None]
        # pre-round the micro-scales to fp8 (deepcompressor divides by the unrounded values but stores fp8)
        sub = sub.clamp(2.0**-6, 448.0).to(torch.float8_e4m3fn).to(BF16)
        with _fp_quantize_hook() as captured, _quiet_dc():
            qweight, wcs_p, bias_p, smooth_p, lora_p, wscales = convert_to_nunchaku_w4x4y16_linear_weight(
                w_in,
                wcscales.view(out_f, 1, 1, 1),
                bias=None if bias is None else bias.clone(),
                smooth=smooth_rt.clone(),
                lora=(lora_down, lora_up),
                float_point=True,
                subscale=sub.view(out_f, 1, ng, 1),
            )
        q = captured["codes"].view(out_f, in_f)  # the very codes deepcompressor packed
        col = wcscales.float()[:, None, None] * wtscale
        w_hat = (E2M1_VALUES[q].view(out_f, ng, gs) * (sub.float()[..., None] * col)).view(out_f, in_f)
        wscales_plain = sub.float()
        wcscales_plain = wcscales.float()
        extra = {
            "wcscales": wcs_p.to(BF16).contiguous(),
            "wtscale": torch.tensor([wtscale], dtype=torch.float32),
        }
        assert wscales.dtype == torch.float8_e4m3fn

    proj_down, proj_up = lora_p
    assert qweight.shape == (out_f, in_f // 2) and qweight.dtype == torch.int8
    assert tuple(wscales.shape) == (in_f // gs, out_f), wscales.shape
    assert proj_down.shape == (in_f, rank) and proj_up.shape == (out_f, rank)

    sd[f"{prefix}.qweight"] = qweight.contiguous()
    sd[f"{prefix}.wscales"] = wscales.contiguous()
    if fused:
        # runtime divisor is ones (smooth_p packs smooth_rt == ones); orig keeps s
        sd[f"{prefix}.smooth_factor"] = smooth_p.contiguous()
        sd[f"{prefix}.smooth_factor_orig"] = _pack_vector(smooth)
    else:
        sd[f"{prefix}.smooth_factor"] = smooth_p.contiguous()
        sd[f"{prefix}.smooth_factor_orig"] = smooth_p.clone().contiguous()
    sd[f"{prefix}.proj_down"] = proj_down.contiguous()
    sd[f"{prefix}.proj_up"] = proj_up.contiguous()
    if bias is not None:
        sd[f"{prefix}.bias"] = bias_p.contiguous()
    for k, v in extra.items():
        sd[f"{prefix}.{k}"] = v

    w_eff = w_hat / smooth_rt.float()[None, :] + lora_up.float() @ lora_down.float()
    return {
        "smooth": smooth.clone(),
        "smooth_runtime": smooth_rt.clone(),
        "fused_smooth": fused,
        "lora_down": lora_down,
        "lora_up": lora_up,
        "q": q.to(torch.int8),
        "wscales": wscales_plain,
        "wcscales": wcscales_plain,
        "wtscale": wtscale,
        "bias_stored": None if bias is None else bias.clone(),
        "w_eff": w_eff,
    }


_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Same result as deepcompressor's fp_quantize (argmin over the 16-entry codebook, first index wins
    on ties, so anything rounding to zero gets code 0), but without the (N, 16) temporary."""
    mag = torch.bucketize(x.abs(), _E2M1_MIDPOINTS, right=False)
    return torch.where((x < 0) & (mag > 0), mag + 8, mag)


@contextlib.contextmanager
def _fp_quantize_hook():
    """Capture the e2m1 codes deepcompressor's converter packs (and compute them with the equivalent,
    much cheaper ``_e2m1_codes``; tests/test_fixtures.py checks it equals ``fp_quantize``)."""
    box: dict = {}
    orig = _dc_nunchaku.fp_quantize

    def hook(x, codebook=None):
        q = _e2m1_codes(x) if (codebook is None and FAST_FP_QUANTIZE) else orig(x, codebook)
        box["codes"] = q
        return q

    _dc_nunchaku.fp_quantize = hook
    try:
        yield box
    finally:
        _dc_nunchaku.fp_quantize = orig


def _pack_vector(v: torch.Tensor) -> torch.Tensor:
    """pack_scale(group=-1) of a plain (I,) vector, via deepcompressor's packer."""
    from deepcompressor.backend.nunchaku.utils import NunchakuWeightPacker

    packer = NunchakuWeightPacker(bits=4)
    with _quiet_dc():
        v = packer.pad_scale(v.to(BF16).view(-1, 1), group_size=-1)
    return packer.pack_scale(v, group_size=-1).contiguous()


# ----------------------------------------------------------------------------------- AWQ W4A16 layers


def _awq_mod_layer(g: torch.Generator, prefix: str, weight: torch.Tensor, bias: torch.Tensor, sd: dict) -> dict:
    """Qwen img_mod.1 / txt_mod.1 through deepcompressor's W4A16 converter with adanorm_splits=6."""
    splits = 6
    out_f, in_f = weight.shape
    gs = 64
    ng = in_f // gs
    d = out_f // splits
    scale = (weight.float().view(out_f, ng, gs).abs().amax(-1) / 7.0).clamp_min(1e-8).to(BF16)  # diffusers order
    # NOTE: deepcompressor adds the +1 to the bias IN PLACE through a view: always pass a clone.
    qweight, wscales, wzeros, bias_s = convert_to_nunchaku_w4x16_linear_weight(
        weight.clone(), scale.view(out_f, 1, ng, 1), bias=bias.clone(), adanorm_splits=splits
    )
    # deepcompressor pads the group axis to ceil_num_groups rows (zeros); nunchaku's module has I/64 rows.
    wscales = wscales[:ng].contiguous()
    wzeros = wzeros[:ng].contiguous()
    assert qweight.dtype == torch.int32 and qweight.shape == (out_f // 4, in_f // 2)
    assert wscales.shape == (ng, out_f) and wscales.dtype == BF16

    # codes exactly as deepcompressor computes them (interleaved order, zero = 7 pre-scaled)
    w_i = weight.view(splits, d, in_f).transpose(0, 1).reshape(out_f, in_f).float()
    s_i = scale.view(splits, d, ng).transpose(0, 1).reshape(out_f, ng).float()
    z_i = s_i * 7.0
    q = (w_i.view(out_f, ng, gs) + z_i[..., None]).div(s_i[..., None]).round().view(out_f, in_f)
    w_deq_i = q * wscales.float().t().repeat_interleave(gs, 1) + wzeros.float().t().repeat_interleave(gs, 1)
    w_deq = w_deq_i.view(d, splits, in_f).transpose(0, 1).reshape(out_f, in_f)
    delta = torch.zeros(splits)
    delta[1] = delta[-2] = 1.0
    b_deq = bias_s.float().view(d, splits) - delta
    b_deq = b_deq.t().reshape(out_f)

    sd[f"{prefix}.qweight"] = qweight.contiguous()
    sd[f"{prefix}.wscales"] = wscales
    sd[f"{prefix}.wzeros"] = wzeros
    sd[f"{prefix}.bias"] = bias_s.contiguous()
    return {
        "weight": weight,
        "bias": bias,
        "q": q.to(torch.uint8),
        "wscales": wscales,
        "wzeros": wzeros,
        "bias_stored": bias_s.clone(),
        "w_deq": w_deq,
        "b_deq": b_deq,
    }


# ------------------------------------------------------------------------------------------- Qwen-Image


def _new_truth(family: str, precision: str, rank: int) -> dict:
    return {
        "family": family,
        "precision": precision,
        "rank": rank,
        "metadata": {},
        "keys": [],
        "state_dict": {},
        "weights": {},
        "biases": {},
        "svdq": {},
        "awq": {},
        "dense": {},
        "lora_targets": {},
        "target_map": {},
    }


def _dense_linear(g, truth, sd, module, out_f, in_f, bias=True, canonical=None):
    w = _linear(g, out_f, in_f)
    sd[f"{module}.weight"] = w
    truth["dense"][f"{module}.weight"] = w
    truth["weights"][module] = w
    if bias:
        b = _bias(g, out_f)
        sd[f"{module}.bias"] = b
        truth["dense"][f"{module}.bias"] = b
        truth["biases"][module] = b
    name = canonical or module
    truth["lora_targets"][name] = (out_f, in_f)
    truth["target_map"][name] = (module, 0, out_f)


def _dense_param(truth, sd, key, value):
    sd[key] = value
    truth["dense"][key] = value


def _record_svdq(truth, module, weight, bias, info, w_deq, b_deq):
    info = dict(info)
    info["weight"] = weight
    info["bias"] = bias
    info["w_deq"] = w_deq
    info["b_deq"] = b_deq
    truth["svdq"][module] = info
    truth["weights"][module] = weight
    if bias is not None:
        truth["biases"][module] = bias


def _finish(path, sd, metadata, truth) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata=metadata)
    truth["metadata"] = dict(metadata)
    truth["keys"] = sorted(sd)
    truth["state_dict"] = sd
    truth["path"] = str(path)
    return truth


def qwen_config(blocks: int, dim: int, text_dim: int) -> dict:
    return {
        "_class_name": "QwenImageTransformer2DModel",
        "_diffusers_version": "0.35.0",
        "attention_head_dim": HEAD_DIM,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": False,
        "in_channels": 64,
        "joint_attention_dim": text_dim,
        "num_attention_heads": dim // HEAD_DIM,
        "num_layers": blocks,
        "out_channels": 16,
        "patch_size": 2,
    }


@_single_threaded
def build_qwen_checkpoint(
    path,
    *,
    blocks: int = 2,
    dim: int = 256,
    text_dim: int = 256,
    rank: int = 32,
    precision: str = "int4",
    seed: int = 0,
    fused_smooth=(),
) -> dict:
    """Write a small Nunchaku Qwen-Image checkpoint; return its truth dict (see module docstring).

    fused_smooth: layer names (e.g. "transformer_blocks.0.attn.to_out.0") whose smoothing is "fused
    upstream": smooth_factor = packed ones, smooth_factor_orig = packed s. For the attention output
    layers this is done consistently: naming either attn.to_out.0 or attn.to_add_out of a block fuses
    BOTH with one shared s (joint attention mixes the two V streams), and 1/s is folded into the V rows
    (weight, bias) of that block's to_qkv and add_qkv_proj. Any other layer named is only marked (its
    runtime input is taken to be x/s; nothing upstream is compensated).
    """
    _check_precision(precision)
    _check_rank(rank)
    if dim % HEAD_DIM:
        raise ValueError(f"dim must be a multiple of {HEAD_DIM} (heads are {HEAD_DIM} wide), got {dim}")
    fused_smooth = set(fused_smooth)
    g = _gen(seed)
    sd: dict[str, torch.Tensor] = {}
    truth = _new_truth("qwen", precision, rank)
    truth.update(dim=dim, text_dim=text_dim, blocks=blocks)
    D = dim

    _dense_linear(g, truth, sd, "img_in", D, 64)
    _dense_param(truth, sd, "txt_norm.weight", _norm_weight(g, text_dim))
    _dense_linear(g, truth, sd, "txt_in", D, text_dim)
    _dense_linear(g, truth, sd, "time_text_embed.timestep_embedder.linear_1", D, QWEN_TIMESTEP_DIM)
    _dense_linear(g, truth, sd, "time_text_embed.timestep_embedder.linear_2", D, D)

    for i in range(blocks):
        p = f"transformer_blocks.{i}"
        known = {f"{p}.attn.to_out.0", f"{p}.attn.to_add_out"}
        fuse_out = bool(known & fused_smooth)
        s_out = _smooth(g, D)

        # AWQ modulation layers (diffusers order in, interleaved + folded +1 out)
        for mod in ("img_mod.1", "txt_mod.1"):
            w = _linear(g, 6 * D, D)
            b = _bias(g, 6 * D)
            info = _awq_mod_layer(g, f"{p}.{mod}", w, b, sd)
            truth["awq"][f"{p}.{mod}"] = info
            truth["weights"][f"{p}.{mod}"] = w
            truth["biases"][f"{p}.{mod}"] = b
            truth["lora_targets"][f"{p}.{mod}"] = (6 * D, D)
            truth["target_map"][f"{p}.{mod}"] = (f"{p}.{mod}", 0, 6 * D)

        # fused q/k/v projections
        for fused_name, parts in (
            ("attn.to_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
            ("attn.add_qkv_proj", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        ):
            module = f"{p}.{fused_name}"
            w = _linear(g, 3 * D, D)
            b = _bias(g, 3 * D)
            s = _smooth(g, D)
            row_scale = torch.ones(3 * D)
            if fuse_out:
                row_scale[2 * D :] = 1.0 / s_out.float()
            target = w.float() * row_scale[:, None]
            if module in fused_smooth:  # only marked: its runtime input is x/s
                target = target * s.float()[None, :]
            b_st = (b.float() * row_scale).to(BF16)
            info = _svdq_layer(
                g, module, target, b_st, s, fused=module in fused_smooth, rank=rank, precision=precision, sd=sd
            )
            w_deq = info["w_eff"] / row_scale[:, None]
            if module in fused_smooth:
                w_deq = w_deq / s.float()[None, :]
            b_deq = b_st.float() / row_scale
            _record_svdq(truth, module, w, b, info, w_deq, b_deq)
            for j, part in enumerate(parts):
                truth["lora_targets"][f"{p}.{part}"] = (D, D)
                truth["target_map"][f"{p}.{part}"] = (module, j * D, (j + 1) * D)

        for name, out_f, in_f in (
            ("attn.to_out.0", D, D),
            ("attn.to_add_out", D, D),
            ("img_mlp.net.0.proj", 4 * D, D),
            ("txt_mlp.net.0.proj", 4 * D, D),
            ("img_mlp.net.2", D, 4 * D),
            ("txt_mlp.net.2", D, 4 * D),
        ):
            module = f"{p}.{name}"
            w = _linear(g, out_f, in_f)
            b = _bias(g, out_f)
            is_out = module in known
            fused = (is_out and fuse_out) or module in fused_smooth
            s = s_out if (is_out and fuse_out) else _smooth(g, in_f)
            target = w.float() * s.float()[None, :] if fused else w.float()
            info = _svdq_layer(g, module, target, b, s, fused=fused, rank=rank, precision=precision, sd=sd)
            w_deq = info["w_eff"] / s.float()[None, :] if fused else info["w_eff"]
            _record_svdq(truth, module, w, b, info, w_deq, b.float())
            truth["lora_targets"][module] = (out_f, in_f)
            truth["target_map"][module] = (module, 0, out_f)

        for nm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            _dense_param(truth, sd, f"{p}.attn.{nm}.weight", _norm_weight(g, HEAD_DIM))

    _dense_linear(g, truth, sd, "norm_out.linear", 2 * D, D)
    _dense_linear(g, truth, sd, "proj_out", 64, D)

    metadata = {
        "config": json.dumps(qwen_config(blocks, dim, text_dim)),
        "comfy_config": json.dumps(
            {"model_class": "QwenImage", "model_config": {"image_model": "qwen_image", "scale_shift": 0}}
        ),
        "model_class": "NunchakuQwenImageTransformer2DModel",
        "quantization_config": json.dumps(quantization_config(precision, rank)),
    }
    unknown = fused_smooth - set(truth["svdq"])
    if unknown:
        raise ValueError(f"fused_smooth names no SVDQ layer of this checkpoint: {sorted(unknown)}")
    truth["fused_smooth"] = sorted(m for m, v in truth["svdq"].items() if v["fused_smooth"])
    return _finish(path, sd, metadata, truth)


# ------------------------------------------------------------------------------------- Z-Image-Turbo


def zimage_ffn_dim(dim: int) -> int:
    return int(dim / 3 * 8)


def zimage_config(layers: int, dim: int, cap_feat_dim: int) -> dict:
    heads = dim // HEAD_DIM
    return {
        "_class_name": "ZImageTransformer2DModel",
        "_diffusers_version": "0.36.0",
        "all_f_patch_size": [1],
        "all_patch_size": [2],
        "axes_dims": [32, 48, 48],
        "axes_lens": [1024, 512, 512],
        "cap_feat_dim": cap_feat_dim,
        "dim": dim,
        "in_channels": 16,
        "n_heads": heads,
        "n_kv_heads": heads,
        "n_layers": layers,
        "n_refiner_layers": 2,
        "norm_eps": 1e-05,
        "qk_norm": True,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
    }


@_single_threaded
def build_zimage_checkpoint(
    path,
    *,
    layers: int = 2,
    dim: int = 384,
    rank: int = 32,
    precision: str = "int4",
    skip_refiners: bool = False,
    seed: int = 0,
    fused_smooth=(),
) -> dict:
    """Write a small Nunchaku Z-Image-Turbo checkpoint; return its truth dict (see module docstring).

    FFN hidden = int(dim/3*8); feed_forward.net.0.proj rows are [w3; w1]. No linear has a bias except the
    bf16 embedders / final layer / adaLN. cap_feat_dim = 256. fused_smooth: `<block>.attention.to_out.0`
    names whose smoothing is fused into the V rows of that block's to_qkv (deepcompressor's
    fuse_when_possible): smooth_factor all ones, smooth_factor_orig = s, V rows divided by s.
    """
    fused_smooth = set(fused_smooth)
    _check_precision(precision)
    _check_rank(rank)
    if dim % HEAD_DIM:
        raise ValueError("dim must be a multiple of 128")
    cap_feat_dim = 256
    ffn = zimage_ffn_dim(dim)
    if ffn % 128:
        raise ValueError(f"FFN hidden {ffn} must be a multiple of 128 (pick another dim)")
    g = _gen(seed)
    sd: dict[str, torch.Tensor] = {}
    truth = _new_truth("zimage", precision, rank)
    truth.update(dim=dim, layers=layers, ffn_dim=ffn, skip_refiners=skip_refiners, cap_feat_dim=cap_feat_dim)
    D = dim

    def ff_targets(p, module_13, module_2):
        truth["lora_targets"][f"{p}.feed_forward.w3"] = (ffn, D)
        truth["lora_targets"][f"{p}.feed_forward.w1"] = (ffn, D)
        truth["lora_targets"][f"{p}.feed_forward.w2"] = (D, ffn)
        truth["target_map"][f"{p}.feed_forward.w3"] = (module_13, 0, ffn)
        truth["target_map"][f"{p}.feed_forward.w1"] = (module_13, ffn, 2 * ffn)
        truth["target_map"][f"{p}.feed_forward.w2"] = (module_2, 0, D)

    block_names = [f"layers.{i}" for i in range(layers)]
    block_names += [f"noise_refiner.{i}" for i in range(2)] + [f"context_refiner.{i}" for i in range(2)]
    for p in block_names:
        quantized = not (skip_refiners and not p.startswith("layers."))
        if quantized:
            fuse_out = f"{p}.attention.to_out.0" in fused_smooth
            s_out = _smooth(g, D) if fuse_out else None
            for name, parts, out_f, in_f in (
                ("attention.to_qkv", ("attention.to_q", "attention.to_k", "attention.to_v"), 3 * D, D),
                ("attention.to_out.0", None, D, D),
                ("feed_forward.net.0.proj", None, 2 * ffn, D),
                ("feed_forward.net.2", None, D, ffn),
            ):
                module = f"{p}.{name}"
                w = _linear(g, out_f, in_f)
                s = _smooth(g, in_f)
                fused = fuse_out and name == "attention.to_out.0"
                row_scale = torch.ones(out_f)
                if fuse_out and name == "attention.to_qkv":
                    row_scale[2 * D:] = 1.0 / s_out.float()
                s = s_out if fused else s
                target = w.float() * row_scale[:, None] * (s.float()[None, :] if fused else 1.0)
                info = _svdq_layer(g, module, target, None, s, fused=fused, rank=rank, precision=precision, sd=sd)
                w_deq = info["w_eff"] / row_scale[:, None] / (s.float()[None, :] if fused else 1.0)
                _record_svdq(truth, module, w, None, info, w_deq, None)
                if parts:
                    for j, part in enumerate(parts):
                        truth["lora_targets"][f"{p}.{part}"] = (D, D)
                        truth["target_map"][f"{p}.{part}"] = (module, j * D, (j + 1) * D)
                elif name == "attention.to_out.0":
                    truth["lora_targets"][module] = (D, D)
                    truth["target_map"][module] = (module, 0, D)
            ff_targets(p, f"{p}.feed_forward.net.0.proj", f"{p}.feed_forward.net.2")
        else:
            for nm in ("to_q", "to_k", "to_v", "to_out.0"):
                _dense_linear(g, truth, sd, f"{p}.attention.{nm}", D, D, bias=False)
            _dense_linear(g, truth, sd, f"{p}.feed_forward.net.0.proj", 2 * ffn, D, bias=False)
            _dense_linear(g, truth, sd, f"{p}.feed_forward.net.2", D, ffn, bias=False)
            for nm in ("net.0.proj", "net.2"):
                del truth["lora_targets"][f"{p}.feed_forward.{nm}"]
                del truth["target_map"][f"{p}.feed_forward.{nm}"]
            ff_targets(p, f"{p}.feed_forward.net.0.proj", f"{p}.feed_forward.net.2")
        _dense_param(truth, sd, f"{p}.attention.norm_q.weight", _norm_weight(g, HEAD_DIM))
        _dense_param(truth, sd, f"{p}.attention.norm_k.weight", _norm_weight(g, HEAD_DIM))
        for nm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            _dense_param(truth, sd, f"{p}.{nm}.weight", _norm_weight(g, D))
        if not p.startswith("context_refiner."):
            _dense_linear(g, truth, sd, f"{p}.adaLN_modulation.0", 4 * D, ADALN_EMBED_DIM)

    _dense_linear(g, truth, sd, "all_x_embedder.2-1", D, 64)
    _dense_linear(g, truth, sd, "all_final_layer.2-1.linear", 64, D)
    _dense_linear(g, truth, sd, "all_final_layer.2-1.adaLN_modulation.1", D, ADALN_EMBED_DIM)
    _dense_linear(g, truth, sd, "t_embedder.mlp.0", 1024, 256)
    _dense_linear(g, truth, sd, "t_embedder.mlp.2", ADALN_EMBED_DIM, 1024)
    _dense_param(truth, sd, "cap_embedder.0.weight", _norm_weight(g, cap_feat_dim))
    _dense_linear(g, truth, sd, "cap_embedder.1", D, cap_feat_dim)
    _dense_param(truth, sd, "x_pad_token", _randn(g, 1, D, std=0.02).to(BF16))
    _dense_param(truth, sd, "cap_pad_token", _randn(g, 1, D, std=0.02).to(BF16))

    metadata = {
        "config": json.dumps(zimage_config(layers, dim, cap_feat_dim)),
        "comfy_config": json.dumps({"model_class": "Lumina2", "model_config": {"image_model": "lumina2"}}),
        "model_class": "NunchakuZImageTransformer2DModel",
        "quantization_config": json.dumps(quantization_config(precision, rank, skip_refiners=bool(skip_refiners))),
    }
    truth["fused_smooth"] = sorted(m for m, v in truth["svdq"].items() if v["fused_smooth"])
    if set(truth["fused_smooth"]) != fused_smooth:
        raise ValueError(f"fused_smooth names no quantized attention output: {sorted(fused_smooth)}")
    return _finish(path, sd, metadata, truth)

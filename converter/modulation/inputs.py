"""The inputs of Qwen-Image's modulation layers, x(σ) = SiLU(temb(σ)), computed exactly from the checkpoint's
own timestep embedder, and the sigmas they are calibrated and evaluated at."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_CALIB_POINTS = 1025
DEFAULT_EVAL_POINTS = 256


def timestep_sinusoid(
    sigmas: torch.Tensor,
    dim: int = 256,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1000.0,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal projection of Qwen-Image's `time_text_embed.time_proj`, fp32 (n, dim).

    Same arithmetic as diffusers' `embeddings.get_timestep_embedding` called by
    `Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)`:
    freqs = exp(-ln(max_period) * arange(half) / (half - shift)) in fp32, args = scale * (sigma.float() * freqs),
    [sin | cos] then swapped to [cos | sin], zero-padded if dim is odd. `sigmas` is the value the transformer
    receives (the pipeline passes t / 1000, so sigma in [0, 1]); the product is taken in fp32 whatever its dtype.
    """
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=sigmas.device)
    exponent = exponent / (half - downscale_freq_shift)
    freqs = torch.exp(exponent)
    args = sigmas[:, None].float() * freqs[None, :]
    args = scale * args
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def modulation_inputs(
    lin1_w: torch.Tensor,
    lin1_b: torch.Tensor | None,
    lin2_w: torch.Tensor,
    lin2_b: torch.Tensor | None,
    sigmas: torch.Tensor,
    addition_t_embedding: torch.Tensor | None = None,
    *,
    sigma_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """x(sigma) = SiLU(temb(sigma)), the input of every `img_mod.1` / `txt_mod.1`: fp32 (n, D), or (2n, D).

    temb = linear_2(SiLU(linear_1(sinusoid(sigma)))) with `time_text_embed.timestep_embedder.linear_{1,2}`.
    As diffusers' `QwenTimestepProjEmbeddings.forward` does, the sinusoid is cast to the model dtype (taken from
    `lin1_w`, bf16 in the checkpoints) before linear_1; everything after that cast is computed in fp32.
    `addition_t_embedding` (2, D) (`use_additional_t_cond`): returns the rows for temb + row 0, then temb + row 1.
    `sigma_dtype`: cast sigma first (the transformer does `timestep.to(hidden_states.dtype)`, so at run time
    sigma is bf16-valued); default keeps the continuous sigma, whose curve contains those points.
    Edit models with `zero_cond_t` also run sigma = 0 (reference tokens); `calibration_sigmas` includes it.
    """
    dev = torch.device(device) if device is not None else lin1_w.device
    s = sigmas.to(dev)
    if sigma_dtype is not None:
        s = s.to(sigma_dtype)
    proj = timestep_sinusoid(s, lin1_w.shape[1]).to(lin1_w.dtype).float()
    w1, w2 = lin1_w.to(dev).float(), lin2_w.to(dev).float()
    h = proj @ w1.T
    if lin1_b is not None:
        h = h + lin1_b.to(dev).float()
    temb = F.silu(h) @ w2.T
    if lin2_b is not None:
        temb = temb + lin2_b.to(dev).float()
    if addition_t_embedding is not None:
        add = addition_t_embedding.to(dev).float()
        if add.ndim != 2 or add.shape[1] != temb.shape[1]:
            raise ValueError(f"addition_t_embedding must be (k, {temb.shape[1]}), got {tuple(add.shape)}")
        temb = torch.cat([temb + row for row in add], dim=0)
    return F.silu(temb)


def calibration_sigmas(n: int = DEFAULT_CALIB_POINTS, device: str | torch.device | None = None) -> torch.Tensor:
    """n sigmas evenly spaced over [0, 1], both ends included (fp32).

    The sinusoid's fastest component turns ~160 times over [0, 1], so the curve needs several hundred samples
    for the calibration Gram to generalize; 1025 (the default) is safely above that.
    """
    if n < 2:
        raise ValueError("calibration_sigmas needs n >= 2")
    return torch.linspace(0.0, 1.0, n, dtype=torch.float64, device=device).float()


def evaluation_sigmas(
    n: int = DEFAULT_EVAL_POINTS,
    calibration: torch.Tensor | int = DEFAULT_CALIB_POINTS,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """n held-out sigmas covering [0, 1], kept away from the calibration sigmas (fp32).

    Nominal points (i + 0.5) / n, each moved into the middle half of the calibration interval that holds it,
    so no evaluation point lies within a quarter calibration step of a calibration point. `calibration`: the
    calibration sigmas (sorted) or their count for `calibration_sigmas(count)`.
    """
    if n < 200:
        raise ValueError("evaluation_sigmas needs n >= 200")
    cal = calibration_sigmas(calibration) if isinstance(calibration, int) else calibration
    cal = torch.unique(cal.detach().to("cpu", torch.float64))  # sorted
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if cal.numel() >= 2:
        j = (torch.searchsorted(cal, p, right=True) - 1).clamp(0, cal.numel() - 2)
        lo, hi = cal[j], cal[j + 1]
        quarter = (hi - lo) / 4
        inside = (p >= lo) & (p <= hi)
        p = torch.where(inside, torch.minimum(torch.maximum(p, lo + quarter), hi - quarter), p)
    return p.float().to(device)

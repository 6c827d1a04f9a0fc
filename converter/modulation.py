"""Timestep-calibrated requantization of Qwen-Image's AWQ W4A16 modulation layers.

`img_mod.1` / `txt_mod.1` (3072 -> 18432, 4-bit codes, groups of 64, bf16 scales / zeros / bias) have no
low-rank branch, so a LoRA can only enter them by requantization. A LoRA delta is 1-3 % of the weight, about
a twentieth of a quantization step per element, so plain requantization either changes nothing or adds more
noise than the delta. What makes it workable is that these layers only ever see x(sigma) = SiLU(temb(sigma)),
a function of the timestep alone, which the checkpoint lets us compute exactly (`modulation_inputs`). We only
need the layer to be right on that curve.

Figure of merit (`e_mod`), per layer, on held-out sigmas:
    ||Y_new - Y_ideal|| / ||Y_ideal - Y_base||,   Y = W x + b,   W_ideal = dequant(base) + dW, b_ideal = b + db
(skipping the LoRA scores exactly 1.0).

Method ("calibrated"): error-compensating sequential rounding (GPTQ / Babai nearest plane) in the metric of
the calibration inputs, arranged for this problem:
  * variables: the bias (bf16), the 4-bit codes, and one zero-point shift per group (a bf16 value whose
    feature is the group sum of x). The objective is the uncentered output error over calibration sigmas, so
    the constant part of the delta may go to the bias, and the bias' bf16 rounding (coarse: one ulp of a
    modulation bias near 1 is larger than the LoRA's whole effect) is compensated by the codes;
  * only the `tail` code columns with the smallest input variance are re-rounded; every other code keeps its
    base value, and the continuous optimum of the free variables given those fixed errors (-dW on the kept
    columns) is the starting target;
  * the error of sequential rounding is each variable's rounding error weighted by its variance conditional
    on the variables rounded after it, so the order is chosen per layer from the end: a minimum-pivot
    Cholesky of the damped Gram, scaled by each variable's grid step (`ModulationCalibration.rounding_plan`).
    This ordering alone halves the error when x(sigma) has a strong constant part;
  * the bias is rounded first and finally re-fitted (nearest bf16 to its calibration optimum);
  * per row, the new codes are kept only where they beat the bias fold on the calibration objective (exact,
    from the Gram of the free variables: no extra pass over the layer).
Everything that depends only on the calibration inputs (which columns are free, their Gram, the compensation
operator) lives in a `ModulationCalibration`, built once and shared by all 120 layers.

Per layer the result that is written is the best of {calibrated, bias fold, skip} on the held-out sigmas, so
no layer is ever written worse than the base (`ModulationResult.action` says which).

All arrays are in UNPACKED space: codes (O, I) uint8 0..15; scales / zeros (O, I/64) with
W[n, k] = codes[n, k] * scales[n, k // 64] + zeros[n, k // 64]; bias (O,). Row order is whatever the caller
uses (Nunchaku's interleaved order); nothing here depends on it.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Union

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

GROUP = 64
DEFAULT_CALIB_POINTS = 1025
DEFAULT_EVAL_POINTS = 256
DEFAULT_TAIL = 512
DEFAULT_DAMP = 3e-3

Mode = Literal["calibrated", "plain", "biasfold", "skip"]
LowRank = tuple[torch.Tensor, torch.Tensor]
DeltaW = Union[torch.Tensor, LowRank]


# --------------------------------------------------------------------------------------------------
# Inputs of the modulation layers


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


# --------------------------------------------------------------------------------------------------
# The figure of merit


def e_mod(err: torch.Tensor, signal: torch.Tensor) -> float:
    """The per-layer error figure ||err|| / ||signal|| (Frobenius over outputs and sigmas).

    err = Y_new - Y_ideal and signal = Y_ideal - Y_base, both evaluated on the same held-out inputs (any layout,
    e.g. (O, n)). Skipping the LoRA gives err = -signal, i.e. exactly 1.0.
    """
    num, den = _sumsq(err), _sumsq(signal)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def _sumsq(t: torch.Tensor) -> float:
    v = t.reshape(-1)
    if v.dtype not in (torch.float32, torch.float64):
        v = v.float()
    return float(torch.dot(v, v))  # BLAS dot: blocked accumulation, ~1e-6 relative in fp32


# --------------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def _cpu_threads(n: int, device: torch.device) -> Iterator[None]:
    """Run torch CPU ops on at most n threads inside the block (restored afterwards).

    Short vector ops lose more to a parallel region than they gain, and far more when the cores are shared.
    """
    old = torch.get_num_threads()
    if device.type != "cpu" or old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    default = torch.cuda.current_device() if a.type == "cuda" else 0
    return (default if a.index is None else a.index) == (default if b.index is None else b.index)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def _ulp_bf16(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the bf16 grid at |t| (fp32)."""
    a = t.abs().to(torch.bfloat16)
    return torch.nextafter(a, torch.full_like(a, math.inf)).float() - a.float()


def _check_bf16_exact(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    if not torch.equal(_bf16(t), t):
        raise ValueError(f"{name} must hold bf16-representable values (they come from a bf16 checkpoint)")
    return t


class _Delta:
    """dW as a dense (O, I) matrix or as LoRA factors (up (O, r), down (r, I)); never densified unless needed."""

    def __init__(self, delta_w: DeltaW, shape: tuple[int, int], device: torch.device):
        o, i = shape
        if isinstance(delta_w, (tuple, list)):
            up, down = delta_w
            if up.ndim != 2 or down.ndim != 2 or up.shape[0] != o or down.shape[1] != i or up.shape[1] != down.shape[0]:
                raise ValueError(
                    f"low-rank delta must be (up ({o}, r), down (r, {i})), got {tuple(up.shape)}, {tuple(down.shape)}"
                )
            self.up: torch.Tensor | None = up.to(device=device, dtype=torch.float32)
            self.down: torch.Tensor | None = down.to(device=device, dtype=torch.float32)
            self.dense: torch.Tensor | None = None
        else:
            if tuple(delta_w.shape) != (o, i):
                raise ValueError(f"delta_w must be {(o, i)}, got {tuple(delta_w.shape)}")
            self.dense = delta_w.to(device=device, dtype=torch.float32)
            self.up = self.down = None

    def times_xt(self, x: torch.Tensor) -> torch.Tensor:  # dW @ x.T : (O, n)
        if self.dense is not None:
            return self.dense @ x.T
        return self.up @ (self.down @ x.T)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:  # dW @ v : (O,)
        if self.dense is not None:
            return self.dense @ v
        return self.up @ (self.down @ v)

    def cols_t(self, idx: torch.Tensor) -> torch.Tensor:  # dW[:, idx].T : (len, O), contiguous
        if self.dense is not None:
            return self.dense[:, idx].T.contiguous()
        return self.down[:, idx].T @ self.up.T

    def rows(self, r0: int, r1: int) -> torch.Tensor:  # dW[r0:r1] : dense
        if self.dense is not None:
            return self.dense[r0:r1]
        return self.up[r0:r1] @ self.down

    def left_mul_t(self, p: torch.Tensor) -> torch.Tensor:  # p @ dW.T : (k, O)
        if self.dense is not None:
            return p @ self.dense.T
        return (p @ self.down.T) @ self.up.T


def _dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    o, i = codes.shape
    ng = i // group
    return (codes.float().view(o, ng, group) * scales[..., None] + zeros[..., None]).view(o, i)


# --------------------------------------------------------------------------------------------------
# Calibration (shared by all layers)


@dataclass(eq=False)
class ModulationCalibration:
    """Everything that depends only on the calibration inputs; build once, reuse for every layer.

    Free variables (canonical order): [bias, codes of the `tail` columns, one zero shift per group]. `comp`
    (N', I) maps the error left on the kept columns to the continuous optimum of the free ones (zero on the tail
    columns). `gram` / `lam`: their (uncentered, weighted) Gram and ridge. The rounding order and the GPTQ
    update rows depend on the layer's step sizes and come from `rounding_plan`.
    """

    in_features: int
    group_size: int
    tail: torch.Tensor  # (m,) code columns that may change
    mean: torch.Tensor  # (I,) weighted mean of x over calibration sigmas
    comp: torch.Tensor  # (N', I)
    gram: torch.Tensor  # (N', N') undamped Gram of the free variables
    lam: torch.Tensor  # (N',) the ridge added to it
    select: torch.Tensor  # (N', I): Z = gram[:, 0] (x) (b_fold - b*) - select @ dW.T (see merge_modulation)
    gram_damped: torch.Tensor  # (N', N') float64, gram + diag(lam)
    damp: float
    n_points: int
    device: torch.device
    build_seconds: float = 0.0

    def rounding_plan(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rounding order and GPTQ update rows for free variables whose grid steps are `steps` (N',).

        Sequential rounding leaves each variable's rounding error weighted by its variance conditional on the
        variables rounded after it, so the order is built from the end: repeatedly take the variable with the
        smallest step-scaled conditional variance given those already taken (a minimum-pivot Cholesky of the
        damped Gram). The bias is always rounded first (it is re-fitted at the end). Returns (perm (N',): the
        canonical indices in rounding order, U (N', N') fp32: upper Cholesky factor of the inverse damped Gram
        in that order).
        """
        h = self.gram_damped
        dev = h.device
        d = steps.to(dev, torch.float64).clamp_min(1e-30)
        a = h[1:, 1:] * d[1:, None] * d[None, 1:]
        alive = torch.arange(a.shape[0], device=dev)  # original index of each row of `a`
        big = torch.finfo(torch.float64).max
        picks: list[int] = []
        with _cpu_threads(1, dev):
            while alive.numel():
                for _ in range(min(64, alive.numel())):  # then drop the rows taken, to shrink the updates
                    j = int(torch.argmin(a.diagonal()))
                    picks.append(int(alive[j]))
                    col = a[:, j] / a[j, j].clamp_min(1e-300).sqrt()
                    a.addr_(col, col, alpha=-1.0)
                    a[j, j] = big  # row and column j are now zero: it stays out of the argmin
                keep = a.diagonal() < big
                a = a[keep][:, keep]
                alive = alive[keep]
        order = torch.tensor(picks[::-1], dtype=torch.long, device=dev)
        perm = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), 1 + order])
        hp = h[perm][:, perm]
        # U with inv(hp) = U^T U, U upper: with J the reversal, J hp J = L L^T gives U = J inv(L) J
        lr = torch.linalg.cholesky(hp.flip(0, 1))
        eye = torch.eye(lr.shape[0], dtype=lr.dtype, device=dev)
        u = torch.linalg.solve_triangular(lr, eye, upper=False).flip(0, 1)
        return perm, u.float()

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    @classmethod
    def build(
        cls,
        x_calib: torch.Tensor,
        *,
        group_size: int = GROUP,
        tail: int | None = DEFAULT_TAIL,
        damp: float = DEFAULT_DAMP,
        weights: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
    ) -> "ModulationCalibration":
        """x_calib (n, I): modulation inputs at the calibration sigmas. `tail`: how many code columns may change
        (None = all). `damp`: ridge, relative to each variable's centered variance. `weights` (n,): per-sigma
        weights (e.g. extra weight on sigma = 0 for `zero_cond_t` edit models)."""
        t0 = time.perf_counter()
        dev = torch.device(device)
        x = x_calib.to(device=dev, dtype=torch.float64)
        if x.ndim != 2:
            raise ValueError("x_calib must be (n, I)")
        n, in_f = x.shape
        if in_f % group_size:
            raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
        ng = in_f // group_size
        w = torch.ones(n, dtype=torch.float64, device=dev) if weights is None else weights.to(dev, torch.float64)
        if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be (n,), non-negative, not all zero")
        wsum = w.sum()
        mean = (w[:, None] * x).sum(0) / wsum
        var = (w[:, None] * (x - mean) ** 2).sum(0)  # centered second moments (sums)
        xg = x.view(n, ng, group_size).sum(-1)  # zero-shift features
        varg = (w[:, None] * (xg - (w[:, None] * xg).sum(0) / wsum) ** 2).sum(0)

        order = torch.argsort(var, descending=True, stable=True)
        m = in_f if tail is None else max(0, min(int(tail), in_f))
        tail_idx = order[in_f - m :]
        head_idx = order[: in_f - m]

        feats = torch.cat([torch.ones(n, 1, dtype=torch.float64, device=dev), x[:, tail_idx], xg], dim=1)
        wf = feats * w[:, None]
        gram = wf.T @ feats  # (N', N')
        floor = 1e-9 * float(var.mean()) + 1e-30
        lam = torch.cat(
            [torch.full((1,), 1e-9 * float(wsum), dtype=torch.float64, device=dev), var[tail_idx], varg]
        ).clamp_min(floor)
        gram_damped = gram.clone()
        gram_damped.diagonal().add_(damp * lam)
        chol = torch.linalg.cholesky(gram_damped)
        comp = torch.zeros(gram.shape[0], in_f, dtype=torch.float64, device=dev)
        if head_idx.numel():
            comp[:, head_idx] = torch.cholesky_solve(wf.T @ x[:, head_idx], chol)
        select = gram_damped @ comp
        select[:, tail_idx] += gram[:, 1 : 1 + m]
        return cls(
            in_features=in_f,
            group_size=group_size,
            tail=tail_idx,
            mean=mean.float(),
            comp=comp.float(),
            gram=gram.float(),
            lam=(damp * lam).float(),
            select=select.float(),
            gram_damped=gram_damped,
            damp=damp,
            n_points=n,
            device=dev,
            build_seconds=time.perf_counter() - t0,
        )


# --------------------------------------------------------------------------------------------------
# Result


@dataclass
class ModulationResult:
    """What to write for one layer, and how good each option is on held-out sigmas (`e_mod` figures)."""

    codes: torch.Tensor  # (O, I) uint8 0..15
    scales: torch.Tensor  # (O, I/64) fp32, bf16-exact
    zeros: torch.Tensor  # (O, I/64) fp32, bf16-exact (scaled, negated zero: W = q*s + z)
    bias: torch.Tensor  # (O,) fp32, bf16-exact
    action: str  # "calibrated" | "plain" | "biasfold" | "skip": what the tensors above are
    mode: str  # the method asked for
    e_mod: float  # figure of the asked method (ours for mode="calibrated")
    e_written: float  # figure of what is written (min over the safe options)
    e_biasfold: float  # bias fold as written: calibration mean folded into the bias, rounded to bf16
    e_biasfold_ideal: float  # ||dY - mean(dY)|| / ||dY||, mean over the held-out sigmas, no rounding
    e_skip: float = 1.0
    e_plain: float | None = None  # fresh min/max-grid RTN of dequant(base) + dW (if computed)
    codes_changed: float = 0.0  # fraction of codes that differ from the base
    zeros_changed: float = 0.0  # fraction of group zeros that differ from the base
    bias_changed: float = 0.0  # fraction of bias entries that differ from the base
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        plain = "n/a" if self.e_plain is None else f"{self.e_plain:.3f}"
        return (
            f"{self.action} (asked {self.mode}): e_written {self.e_written:.3f} | ours {self.e_mod:.3f} "
            f"biasfold {self.e_biasfold:.3f} (ideal {self.e_biasfold_ideal:.3f}) plain {plain} skip 1.000 | "
            f"codes changed {100 * self.codes_changed:.1f}% | {self.seconds:.2f}s"
        )


# --------------------------------------------------------------------------------------------------
# The rounding engine


def _sequential_round(
    targets: torch.Tensor,
    perm: torch.Tensor,
    u: torch.Tensor,
    s_t: torch.Tensor,
    z_t: torch.Tensor,
    z_g: torch.Tensor,
    block: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-style rounding of the free variables, vectorized over rows (layout: variables x rows).

    targets (N', O): continuous targets in value space, canonical order [bias; tail weights; zero shifts].
    perm (N',): rounding order (canonical indices); u: the matching update rows. s_t, z_t (m, O): scale and zero
    of each tail weight. z_g (ng, O): base zeros. Returns (bias (O,), codes (m, O) float, new zeros (ng, O)).
    Each variable is rounded to its own grid (bias: bf16; weight: code 0..15 on its group's grid; zero: bf16)
    and its rounding error is pushed onto the variables not yet rounded.
    """
    work = targets.index_select(0, perm)
    nvar, o = work.shape
    m = s_t.shape[0]
    s_safe = torch.where(s_t > 0, s_t, torch.ones_like(s_t))
    codes = torch.empty(m, o, dtype=work.dtype, device=work.device)
    new_zeros = torch.empty_like(z_g)
    bias = torch.empty(o, dtype=work.dtype, device=work.device)
    udiag = u.diagonal().tolist()
    order = perm.tolist()
    for i1 in range(0, nvar, block):
        i2 = min(i1 + block, nvar)
        errs = torch.empty(i2 - i1, o, dtype=work.dtype, device=work.device)
        # column steps are short vector ops: one thread; the block update below is a GEMM: all threads
        with _cpu_threads(1, work.device):
            for i in range(i1, i2):
                t = work[i]
                c = order[i]
                if c == 0:
                    v = _bf16(t)
                    bias.copy_(v)
                elif c <= m:
                    j = c - 1
                    q = torch.sub(t, z_t[j]).div_(s_safe[j]).round_().clamp_(0, 15)
                    codes[j] = q
                    v = q.mul_(s_t[j]).add_(z_t[j])
                else:
                    g = c - m - 1
                    zn = _bf16(t + z_g[g])
                    new_zeros[g] = zn
                    v = zn - z_g[g]
                e = errs[i - i1]
                torch.sub(t, v, out=e).div_(udiag[i])
                if i + 1 < i2:
                    work[i + 1 : i2].addr_(u[i, i + 1 : i2], e, alpha=-1.0)
        if i2 < nvar:
            work[i2:].addmm_(u[i1:i2, i2:].T, errs, alpha=-1.0)
    return bias, codes, new_zeros


def _plain_requant(
    codes: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    delta: _Delta,
    x_eval: torch.Tensor,
    group: int,
    keep: bool,
    chunk: int = 2048,
):
    """Fresh min/max grid RTN of dequant(base) + dW. Returns ((W_plain - W_ideal) @ x_eval.T, tensors or None)."""
    o, i = codes.shape
    ng = i // group
    err = torch.empty(o, x_eval.shape[0], dtype=torch.float32, device=codes.device)
    out = None
    if keep:
        out = (torch.empty_like(codes), torch.empty_like(s), torch.empty_like(z))
    for r0 in range(0, o, chunk):
        r1 = min(r0 + chunk, o)
        w = _dequant(codes[r0:r1], s[r0:r1], z[r0:r1], group) + delta.rows(r0, r1)
        wg = w.view(r1 - r0, ng, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        sp = _bf16(((hi - lo) / 15.0).clamp_min(1e-8))
        zp = _bf16(lo)
        q = ((wg - zp[..., None]) / sp[..., None]).round_().clamp_(0, 15)
        wp = q * sp[..., None] + zp[..., None]
        err[r0:r1] = (wp - wg).view(r1 - r0, i) @ x_eval.T
        if out is not None:
            out[0][r0:r1] = q.view(r1 - r0, i).to(torch.uint8)
            out[1][r0:r1] = sp
            out[2][r0:r1] = zp
    return err, out


# --------------------------------------------------------------------------------------------------
# Entry point


def merge_modulation(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor,
    delta_w: DeltaW,
    delta_b: torch.Tensor | None,
    x_calib: torch.Tensor | ModulationCalibration,
    x_eval: torch.Tensor,
    *,
    mode: Mode = "calibrated",
    group_size: int = GROUP,
    device: str | torch.device = "cpu",
    plain_figure: bool = False,
    tail: int | None = DEFAULT_TAIL,
    damp: float = DEFAULT_DAMP,
) -> ModulationResult:
    """Merge a LoRA delta into one AWQ W4A16 modulation layer.

    codes (O, I) uint8 0..15; scales, zeros (O, I/group) bf16-exact; bias (O,) bf16-exact: the base layer, with
    W = codes * scales + zeros per group. delta_w: dW (O, I) dense, or LoRA factors (up (O, r), down (r, I)) with
    dW = up @ down (faster: nothing O x I is formed). delta_b (O,) or None. Rows in the caller's order.
    x_calib: calibration inputs (n, I) or a prebuilt `ModulationCalibration` (build it once for all layers;
    `tail` / `damp` are then ignored). x_eval (n_eval, I): held-out inputs for the figures.
    mode: "calibrated" (default; writes the best of calibrated / bias fold / skip), "plain" (fresh-grid RTN,
    or skip if worse), "biasfold" (or skip if worse), "skip". plain_figure: also compute e_plain (costs about
    one more pass over dW; always done for mode="plain"). Deterministic; returned tensors are on the CPU.
    """
    dev = torch.device(device)
    # a small layer is all short ops: run it on one CPU thread
    with _cpu_threads(1 if codes.numel() <= _SMALL_LAYER else torch.get_num_threads(), dev):
        return _merge(codes, scales, zeros, bias, delta_w, delta_b, x_calib, x_eval, mode, group_size, dev,
                      plain_figure, tail, damp)


_SMALL_LAYER = 1 << 20


def _merge(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor,
    delta_w: DeltaW,
    delta_b: torch.Tensor | None,
    x_calib: torch.Tensor | ModulationCalibration,
    x_eval: torch.Tensor,
    mode: Mode,
    group_size: int,
    dev: torch.device,
    plain_figure: bool,
    tail: int | None,
    damp: float,
) -> ModulationResult:
    t_start = time.perf_counter()
    if mode not in ("calibrated", "plain", "biasfold", "skip"):
        raise ValueError(f"unknown mode {mode!r}")
    if codes.ndim != 2:
        raise ValueError("codes must be (O, I)")
    o, in_f = codes.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    ng = in_f // group_size
    if tuple(scales.shape) != (o, ng) or tuple(zeros.shape) != (o, ng) or tuple(bias.shape) != (o,):
        raise ValueError(
            f"shapes: codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, "
            f"bias {tuple(bias.shape)}; expected scales/zeros {(o, ng)}, bias {(o,)}"
        )
    codes = codes.to(dev)
    if codes.dtype != torch.uint8:
        codes = codes.to(torch.uint8)
    if int(codes.max()) > 15:
        raise ValueError("codes must be in 0..15")
    s = _check_bf16_exact("scales", scales.to(dev))
    z = _check_bf16_exact("zeros", zeros.to(dev))
    b0 = _check_bf16_exact("bias", bias.to(dev))
    db = torch.zeros(o, device=dev) if delta_b is None else delta_b.to(dev, torch.float32)
    bstar = b0 + db
    delta = _Delta(delta_w, (o, in_f), dev)
    xe = x_eval.to(dev, torch.float32)
    if xe.ndim != 2 or xe.shape[1] != in_f:
        raise ValueError(f"x_eval must be (n, {in_f})")

    if isinstance(x_calib, ModulationCalibration):
        calib = x_calib
        if calib.in_features != in_f or calib.group_size != group_size:
            raise ValueError("the ModulationCalibration was built for another layer shape")
        if not _same_device(calib.device, dev):
            raise ValueError(f"the ModulationCalibration lives on {calib.device}, not {dev}")
    elif mode == "calibrated":
        calib = ModulationCalibration.build(x_calib, group_size=group_size, tail=tail, damp=damp, device=dev)
    else:
        calib = None
    xbar = calib.mean if calib is not None else x_calib.to(dev, torch.float32).mean(0)

    # The signal and the cheap options.
    signal = delta.times_xt(xe)
    signal += db[:, None]
    e_skip = 1.0
    b_fold = _bf16(bstar + delta.matvec(xbar))
    e_fold = e_mod((b_fold - b0)[:, None] - signal, signal)
    e_fold_ideal = e_mod(signal - signal.mean(dim=1, keepdim=True), signal)

    notes: list[str] = []
    candidates: dict[str, tuple[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {
        "skip": (e_skip, (codes, s, z, b0)),
    }
    if mode in ("calibrated", "biasfold"):
        candidates["biasfold"] = (e_fold, (codes, s, z, b_fold))

    e_plain = None
    if mode == "plain" or plain_figure:
        err_w, plain_t = _plain_requant(codes, s, z, delta, xe, group_size, keep=(mode == "plain"))
        b_plain = _bf16(bstar)
        err_w += (b_plain - bstar)[:, None]
        e_plain = e_mod(err_w, signal)
        del err_w
        if plain_t is not None:
            candidates["plain"] = (e_plain, (plain_t[0], plain_t[1], plain_t[2], b_plain))

    e_asked = {"skip": e_skip, "biasfold": e_fold, "plain": e_plain}.get(mode)
    if mode == "calibrated":
        assert calib is not None
        tail_idx = calib.tail
        m = tail_idx.numel()
        gidx = tail_idx // group_size
        # tail quantities in (variables, rows) layout
        q0_t = codes.index_select(1, tail_idx).T.contiguous().float()  # (m, O)
        s_g, z_g = s.T.contiguous(), z.T.contiguous()  # (ng, O)
        s_tt, z_tt = s_g[gidx], z_g[gidx]  # (m, O)
        dw_t = delta.cols_t(tail_idx)  # (m, O)
        comp_t = delta.left_mul_t(calib.comp)  # (N', O): continuous optimum shift given -dW on the kept columns
        targets = torch.empty(1 + m + ng, o, dtype=torch.float32, device=dev)
        targets[0] = bstar
        torch.addcmul(z_tt, q0_t, s_tt, out=targets[1 : 1 + m])
        targets[1 : 1 + m] += dw_t
        targets[1 + m :] = 0.0
        targets += comp_t
        steps = torch.cat([
            _ulp_bf16(bstar).square().mean().sqrt()[None],
            s_tt.square().mean(1).sqrt(),
            _ulp_bf16(z_g).square().mean(1).sqrt(),
        ])
        perm, u = calib.rounding_plan(steps)
        _, q_new, z_new_t = _sequential_round(targets, perm, u, s_tt, z_tt, z_g)
        del targets
        if bool((s_tt <= 0).any()):  # a zero scale makes the code irrelevant: keep the base code
            q_new = torch.where(s_tt > 0, q_new, q0_t)
        # what changed: weights of the tail columns, and every weight of a group through its zero
        d_tail = (q_new - q0_t).mul_(s_tt)  # (m, O)
        dz_t = z_new_t - z_g  # (ng, O)
        xbar_g = xbar.view(ng, group_size).sum(-1)
        # re-fit the bias: nearest bf16 to its calibration optimum given the new weights
        e_bar = d_tail.T @ xbar[tail_idx] + dz_t.T @ xbar_g - delta.matvec(xbar)
        b_new = _bf16(bstar - e_bar)
        # Per row, keep the rounding only where it beats the bias fold on the calibration objective.
        # Both share the error -dW on the kept columns; J(cal) - J(fold) = dr'(G dr + 2 Z), with dr the
        # difference of the free variables and Z = G r_fold + G_{free,kept} e_kept (= -(G + lam) comp_t).
        gram = calib.gram
        dr = torch.cat([(b_new - b_fold)[None], d_tail, dz_t], dim=0)
        if delta.dense is None:  # cheap through the factors
            zt = delta.left_mul_t(calib.select).neg_()
        else:  # two (N' x m/N') GEMMs beat one (N' x I) pass over a dense dW
            zt = torch.mm(gram[:, 1 : 1 + m], dw_t).neg_()
            zt.addmm_(gram, comp_t, alpha=-1.0)
            zt.addcmul_(calib.lam[:, None], comp_t, value=-1.0)
        zt.addr_(gram[:, 0], b_fold - bstar)
        zt.mul_(2.0).addmm_(gram, dr)
        keep_row = (dr * zt).sum(0) < 0  # (O,)
        del dr, zt, comp_t, dw_t
        q_new = torch.where(keep_row[None], q_new, q0_t)
        d_tail.mul_(keep_row[None])
        z_new = torch.where(keep_row[None], z_new_t, z_g).T.contiguous()
        dz = z_new - z  # (O, ng)
        b_new = torch.where(keep_row, b_new, b_fold)
        if not bool(keep_row.all()):
            notes.append(f"{int((~keep_row).sum())} of {o} rows kept their codes (bias fold was better there)")
        xe_g = xe.view(-1, ng, group_size).sum(-1)
        err = d_tail.T @ xe[:, tail_idx].T
        err += dz @ xe_g.T
        err += (b_new - b0)[:, None]
        err -= signal
        e_cal = e_mod(err, signal)
        del err
        e_asked = e_cal
        n_changed = int(torch.count_nonzero(q_new != q0_t))
        codes_cal = codes.clone()
        codes_cal.index_copy_(1, tail_idx, q_new.to(torch.uint8).T)
        del q_new, q0_t, d_tail
        candidates["calibrated"] = (e_cal, (codes_cal, s, z_new, b_new))

    # Never write something worse than skipping; keep the best option, the simplest one on a tie.
    allowed = [k for k in ("skip", "biasfold", mode) if k in candidates]
    action = min(allowed, key=lambda k: (candidates[k][0], allowed.index(k)))
    if action != mode:
        notes.append(f"{mode} scored {candidates[mode][0]:.3f} on held-out sigmas; wrote {action} instead")
    e_written, (c_out, s_out, z_out, b_out) = candidates[action]
    if action == "calibrated":
        codes_changed = n_changed / codes.numel()
    elif c_out is codes:
        codes_changed = 0.0
    else:
        codes_changed = int(torch.count_nonzero(c_out != codes)) / codes.numel()
    zeros_changed = int(torch.count_nonzero(z_out != z)) / z.numel()
    bias_changed = int(torch.count_nonzero(b_out != b0)) / b0.numel()
    assert e_asked is not None
    result = ModulationResult(
        codes=c_out.cpu(),
        scales=s_out.cpu(),
        zeros=z_out.cpu(),
        bias=b_out.cpu(),
        action=action,
        mode=mode,
        e_mod=float(e_asked),
        e_written=float(e_written),
        e_biasfold=e_fold,
        e_biasfold_ideal=e_fold_ideal,
        e_skip=e_skip,
        e_plain=e_plain,
        codes_changed=codes_changed,
        zeros_changed=zeros_changed,
        bias_changed=bias_changed,
        seconds=time.perf_counter() - t_start,
        notes=notes,
    )
    log.debug("modulation merge: %s", result.summary())
    return result


__all__ = [
    "GROUP",
    "ModulationCalibration",
    "ModulationResult",
    "calibration_sigmas",
    "e_mod",
    "evaluation_sigmas",
    "merge_modulation",
    "modulation_inputs",
    "timestep_sinusoid",
]

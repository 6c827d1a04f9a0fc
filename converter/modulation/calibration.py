"""Everything of the calibrated requantization that depends on the calibration inputs alone
(`ModulationCalibration`, built once and shared by all layers), and the rounding engine that uses it."""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..codecs.awq_w4a16 import GROUP
from . import graphs, loops

DEFAULT_TAIL = 512
DEFAULT_DAMP = 3e-3


_THREADS_LOCK = threading.Lock()
_THREAD_LIMITS: list[int] = []  # the limits of every cpu_threads block now open, in any thread
_THREADS_OUTSIDE = [0]  # torch's setting when the first of them opened


@contextmanager
def cpu_threads(n: int, device: torch.device) -> Iterator[None]:
    """Run torch CPU ops on at most n threads inside the block (restored when the last open block ends).

    Short vector ops lose more to a parallel region than they gain, and far more when the cores are shared.
    torch's setting is process-wide, so blocks open in several threads at once (row chunks of a layer) share
    it: the smallest limit of the open blocks holds until the last one ends.
    """
    if device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        if not _THREAD_LIMITS:
            _THREADS_OUTSIDE[0] = torch.get_num_threads()
        _THREAD_LIMITS.append(n)
        torch.set_num_threads(max(1, min(min(_THREAD_LIMITS), _THREADS_OUTSIDE[0])))
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREAD_LIMITS.remove(n)
            limit = min(_THREAD_LIMITS, default=_THREADS_OUTSIDE[0])
            torch.set_num_threads(max(1, min(limit, _THREADS_OUTSIDE[0])))


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    default = torch.cuda.current_device() if a.type == "cuda" else 0
    return (default if a.index is None else a.index) == (default if b.index is None else b.index)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def ulp_bf16(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the bf16 grid at |t| (fp32)."""
    a = t.abs().to(torch.bfloat16)
    return torch.nextafter(a, torch.full_like(a, math.inf)).float() - a.float()


def check_bf16_exact(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    if not torch.equal(bf16(t), t):
        raise ValueError(f"{name} must hold bf16-representable values (they come from a bf16 checkpoint)")
    return t


def _checked_inputs(x_calib: torch.Tensor, weights: torch.Tensor | None, group_size: int, dev: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, I) float64, per-sigma weights (n,) float64) on `dev`, after the shape checks."""
    x = x_calib.to(device=dev, dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError("x_calib must be (n, I)")
    n, in_f = x.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    w = torch.ones(n, dtype=torch.float64, device=dev) if weights is None else weights.to(dev, torch.float64)
    if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be (n,), non-negative, not all zero")
    return x, w


def _pivot_order(a: torch.Tensor) -> torch.Tensor:
    """Minimum-pivot Cholesky order of the symmetric matrix `a` (overwritten): the pivots in the order taken."""
    with cpu_threads(1, a.device):
        return loops.compiled(loops.pivot_order)(a, torch.finfo(a.dtype).max, torch.finfo(a.dtype).tiny)


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
    tail_host: torch.Tensor = field(init=False, repr=False)  # `tail` on the CPU (indexes packed codes, no GPU wait)

    def __post_init__(self) -> None:
        self.tail_host = self.tail.cpu()

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
        # the order in fp32: a third less time than fp64 (560 rank-1 updates of a 560 x 560 matrix), same e_mod
        a = (h[1:, 1:] * d[1:, None] * d[None, 1:]).float()
        order = (graphs.pivot_order(a) if graphs.usable(dev) else _pivot_order(a)).flip(0)
        perm = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), 1 + order])
        hp = h[perm][:, perm]
        # U with inv(hp) = U^T U, U upper: with J the reversal, J hp J = L L^T gives U = J inv(L) J
        # hp is gram_damped permuted, whose factorization succeeded in `build`. Should this one fail all the same,
        # NaN spreads to the rounding's error figure, which the merge refuses: no host round trip here
        lr, info = torch.linalg.cholesky_ex(hp.flip(0, 1))
        lr.masked_fill_(info.ne(0), math.nan)
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
        x, w = _checked_inputs(x_calib, weights, group_size, dev)
        n, in_f = x.shape
        wsum = w.sum()
        mean = (w[:, None] * x).sum(0) / wsum
        var = (w[:, None] * (x - mean) ** 2).sum(0)  # centered second moments (sums)
        xg = x.view(n, in_f // group_size, group_size).sum(-1)  # zero-shift features
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


def sequential_round(
    targets: torch.Tensor,
    perm: torch.Tensor,
    u: torch.Tensor,
    s_t: torch.Tensor,
    z_t: torch.Tensor,
    z_g: torch.Tensor,
    block: int = 32,
    s_div: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-style rounding of the free variables, vectorized over rows (layout: variables x rows).

    targets (N', O): continuous targets in value space, canonical order [bias; tail weights; zero shifts].
    perm (N',): rounding order (canonical indices); u: the matching update rows. s_t, z_t (m, O): scale and zero
    of each tail weight; s_div: s_t with each zero scale replaced by 1, to divide by (None: s_t has no zero; a
    zero scale makes every code give the same value). z_g (ng, O): base zeros. Returns
    (bias (O,), codes (m, O) float, new zeros (ng, O), Σ e² per row (O,)). Each variable is rounded to its own
    grid (bias: bf16; weight: code 0..15 on its group's grid; zero: bf16) and its rounding error is pushed onto
    the variables not yet rounded. With e the scaled errors, the rounded values are targets - Uᵀe, so the
    rounding's cost in the damped metric H (inv(H) = UᵀU) is Σ e² per row: returned, so that scoring it needs
    no (N' x N') x (N' x O) product. The work is in place on a permuted copy of `targets`; `targets` is kept.
    """
    if graphs.usable(targets.device):
        return graphs.sequential_round(targets, perm, u, s_t, z_t, z_g, block, s_div)
    work = targets.index_select(0, perm)
    nvar, o = work.shape
    m = s_t.shape[0]
    codes = torch.empty(m, o, dtype=work.dtype, device=work.device)
    new_zeros = torch.empty_like(z_g)
    bias = torch.empty(o, dtype=work.dtype, device=work.device)
    sum_e2 = torch.zeros(o, dtype=work.dtype, device=work.device)
    udiag = u.diagonal().clone()
    # the raw error r = t - v moves later targets by u_ij / u_ii · r; kept by columns (a step reads its own)
    u_rel_t = (u / udiag[:, None]).T.contiguous()
    order = perm.tolist()
    round_block = loops.compiled(loops.round_block)
    for i1 in range(0, nvar, block):
        i2 = min(i1 + block, nvar)
        errs = torch.empty(i2 - i1, o, dtype=work.dtype, device=work.device)
        # column steps are short vector ops: one thread; the block update below is a GEMM: all threads
        with cpu_threads(1, work.device):
            round_block(work, errs, u_rel_t, order, i1, m, codes, s_t, s_t if s_div is None else s_div, z_t,
                        new_zeros, z_g, bias)
        errs.div_(udiag[i1:i2, None])
        sum_e2.add_(errs.square().sum(0))
        if i2 < nvar:
            work[i2:].addmm_(u[i1:i2, i2:].T, errs, alpha=-1.0)
    return bias, codes, new_zeros, sum_e2

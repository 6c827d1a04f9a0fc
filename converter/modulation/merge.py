"""One modulation layer: its validated inputs (`LayerProblem`), the candidates that can be written (each a
scored `Candidate`: skip, bias fold, plain requantization, calibrated requantization), and the chooser that
writes the best one, never worse than skipping."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal, Union

import torch

from ..codecs import group_dequantize
from ..codecs.awq_w4a16 import GROUP, AwqQWeight, qweight_columns, replace_qweight_columns
from ..errors import MergeError
from ..layout import MODULATION_MODES
from .calibration import (DEFAULT_DAMP, DEFAULT_TAIL, ModulationCalibration, bf16, check_bf16_exact, cpu_threads,
                          same_device, sequential_round, ulp_bf16)

log = logging.getLogger(__name__)

Mode = Literal["calibrated", "requant", "biasfold", "skip"]
MODES: tuple[str, ...] = MODULATION_MODES
LowRank = tuple[torch.Tensor, torch.Tensor]
DeltaW = Union[torch.Tensor, LowRank]
_SMALL_LAYER = 1 << 20


def e_mod(err: torch.Tensor, signal: torch.Tensor) -> float:
    """The per-layer error figure ||err|| / ||signal|| (Frobenius over outputs and sigmas).

    err = Y_new - Y_ideal and signal = Y_ideal - Y_base, both evaluated on the same held-out inputs (any layout,
    e.g. (O, n)). Skipping the LoRA gives err = -signal, i.e. exactly 1.0.
    """
    return _ratio(_sumsq(err), _sumsq(signal))


def _ratio(num: float, den: float) -> float:
    """sqrt(num / den) for sums of squares, 0 / 0 = 0."""
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def _sumsq(t: torch.Tensor) -> float:
    v = t.reshape(-1)
    if v.dtype not in (torch.float32, torch.float64):
        v = v.float()
    return float(torch.dot(v, v))  # BLAS dot: blocked accumulation, ~1e-6 relative in fp32
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

    def row_slice(self, r0: int, r1: int) -> _Delta:
        """The rows r0:r1 of dW (views, nothing copied)."""
        part = object.__new__(_Delta)
        part.dense = None if self.dense is None else self.dense[r0:r1]
        part.up = None if self.up is None else self.up[r0:r1]
        part.down = self.down
        return part

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



@dataclass(eq=False)
class LayerProblem:
    """One layer's validated inputs, on the compute device. codes (O, I) uint8, or None when the layer came
    packed (`packed`: the AWQ qweight, int32 (O/4, I/2); only the columns that may change are unpacked);
    s, z (O, I/group) and b0 (O,) fp32, bf16-exact; bstar = b0 + Δb; signal = ΔY on the held-out inputs
    (what skipping loses)."""

    codes: torch.Tensor | None
    packed: torch.Tensor | None
    s: torch.Tensor
    z: torch.Tensor
    b0: torch.Tensor
    db: torch.Tensor
    delta: _Delta
    xe: torch.Tensor
    calib: ModulationCalibration | None
    xbar: torch.Tensor  # (I,) mean input over the calibration sigmas
    group: int
    signal: torch.Tensor | None = None  # computed when not given
    zero_scale: bool = True  # whether some scale is 0 (or may be: True is always right, False is faster)

    def __post_init__(self) -> None:
        self.bstar = self.b0 + self.db
        if self.signal is None:
            self.signal = self.delta.times_xt(self.xe)
            self.signal += self.db[:, None]

    def rows(self, r0: int, r1: int) -> LayerProblem:
        """The same problem restricted to output rows r0:r1 (r0 a multiple of 4: packed rows come in fours)."""
        if (r0, r1) == (0, self.shape[0]):
            return self
        return LayerProblem(None if self.codes is None else self.codes[r0:r1],
                            None if self.packed is None else self.code_rows(self.packed, r0, r1),
                            self.s[r0:r1], self.z[r0:r1], self.b0[r0:r1], self.db[r0:r1], self.delta.row_slice(r0, r1),
                            self.xe, self.calib, self.xbar, self.group, self.signal[r0:r1], self.zero_scale)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.s.shape[:1]) + (self.s.shape[1] * self.group,)

    @property
    def n_groups(self) -> int:
        return self.s.shape[1]

    def columns(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Base codes of input columns idx, (m, O) of `dtype`: a column per row."""
        if self.packed is None:
            return self.codes[:, idx].T.to(dtype).contiguous()
        return qweight_columns(self.packed, idx, dtype)

    def code_rows(self, stored: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of codes in the form these came in (a packed qweight holds four rows a row)."""
        return stored[r0 // 4: (r1 + 3) // 4] if self.packed is not None else stored[r0:r1]

    def set_columns(self, idx: torch.Tensor, cols: torch.Tensor, out: torch.Tensor) -> None:
        """Write input columns idx = cols (m, O) uint8 into `out`: a copy of every code, in the form they came in
        (packed qweight or (O, I) uint8)."""
        if self.packed is not None:
            replace_qweight_columns(self.packed, idx, cols, out=out)
        else:
            out[:, idx] = cols.T

    def all_codes(self) -> torch.Tensor:
        """Every base code, uint8 (O, I) (unpacked on demand: only plain requantization needs them)."""
        if self.codes is None:
            self.codes = AwqQWeight.unpack(self.packed)
        return self.codes


def _check_shapes(codes, scales, zeros, bias, group_size: int) -> None:
    if codes.ndim != 2:
        raise ValueError("codes must be (O, I)")
    o, in_f = _code_shape(codes)
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    ng = in_f // group_size
    if tuple(scales.shape) != (o, ng) or tuple(zeros.shape) != (o, ng) or tuple(bias.shape) != (o,):
        raise ValueError(
            f"shapes: codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, "
            f"bias {tuple(bias.shape)}; expected scales/zeros {(o, ng)}, bias {(o,)}"
        )


def _code_shape(codes: torch.Tensor) -> tuple[int, int]:
    """(O, I) of unpacked codes, or of a packed AWQ qweight (int32 (O/4, I/2))."""
    return (codes.shape[0] * 4, codes.shape[1] * 2) if codes.dtype == torch.int32 else tuple(codes.shape)


def _calibration(x_calib, in_f: int, mode: str, group_size: int, dev: torch.device, tail, damp
                 ) -> ModulationCalibration | None:
    if isinstance(x_calib, ModulationCalibration):
        if x_calib.in_features != in_f or x_calib.group_size != group_size:
            raise ValueError("the ModulationCalibration was built for another layer shape")
        if not same_device(x_calib.device, dev):
            raise ValueError(f"the ModulationCalibration lives on {x_calib.device}, not {dev}")
        return x_calib
    if mode == "calibrated":
        return ModulationCalibration.build(x_calib, group_size=group_size, tail=tail, damp=damp, device=dev)
    return None


def layer_problem(codes, scales, zeros, bias, delta_w: DeltaW, delta_b, x_calib, x_eval, *, mode: str,
                  group_size: int, dev: torch.device, tail: int | None, damp: float) -> LayerProblem:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    _check_shapes(codes, scales, zeros, bias, group_size)
    o, in_f = _code_shape(codes)
    packed = None
    if codes.dtype == torch.int32:  # packed nibbles are 0..15 by construction
        if group_size != GROUP:
            raise ValueError(f"a packed AWQ qweight has groups of {GROUP}")
        packed, codes = codes.to(dev), None
    else:
        codes = codes.to(dev)
        if codes.dtype != torch.uint8:
            codes = codes.to(torch.uint8)
        if int(codes.max()) > 15:
            raise ValueError("codes must be in 0..15")
    xe = x_eval.to(dev, torch.float32)
    if xe.ndim != 2 or xe.shape[1] != in_f:
        raise ValueError(f"x_eval must be (n, {in_f})")
    calib = _calibration(x_calib, in_f, mode, group_size, dev, tail, damp)
    xbar = calib.mean if calib is not None else x_calib.to(dev, torch.float32).mean(0)
    # checked where they come from (the CPU, for a merge): on a GPU each check would wait for the device
    scales, zeros, bias = (check_bf16_exact(name, t) for name, t in (("scales", scales), ("zeros", zeros),
                                                                     ("bias", bias)))
    return LayerProblem(codes, packed, scales.to(dev), zeros.to(dev), bias.to(dev),
                        torch.zeros(o, device=dev) if delta_b is None else delta_b.to(dev, torch.float32),
                        _Delta(delta_w, (o, in_f), dev), xe, calib, xbar, group_size,
                        zero_scale=bool((scales <= 0).any()))


# -- the candidates ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Candidate:
    """What one method would write, and its e_mod on the held-out sigmas."""

    name: str
    e_mod: float
    codes: torch.Tensor | None = None  # every code (O, I); None: the base codes, or `written_codes`
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    codes_changed: int | None = None  # how many codes differ from the base, when known
    written_codes: torch.Tensor | None = None  # every code as it will be written, in the form it came in
    notes: list[str] = field(default_factory=list)


def skip(p: LayerProblem) -> Candidate:
    """The base layer as it is: loses the whole LoRA effect, e_mod = 1 exactly."""
    return Candidate("skip", 1.0, None, p.s, p.z, p.b0, codes_changed=0)


def biasfold(p: LayerProblem) -> Candidate:
    """The calibration mean of ΔY folded into the bias (rounded to bf16); weights unchanged."""
    b_fold = bf16(p.bstar + p.delta.matvec(p.xbar))
    return Candidate("biasfold", e_mod((b_fold - p.b0)[:, None] - p.signal, p.signal), None, p.s, p.z, b_fold,
                     codes_changed=0)


def biasfold_ideal(p: LayerProblem) -> float:
    """||ΔY − mean ΔY|| / ||ΔY||: the bias fold without rounding (mean over the held-out sigmas)."""
    return e_mod(p.signal - p.signal.mean(dim=1, keepdim=True), p.signal)


def requant(p: LayerProblem, keep: bool, chunk: int = 2048) -> Candidate:
    """Plain requantization: a fresh min/max grid, round-to-nearest of dequant(base) + ΔW, bias b + Δb rounded
    to bf16. With keep=False only its figure is computed (no O×I tensors kept)."""
    o, i = p.shape
    ng, group = p.n_groups, p.group
    codes = p.all_codes()
    err = torch.empty(o, p.xe.shape[0], dtype=torch.float32, device=codes.device)
    out = (torch.empty_like(codes), torch.empty_like(p.s), torch.empty_like(p.z)) if keep else None
    for r0 in range(0, o, chunk):
        r1 = min(r0 + chunk, o)
        wg = (group_dequantize(codes[r0:r1], p.s[r0:r1], p.z[r0:r1]) + p.delta.rows(r0, r1)).view(r1 - r0, ng, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        sp = bf16(((hi - lo) / 15.0).clamp_min(1e-8))
        zp = bf16(lo)
        q = ((wg - zp[..., None]) / sp[..., None]).round_().clamp_(0, 15)
        wp = q * sp[..., None] + zp[..., None]
        err[r0:r1] = (wp - wg).view(r1 - r0, i) @ p.xe.T
        if out is not None:
            out[0][r0:r1] = q.view(r1 - r0, i).to(torch.uint8)
            out[1][r0:r1] = sp
            out[2][r0:r1] = zp
    b_new = bf16(p.bstar)
    err += (b_new - p.bstar)[:, None]
    e = e_mod(err, p.signal)
    return Candidate("requant", e, *(out or (None, None, None)), b_new if keep else None)


@dataclass(eq=False)
class _Tail:
    """The calibrated candidate's free variables in (variables, rows) layout: the `tail` code columns, their
    group scales and zeros, and the rounding targets of [bias; tail weights; zero shifts]."""

    idx: torch.Tensor  # (m,) code columns that may change
    q0_codes: torch.Tensor  # (m, O) base codes, uint8
    q0: torch.Tensor  # (m, O) the same, float
    s_g: torch.Tensor  # (ng, O) group scales
    z_g: torch.Tensor  # (ng, O) group zeros
    s: torch.Tensor  # (m, O) scale of each tail weight
    z: torch.Tensor  # (m, O) zero of each tail weight
    s_div: torch.Tensor | None  # `s` with its zero scales replaced by 1 (None: no zero scale)
    targets: torch.Tensor  # (N', O) base values + the continuous optimum shift given -ΔW on the kept columns
    dw: torch.Tensor | None  # dense delta: (m, O) ΔW on the tail columns
    comp: torch.Tensor | None  # dense delta: (N', O) the optimum shift given -ΔW on the kept columns


def _tail(p: LayerProblem, factors: _FactorProducts | None) -> _Tail:
    idx = p.calib.tail
    m, gidx = idx.numel(), idx // p.group
    s_g, z_g = p.s.T.contiguous(), p.z.T.contiguous()
    s_t, z_t = s_g.index_select(0, gidx), z_g.index_select(0, gidx)  # (s_g[gidx] is 4x slower on the CPU)
    s_div = torch.where(s_t > 0, s_t, torch.ones_like(s_t)) if p.zero_scale else None
    q0_codes = p.columns(idx, torch.uint8)
    q0 = q0_codes.to(torch.float32)
    dw = comp = None
    if factors is not None:  # one rank-r product: the shift and ΔW on the tail columns together
        targets = factors.phi_left @ p.delta.up.T
    else:
        dw, comp = p.delta.cols_t(idx), p.delta.left_mul_t(p.calib.comp)
        targets = comp.clone()
        targets[1: 1 + m] += dw
    targets[0] += p.bstar
    targets[1: 1 + m].addcmul_(q0, s_t).add_(z_t)
    return _Tail(idx, q0_codes, q0, s_g, z_g, s_t, z_t, s_div, targets, dw, comp)


RoundingPlan = tuple[torch.Tensor, torch.Tensor]  # (rounding order, update rows): see ModulationCalibration


@dataclass(eq=False)
class _FactorProducts:
    """For a LoRA delta up·down: the products of the calibration with `down` that every row chunk uses (they do
    not depend on the rows, so they are made once per layer)."""

    phi_left: torch.Tensor  # (N', r): targets - base values = phi_left·upᵀ (comp·downᵀ, + downᵀ on tail rows)
    z_left: torch.Tensor  # (N', r): select·downᵀ (the keep test's Z through the factors)
    gram_phi: torch.Tensor  # (N', r): gram·phi_left
    phi_gram_phi: torch.Tensor  # (r, r): phi_leftᵀ·gram·phi_left

    @classmethod
    def of(cls, p: LayerProblem) -> _FactorProducts | None:
        if p.delta.dense is not None:
            return None
        down, m = p.delta.down, p.calib.tail.numel()
        phi_left = p.calib.comp @ down.T
        phi_left[1: 1 + m] += down[:, p.calib.tail].T
        gram_phi = p.calib.gram @ phi_left
        return cls(phi_left, p.calib.select @ down.T, gram_phi, phi_left.T @ gram_phi)


def _rounding_plan(p: LayerProblem) -> RoundingPlan:
    """The rounding order of the whole layer: from each free variable's grid step, the RMS over all its rows
    (a tail weight's step is its group's scale, picked per column), so every row chunk rounds in one order."""
    s_g, z_g = p.s.T.contiguous(), p.z.T.contiguous()
    steps = torch.cat([ulp_bf16(p.bstar).square().mean().sqrt()[None],
                       s_g.square().mean(1).sqrt()[p.calib.tail // p.group], ulp_bf16(z_g).square().mean(1).sqrt()])
    return p.calib.rounding_plan(steps)


@dataclass(eq=False)
class _Rounded:
    """What the sequential rounding gives: new tail codes (m, O) float, new zeros (ng, O), the bias as rounded
    first (O,), the rounded values minus their targets (N', O) and the rounding cost Σ e² in the damped
    metric (O,)."""

    codes: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor
    moved: torch.Tensor
    cost: torch.Tensor


def _round_tail(p: LayerProblem, t: _Tail, plan: RoundingPlan) -> _Rounded:
    """Sequential rounding of the free variables, in the layer's rounding order."""
    m = t.q0.shape[0]
    targets = t.targets
    b_round, q_new, z_new, cost = sequential_round(targets, *plan, t.s, t.z, t.z_g, s_div=t.s_div)
    if t.s_div is not None:  # a zero scale makes the code irrelevant (same value): keep the base code
        q_new = torch.where(t.s > 0, q_new, t.q0)
    moved = targets.neg_()  # the targets are used up
    t.targets = None
    moved[0] += b_round
    moved[1: 1 + m].addcmul_(q_new, t.s).add_(t.z)
    moved[1 + m:] += z_new - t.z_g
    return _Rounded(q_new, z_new, b_round, moved, cost)


FreeParts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # rows of [bias (O,); tail weights (m, O); zeros (ng, O)]


def _rows_to_keep(p: LayerProblem, t: _Tail, factors: _FactorProducts | None, dr: FreeParts,
                  b_fold: torch.Tensor, r: _Rounded, b_new: torch.Tensor) -> torch.Tensor:
    """Per row, whether the rounding beats the bias fold on the calibration objective. Both share the error
    -ΔW on the kept columns; J(cal) - J(fold) = dr'(G dr + 2 Z), with dr the difference of the free variables
    (by parts) and Z = G r_fold + G_{free,kept} e_kept (= -(G + lam) comp) + g0 (b_fold - b*)."""
    gram = p.calib.gram
    beta = b_fold - p.bstar
    if factors is not None:  # Z = -(select·downᵀ)·upᵀ + g0 βᵀ: dr'Z through the rank-r factor
        cross = (_parts_t_mm(factors.z_left, dr) * p.delta.up.T).sum(0)
        return _quad_lowrank(p, factors, b_fold, r, b_new) + 2 * (beta * _parts_t_mm(gram[:, :1], dr)[0] - cross) < 0
    m = t.idx.numel()
    dr_all = torch.cat([dr[0][None], dr[1], dr[2]], dim=0)
    zt = torch.mm(gram[:, 1: 1 + m], t.dw).neg_()  # two (N' x m/N') GEMMs beat one (N' x I) pass over dW
    zt.addmm_(gram, t.comp, alpha=-1.0)
    zt.addcmul_(p.calib.lam[:, None], t.comp, value=-1.0)
    zt.addr_(gram[:, 0], beta)
    zt.mul_(2.0).addmm_(gram, dr_all)
    return (dr_all * zt).sum(0) < 0


def _parts_t_mm(left: torch.Tensor, dr: FreeParts) -> torch.Tensor:
    """leftᵀ · dr (k, O) for left (N', k), with dr given by parts (no (N' x O) array is formed)."""
    m = dr[1].shape[0]
    out = torch.outer(left[0], dr[0])
    out.addmm_(left[1: 1 + m].T, dr[1]).addmm_(left[1 + m:].T, dr[2])
    return out


def _quad_lowrank(p: LayerProblem, factors: _FactorProducts, b_fold: torch.Tensor, r: _Rounded,
                  b_new: torch.Tensor) -> torch.Tensor:
    """dr' G dr per row (O,) without the (N' x N') x (N' x O) product, for a LoRA delta up·down.

    dr = δ' + φ: δ' = what the rounding moved the free variables from their targets (the re-fitted bias:
    +γ on it), φ = targets - fold = A·upᵀ + e0·βᵀ, with A = comp·downᵀ + downᵀ on the tail rows (rank r,
    `phi_left`) and β = b* - b_fold. With G = H - diag(lam) and δ'Hδ = Σ e² (the rounding's own cost),
    every term is a rank-r or diagonal product. Uses up r.moved (squared in place)."""
    gram, lam = p.calib.gram, p.calib.lam
    up, gram_phi = p.delta.up, factors.gram_phi
    delta, gamma, g00 = r.moved, b_new - r.bias, p.calib.gram[0, 0]
    g0_delta = gram[0] @ delta
    beta = p.bstar - b_fold
    cross = ((gram_phi.T @ delta + torch.outer(gram_phi[0], gamma)).T * up).sum(1)
    cross += beta * (g0_delta + gamma * g00)
    quad_delta = r.cost - lam @ delta.square_() + gamma * (2 * g0_delta + gamma * g00)
    r.moved = None
    quad_phi = ((up @ factors.phi_gram_phi) * up).sum(1) + beta * (2 * (up @ gram_phi[0]) + beta * g00)
    return quad_delta + 2 * cross + quad_phi


@dataclass(eq=False)
class _RowsPart:
    """The calibrated candidate on a chunk of rows."""

    zeros: torch.Tensor  # (rows, ng)
    bias: torch.Tensor  # (rows,)
    err_sumsq: float  # Σ err² over these rows and the held-out sigmas
    codes_changed: int
    rows_kept: int  # rows that kept their base codes (the bias fold was better there)


def _calibrated_rows(p: LayerProblem, fold_bias: torch.Tensor, plan: Future, factors: _FactorProducts | None,
                     written: torch.Tensor) -> _RowsPart:
    """The calibrated candidate on the rows of `p` (rows are independent once the rounding order is fixed;
    `plan` may still be under way while this chunk reads its columns); its codes go into `written` (these rows
    of the layer's codes as written, holding the base codes)."""
    t = _tail(p, factors)
    rounded = _round_tail(p, t, plan.result())
    d_tail = torch.sub(rounded.codes, t.q0).mul_(t.s)  # what changed: the tail weights, and via the zeros
    dz_t = rounded.zeros - t.z_g
    xbar_g = p.xbar.view(p.n_groups, p.group).sum(-1)
    # re-fit the bias: nearest bf16 to its calibration optimum given the new weights
    e_bar = d_tail.T @ p.xbar[t.idx] + dz_t.T @ xbar_g - p.delta.matvec(p.xbar)
    b_new = bf16(p.bstar - e_bar)
    keep_row = _rows_to_keep(p, t, factors, (b_new - fold_bias, d_tail, dz_t), fold_bias, rounded, b_new)
    new_codes = rounded.codes.to(torch.uint8)
    # where the bias fold was better, a row keeps its base codes and zeros and takes the fold's bias. On the CPU
    # the usual case, every row taking the rounding, skips these passes (the check would wait for a GPU)
    if p.s.device.type == "cpu" and bool(keep_row.all()):
        z_new = rounded.zeros.T.contiguous()
    else:
        d_tail.mul_(keep_row.to(d_tail.dtype)[None])  # a product, not torch.where: where is several times slower
        new_codes = torch.where(keep_row[None], new_codes, t.q0_codes)
        z_new = torch.where(keep_row[None], rounded.zeros, t.z_g).T.contiguous()
        b_new = torch.where(keep_row, b_new, fold_bias)
    err = d_tail.T @ p.xe[:, t.idx].T
    err += (z_new - p.z) @ p.xe.view(-1, p.n_groups, p.group).sum(-1).T
    err += (b_new - p.b0)[:, None]
    err -= p.signal
    changed = int(torch.count_nonzero(new_codes != t.q0_codes))  # on bytes: float passes cost 4x more memory
    err_sumsq = _sumsq(err)
    if math.isnan(err_sumsq):  # the inputs are finite (checked): the rounding plan's factorization failed
        raise MergeError("the calibrated rounding of a modulation layer failed (its Cholesky factorization); "
                         "nothing was written; --mod biasfold merges this LoRA without it")
    p.set_columns(p.calib.tail_host, new_codes, written)
    return _RowsPart(z_new, b_new, err_sumsq, changed, int((~keep_row).sum()))


# fp32 working memory of one row chunk of the calibrated candidate: two chunks a full-size layer (with the rounding
# steps launched from Python, four chunks took the 120 layers 55.6 s, two 47.7 s on 2 cores, at 1.0 GB peak RSS
# once the threads share one malloc heap; with the steps compiled a layer took 244-259 ms in two chunks, 246-261 in
# four, 264-285 in six; the codes are the same whatever the chunking, the e_mod figure's last digits are not)
_CHUNK_BYTES = 384 << 20


def _row_chunks(p: LayerProblem, workers: int) -> list[tuple[int, int]]:
    """Row ranges that bound the calibrated candidate's working memory (about a dozen (N' x rows) fp32 arrays)
    and give each worker at least one; boundaries on multiples of 4 (packed rows come in fours)."""
    o = p.shape[0]
    per_row = 4 * (12 * (1 + p.calib.tail.numel() + p.n_groups) + 2 * p.xe.shape[0])
    n = workers if p.s.device.type != "cpu" else workers * math.ceil(o * per_row / (_CHUNK_BYTES * workers))
    rows = 4 * math.ceil(o / (4 * n))
    return [(r0, min(r0 + rows, o)) for r0 in range(0, o, rows)]


def calibrated(p: LayerProblem, fold: Candidate, workers: int = 1) -> Candidate:
    """Error-compensating sequential rounding in the metric of the calibration inputs (see the package doc),
    kept per row only where it beats the bias fold `fold`. The rows are computed in chunks (bounded memory),
    `workers` chunks at once; the rounding order is found meanwhile (the chunks wait for it after reading
    their columns)."""
    chunks = _row_chunks(p, workers)
    factors = _FactorProducts.of(p)

    # every code as it will be written, made once: the chunks write their rows' new columns into it
    written = (p.packed if p.packed is not None else p.codes).clone()

    def rows(r: tuple[int, int]) -> _RowsPart:
        return _calibrated_rows(p.rows(*r), fold.bias[r[0]:r[1]], plan, factors, p.code_rows(written, *r))

    if workers <= 1 or len(chunks) <= 1:
        plan: Future = Future()
        plan.set_result(_rounding_plan(p))
        parts = [rows(r) for r in chunks]
    else:
        with cpu_threads(1, torch.device("cpu")), ThreadPoolExecutor(1, "modulation-plan") as planner, \
                ThreadPoolExecutor(workers, "modulation-rows") as pool:
            plan = planner.submit(_rounding_plan, p)
            parts = list(pool.map(rows, chunks))
    kept = sum(part.rows_kept for part in parts)
    notes = [f"{kept} of {p.shape[0]} rows kept their codes (bias fold was better there)"] if kept else []
    return Candidate("calibrated", _ratio(sum(part.err_sumsq for part in parts), _sumsq(p.signal)), None, p.s,
                     torch.cat([part.zeros for part in parts]), torch.cat([part.bias for part in parts]),
                     codes_changed=sum(part.codes_changed for part in parts), notes=notes, written_codes=written)


# -- the chooser ---------------------------------------------------------------------------------------------
@dataclass
class ModulationResult:
    """What to write for one layer, and how good each option is on held-out sigmas (e_mod figures)."""

    codes: torch.Tensor | None  # (O, I) uint8 0..15, when the codes were given unpacked
    qweight: torch.Tensor | None  # the packed AWQ qweight, when they were given packed
    scales: torch.Tensor  # (O, I/64) fp32, bf16-exact
    zeros: torch.Tensor  # (O, I/64) fp32, bf16-exact (scaled, negated zero: W = q*s + z)
    bias: torch.Tensor  # (O,) fp32, bf16-exact
    action: str  # "calibrated" | "requant" | "biasfold" | "skip": what the tensors above are
    mode: str  # the method asked for
    e_mod: float  # figure of what is written (the best of the safe options)
    e_asked: float  # figure of the method asked for
    e_biasfold: float  # bias fold as written: calibration mean folded into the bias, rounded to bf16
    e_biasfold_ideal: float  # ||dY - mean(dY)|| / ||dY||, mean over the held-out sigmas, no rounding
    e_skip: float = 1.0
    e_requant: float | None = None  # fresh min/max-grid RTN of dequant(base) + dW (if computed)
    codes_changed: float = 0.0  # fraction of codes that differ from the base
    zeros_changed: float = 0.0  # fraction of group zeros that differ from the base
    bias_changed: float = 0.0  # fraction of bias entries that differ from the base
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    why: str = ""  # what was written and why, one line

    def summary(self) -> str:
        rq = "n/a" if self.e_requant is None else f"{self.e_requant:.3f}"
        return (f"{self.action} (asked {self.mode}): e_mod {self.e_mod:.3f} | asked {self.e_asked:.3f} "
                f"biasfold {self.e_biasfold:.3f} (ideal {self.e_biasfold_ideal:.3f}) requant {rq} skip 1.000 | "
                f"codes changed {100 * self.codes_changed:.1f}% | {self.seconds:.2f}s")


def choose(candidates: dict[str, Candidate], mode: str) -> tuple[Candidate, list[str]]:
    """The best of skip, the bias fold and the asked method; the simplest one on a tie: never something worse
    than skipping, and never the base when a candidate that was scored does better."""
    allowed = list(dict.fromkeys(["skip"] + (["biasfold"] if mode != "skip" else []) + [mode]))
    best = candidates[min(allowed, key=lambda k: (candidates[k].e_mod, allowed.index(k)))]
    notes = list(candidates[mode].notes)
    if best.name != mode:
        notes.append(f"{mode} scored {candidates[mode].e_mod:.3f} on held-out sigmas; wrote {best.name} instead")
    return best, notes


ACTION_LABELS = {"calibrated": "calibrated", "requant": "requant", "biasfold": "bias fold", "skip": "base kept"}


def why(best: str, mode: str, figures: dict[str, float]) -> str:
    """One line: what was written for a layer and why (figures: e_mod of each candidate scored)."""
    if best == mode:
        return f"{ACTION_LABELS[best]} as asked (e_mod {figures[best]:.3f}; 1.0 = LoRA effect lost)"
    others = ", ".join(f"{ACTION_LABELS[name]} {figure:.3f}" for name, figure in figures.items() if name != best)
    if best == "skip":
        return f"base kept: nothing scored better than it on held-out timesteps (e_mod {others})"
    return f"{ACTION_LABELS[best]} (e_mod {figures[best]:.3f}) scored best on held-out timesteps: {others}"


def _written_codes(p: LayerProblem, best: Candidate) -> torch.Tensor:
    """The chosen candidate's codes in the form they came in: packed qweight or (O, I) uint8."""
    if best.codes is not None:
        return best.codes if p.packed is None else AwqQWeight.pack(best.codes)
    if best.written_codes is not None:
        return best.written_codes
    return p.codes if p.packed is None else p.packed


def _result(p: LayerProblem, best: Candidate, cands: dict[str, Candidate], mode: str, notes: list[str],
            t0: float) -> ModulationResult:
    numel = p.shape[0] * p.shape[1]
    if best.codes_changed is not None:
        changed = best.codes_changed / numel
    else:
        changed = int(torch.count_nonzero(best.codes != p.all_codes())) / numel
    rq = cands.get("requant")
    written = _written_codes(p, best).cpu()
    return ModulationResult(
        codes=written if p.packed is None else None, qweight=written if p.packed is not None else None,
        scales=best.scales.cpu(), zeros=best.zeros.cpu(), bias=best.bias.cpu(),
        action=best.name, mode=mode, e_mod=float(best.e_mod), e_asked=float(cands[mode].e_mod),
        e_biasfold=cands["biasfold"].e_mod, e_biasfold_ideal=biasfold_ideal(p), e_requant=rq.e_mod if rq else None,
        codes_changed=changed, zeros_changed=int(torch.count_nonzero(best.zeros != p.z)) / p.z.numel(),
        bias_changed=int(torch.count_nonzero(best.bias != p.b0)) / p.b0.numel(),
        seconds=time.perf_counter() - t0, notes=notes,
        why=why(best.name, mode, {k: c.e_mod for k, c in cands.items() if k in ("skip", "biasfold", mode)}))


def merge_modulation(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor,
                     delta_w: DeltaW, delta_b: torch.Tensor | None, x_calib: torch.Tensor | ModulationCalibration,
                     x_eval: torch.Tensor, *, mode: Mode = "calibrated", group_size: int = GROUP,
                     device: str | torch.device = "cpu", requant_figure: bool = False, tail: int | None = DEFAULT_TAIL,
                     damp: float = DEFAULT_DAMP) -> ModulationResult:
    """Merge a LoRA delta into one AWQ W4A16 modulation layer.

    codes (O, I) uint8 0..15, or the packed AWQ qweight int32 (O/4, I/2) (then only the code columns that may
    change are unpacked, and the result holds the packed `qweight`); scales, zeros (O, I/group) bf16-exact;
    bias (O,) bf16-exact: the base layer, with W = codes * scales + zeros per group. delta_w: ΔW (O, I) dense,
    or LoRA factors (up (O, r), down (r, I)) (faster: nothing O x I is formed). delta_b (O,) or None. Rows in
    the caller's order.
    x_calib: calibration inputs (n, I) or a prebuilt `ModulationCalibration` (build it once for all layers;
    `tail` / `damp` are then ignored). x_eval (n_eval, I): held-out inputs for the figures.
    mode: "calibrated" (default), "requant" (fresh-grid RTN), "biasfold", "skip"; whatever is asked, the best of
    it, the bias fold and skip is written. requant_figure: also compute e_requant (about one more pass over ΔW).
    Deterministic; returned tensors are on the CPU."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    # a small layer is all short ops: run it on one CPU thread
    small = codes.numel() * (8 if codes.dtype == torch.int32 else 1) <= _SMALL_LAYER
    workers = 1 if small or dev.type != "cpu" else torch.get_num_threads()
    with cpu_threads(1 if small else torch.get_num_threads(), dev):
        p = layer_problem(codes, scales, zeros, bias, delta_w, delta_b, x_calib, x_eval, mode=mode,
                          group_size=group_size, dev=dev, tail=tail, damp=damp)
        cands = {"skip": skip(p), "biasfold": biasfold(p)}
        if mode == "requant" or requant_figure:
            cands["requant"] = requant(p, keep=mode == "requant")
        if mode == "calibrated":
            cands["calibrated"] = calibrated(p, cands["biasfold"], workers)
        best, notes = choose(cands, mode)
        result = _result(p, best, cands, mode, notes, t0)
    log.debug("modulation merge: %s", result.summary())
    return result

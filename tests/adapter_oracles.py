"""Test-only oracles for LoKr / LoHa / DoRA / full-diff adapter files.

The expected ΔW of every adapter is computed by the reference libraries themselves, never by the
converter's parser:

* LyCORIS (``lycoris-lora``): the module classes' own file loaders
  (``LokrModule`` / ``LohaModule`` / ``LoConModule`` / ``FullModule.make_module_from_state_dict``) and
  the weight their ``forward`` applies; ``lycoris.functional.lokr.diff_weight`` for LoKr layouts the
  module classes cannot represent; ``lycoris.wrapper.create_lycoris_from_weights`` to read a written
  file back.
* PEFT: a real ``get_peft_model`` model (``LoKrConfig`` / ``LoHaConfig`` / ``LoraConfig(use_dora=True)``)
  loaded with ``set_peft_model_state_dict`` and merged with ``merge_and_unload``.

``formula_delta`` is the textbook formula of each adapter (kron / Hadamard / DoRA row or column norm),
with the scale conventions of LyCORIS, PEFT and ComfyUI written out; it is for cross-checks, not the
oracle.  ``selfcheck()`` (``python tests/adapter_oracles.py``) checks libraries against each other and
against the formulas; the README's adapter section states the conventions.

Public API
----------
Specs (factor tensors as they are stored in a file, bf16 or fp32):
    LoKrSpec, LoHaSpec, LoraDoraSpec (LyCORIS: lora_up/lora_down/dora_scale), PeftDoraSpec
    (PEFT: lora_A/lora_B/lora_magnitude_vector), FullDiffSpec (diff/diff_b); AdapterSpec = their union.
Generators (deterministic by seed):
    random_base_weight, random_lokr, random_loha, random_lora_dora, random_peft_dora, random_full_diff
Oracles (float64, shape (out, in)):
    expected_delta(spec, base_weight=None, *, library="auto", multiplier=1.0)
    expected_bias_delta(spec, *, multiplier=1.0)
    formula_delta(spec, base_weight=None, *, convention="lycoris", multiplier=1.0)
    lycoris_deltas_from_file(path, shapes, base_weights=None)
    peft_deltas_from_file(path, shapes, base_weights=None, config=None)
Writers:
    SCHOOLS, adapter_keys(module, spec, school), write_adapter_file(path, modules, school, *, metadata=None),
    peft_config_for(modules), write_peft_config(directory, modules)
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "LoKrSpec", "LoHaSpec", "LoraDoraSpec", "PeftDoraSpec", "FullDiffSpec", "AdapterSpec",
    "LOKR_LAYOUTS", "SCHOOLS", "AI_TOOLKIT_FULL_RANK_ALPHA", "UnrepresentableError",
    "random_base_weight", "random_lokr", "random_loha", "random_lora_dora", "random_peft_dora",
    "random_full_diff",
    "expected_delta", "expected_bias_delta", "formula_delta",
    "lycoris_deltas_from_file", "peft_deltas_from_file",
    "adapter_keys", "write_adapter_file", "peft_config_for", "write_peft_config", "selfcheck",
]

Tensor = torch.Tensor
Library = Literal["auto", "lycoris", "lycoris-functional", "peft"]
Convention = Literal["lycoris", "peft", "comfy"]

LOKR_LAYOUTS = ("w1_full+w2_lowrank", "both_lowrank", "both_full", "w1_lowrank+w2_full")
"""LoKr layouts. "w1_full+w2_lowrank" is LyCORIS' default, "both_lowrank" its ``decompose_both``,
"both_full" LyCORIS ``full_matrix`` / a rank too large for the factor / ai-toolkit's default
(``lokr_full_rank``), "w1_lowrank+w2_full" only arises from PEFT with a ``decompose_factor``."""

AI_TOOLKIT_FULL_RANK_ALPHA = 9999999999
"""ai-toolkit's ``lokr_full_rank`` sets linear = linear_alpha = 9999999999 (toolkit/config_modules.py)
and the module stores ``alpha = lora_dim`` when both factors are full; it is cast to the save dtype
(inf in float16)."""


class UnrepresentableError(ValueError):
    """The reference library cannot represent this adapter (layout, DoRA axis, ...)."""


# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class LoKrSpec:
    """LoKr factors: ΔW = scale · kron(w1, w2), w1 = w1_a @ w1_b when low-rank, likewise w2.

    ``rank`` is the nominal rank (LyCORIS ``lora_dim`` / PEFT ``r``); it only matters when both halves
    are full (PEFT still scales by alpha / r there, LyCORIS and ComfyUI use 1).  ``dora_scale`` (out, 1)
    makes it a LyCORIS "DoKr".
    """

    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    alpha: float | None = None
    rank: int | None = None
    dora_scale: Tensor | None = None

    kind = "lokr"

    def __post_init__(self) -> None:
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None):
            raise ValueError("LoKr: give exactly one of w1 or (w1_a, w1_b)")
        if (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            raise ValueError("LoKr: give exactly one of w2 or (w2_a, w2_b)")

    @property
    def w1_shape(self) -> tuple[int, int]:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])

    @property
    def w2_shape(self) -> tuple[int, int]:
        return tuple(self.w2.shape) if self.w2 is not None else (self.w2_a.shape[0], self.w2_b.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        (a, b), (c, d) = self.w1_shape, self.w2_shape
        return a * c, b * d

    @property
    def layout(self) -> str:
        if self.w1 is not None:
            return "both_full" if self.w2 is not None else "w1_full+w2_lowrank"
        return "w1_lowrank+w2_full" if self.w2 is not None else "both_lowrank"

    @property
    def lowrank_rank(self) -> int | None:
        """Rank of the factorised half (LyCORIS' loader reads w1_a first, lokr.py:264-267)."""
        if self.w1_a is not None:
            return self.w1_a.shape[1]
        if self.w2_a is not None:
            return self.w2_a.shape[1]
        return None

    def parts(self) -> dict[str, Tensor]:
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "dora_scale")
        values = (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.dora_scale)
        return {n: v for n, v in zip(names, values) if v is not None}


@dataclass(frozen=True)
class LoHaSpec:
    """LoHa factors: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r, r = w1_b.shape[0]."""

    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float | None = None
    dora_scale: Tensor | None = None

    kind = "loha"

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    def parts(self) -> dict[str, Tensor]:
        out = {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out


@dataclass(frozen=True)
class LoraDoraSpec:
    """LyCORIS LoRA + DoRA ("dora_wd"): lora_up (out, r), lora_down (r, in), dora_scale (out, 1) for
    ``wd_on_out=True`` (LyCORIS default since 2025-04) or (1, in) for the older column-norm variant."""

    lora_up: Tensor
    lora_down: Tensor
    dora_scale: Tensor
    alpha: float | None = None

    kind = "lora_dora"

    @property
    def shape(self) -> tuple[int, int]:
        return self.lora_up.shape[0], self.lora_down.shape[1]

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @property
    def wd_on_out(self) -> bool:
        out, inp = self.shape
        if tuple(self.dora_scale.shape) == (out, 1):
            return True
        if tuple(self.dora_scale.shape) == (1, inp):
            return False
        raise ValueError(f"dora_scale shape {tuple(self.dora_scale.shape)} is neither ({out}, 1) nor (1, {inp})")

    def parts(self) -> dict[str, Tensor]:
        return {"lora_up.weight": self.lora_up, "lora_down.weight": self.lora_down, "dora_scale": self.dora_scale}


@dataclass(frozen=True)
class PeftDoraSpec:
    """PEFT LoRA + DoRA: lora_A (r, in), lora_B (out, r), lora_magnitude_vector (out,), lora_alpha."""

    lora_A: Tensor
    lora_B: Tensor
    magnitude: Tensor
    alpha: float | None = None

    kind = "peft_dora"

    @property
    def shape(self) -> tuple[int, int]:
        return self.lora_B.shape[0], self.lora_A.shape[1]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def parts(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B, "lora_magnitude_vector": self.magnitude}


@dataclass(frozen=True)
class FullDiffSpec:
    """Full weight difference: ``.diff`` (out, in) and optional ``.diff_b`` (out,)."""

    diff: Tensor
    diff_b: Tensor | None = None

    kind = "full"
    alpha = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.diff.shape)

    def parts(self) -> dict[str, Tensor]:
        return {"diff": self.diff} if self.diff_b is None else {"diff": self.diff, "diff_b": self.diff_b}


AdapterSpec = Union[LoKrSpec, LoHaSpec, LoraDoraSpec, PeftDoraSpec, FullDiffSpec]


# ---------------------------------------------------------------------------------------- generators


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def random_base_weight(out_features: int, in_features: int, *, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """A base weight like a trained Linear's (entries ~ N(0, 1/in))."""
    return (_randn(_gen(seed), out_features, in_features) / math.sqrt(in_features)).to(dtype)


def random_lokr(out_features: int, in_features: int, *, layout: str = "w1_full+w2_lowrank", rank: int = 4,
                alpha: float | None = None, factor: int = -1, seed: int = 0,
                dtype: torch.dtype = torch.float32, target_rms: float = 0.02,
                dora_base_weight: Tensor | None = None) -> LoKrSpec:
    """Random LoKr factors with the shapes LyCORIS would give a Linear(in, out).

    w1 is (out_l, in_m), w2 (out_k, in_n) with (out_l, out_k) = factorization(out, factor) and likewise
    for in (LyCORIS' own ``lycoris.functional.factorization``).  "w1_lowrank+w2_full" instead takes
    PEFT's decompose_factor layout: w1 (d, d), w2 (out/d, in/d), d = ``factor`` or the smallest fit.
    ``rank`` is the low-rank dimension of the factorised half(s); for "both_full" it is only the
    nominal rank (max(w2 shape), which PEFT needs to rebuild a full w2).  alpha default: rank / 2
    ("both_full": the nominal rank, so PEFT's alpha / r is 1 too).  LyCORIS and PEFT only create a
    low-rank half when rank < max(that half's shape) / 2 (lokr.py:153-165, peft lokr/layer.py:203-204);
    other specs are still valid files (ComfyUI reads them) and ``expected_delta`` falls back to
    LyCORIS' functional API for them.  ``dora_base_weight`` adds a dora_scale (out, 1) near the row
    norms of W0 + ΔW.
    """
    from lycoris.functional import factorization

    if layout not in LOKR_LAYOUTS:
        raise ValueError(f"layout {layout!r} not in {LOKR_LAYOUTS}")
    if layout == "w1_lowrank+w2_full" and factor == -1:
        factor = _peft_big_w1_factor(out_features, in_features, rank)
    if layout == "w1_lowrank+w2_full":
        # PEFT's factorization does not swap (factor, dim // factor): w1 is the big half.
        (out_l, out_k), (in_m, in_n) = (factor, out_features // factor), (factor, in_features // factor)
    else:
        out_l, out_k = factorization(out_features, factor)
        in_m, in_n = factorization(in_features, factor)
    g = _gen(seed)
    w1_full = layout in ("w1_full+w2_lowrank", "both_full")
    w2_full = layout in ("both_full", "w1_lowrank+w2_full")
    w1 = _randn(g, out_l, in_m) if w1_full else None
    w1_a, w1_b = (None, None) if w1_full else (_randn(g, out_l, rank), _randn(g, rank, in_m))
    w2 = _randn(g, out_k, in_n) if w2_full else None
    w2_a, w2_b = (None, None) if w2_full else (_randn(g, out_k, rank), _randn(g, rank, in_n))
    nominal = rank if layout != "both_full" else max(out_k, in_n)
    if alpha is None:
        alpha = float(nominal) if layout == "both_full" else rank / 2
    scale = 1.0 if layout == "both_full" else alpha / rank
    # rms(kron(w1, w2)) = rms(w1) · rms(w2): give each half rms sqrt(target / |scale|).
    half = math.sqrt(target_rms / abs(scale))
    if w1 is not None:
        w1 = w1 * (half / _rms(w1))
    else:
        w1_a = w1_a * (half / _rms(w1_a @ w1_b))
    if w2 is not None:
        w2 = w2 * (half / _rms(w2))
    else:
        w2_a = w2_a * (half / _rms(w2_a @ w2_b))
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    spec = LoKrSpec(cast(w1), cast(w1_a), cast(w1_b), cast(w2), cast(w2_a), cast(w2_b), float(alpha), nominal)
    if dora_base_weight is not None:
        spec = _with_dora_scale(spec, dora_base_weight, g, dtype)
    return spec


def _peft_big_w1_factor(out_features: int, in_features: int, rank: int) -> int:
    """Smallest d dividing both dims with w2 = (out/d, in/d) full at ``rank`` and w1 = (d, d) low-rank
    (PEFT rules, peft/tuners/lokr/layer.py:203-204, with decompose_both and decompose_factor=d)."""
    g = math.gcd(out_features, in_features)
    for d in range(1, g + 1):
        if g % d == 0 and max(out_features, in_features) // d <= 2 * rank and rank < d / 2:
            return d
    raise ValueError(f"no PEFT decompose_factor gives w1 low-rank + w2 full for {out_features}x{in_features}"
                     f", r={rank}")


def random_loha(out_features: int, in_features: int, *, rank: int = 4, alpha: float | None = None,
                seed: int = 0, dtype: torch.dtype = torch.float32, target_rms: float = 0.02,
                dora_base_weight: Tensor | None = None) -> LoHaSpec:
    """Random LoHa factors (shapes of LyCORIS' LohaModule on a Linear); alpha default rank / 2."""
    g = _gen(seed)
    alpha = rank / 2 if alpha is None else float(alpha)
    w1_a, w1_b = _randn(g, out_features, rank), _randn(g, rank, in_features)
    w2_a, w2_b = _randn(g, out_features, rank), _randn(g, rank, in_features)
    half = math.sqrt(target_rms / abs(alpha / rank))
    w1_a = w1_a * (half / _rms(w1_a @ w1_b))
    w2_a = w2_a * (half / _rms(w2_a @ w2_b))
    spec = LoHaSpec(*(t.to(dtype).contiguous() for t in (w1_a, w1_b, w2_a, w2_b)), alpha=alpha)
    if dora_base_weight is not None:
        spec = _with_dora_scale(spec, dora_base_weight, g, dtype)
    return spec


def _lora_pair(g: torch.Generator, out_features: int, in_features: int, rank: int, scale: float,
               target_rms: float) -> tuple[Tensor, Tensor]:
    up, down = _randn(g, out_features, rank), _randn(g, rank, in_features)
    return up * (target_rms / abs(scale) / _rms(up @ down)), down


def _magnitudes(g: torch.Generator, merged: Tensor | None, n: int, dim: int) -> Tensor:
    """Row (dim=1) or column (dim=0) norms of ``merged`` times U(0.8, 1.2); U(0.5, 1.5) without it."""
    jitter = torch.rand(n, generator=g, dtype=torch.float64)
    if merged is None:
        return 0.5 + jitter
    return torch.linalg.vector_norm(merged.double(), dim=dim) * (0.8 + 0.4 * jitter)


def _with_dora_scale(spec: LoKrSpec | LoHaSpec, base: Tensor, g: torch.Generator, dtype: torch.dtype):
    merged = base.double() + formula_delta(spec)
    scale = _magnitudes(g, merged, spec.shape[0], 1).view(-1, 1)
    return replace(spec, dora_scale=scale.to(dtype))


def random_lora_dora(out_features: int, in_features: int, *, rank: int = 4, alpha: float | None = None,
                     wd_on_out: bool = True, base_weight: Tensor | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32, target_rms: float = 0.02) -> LoraDoraSpec:
    """Random LyCORIS LoRA + DoRA; dora_scale (out, 1) if ``wd_on_out`` else (1, in), close to the
    norms of W0 + ΔW along that axis when ``base_weight`` is given."""
    g = _gen(seed)
    alpha = rank / 2 if alpha is None else float(alpha)
    up, down = _lora_pair(g, out_features, in_features, rank, alpha / rank, target_rms)
    merged = None if base_weight is None else base_weight.double() + (alpha / rank) * (up @ down)
    if wd_on_out:
        scale = _magnitudes(g, merged, out_features, 1).view(-1, 1)
    else:
        scale = _magnitudes(g, merged, in_features, 0).view(1, -1)
    return LoraDoraSpec(up.to(dtype), down.to(dtype), scale.to(dtype), alpha)


def random_peft_dora(out_features: int, in_features: int, *, rank: int = 4, alpha: float | None = None,
                     base_weight: Tensor | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                     target_rms: float = 0.02) -> PeftDoraSpec:
    """Random PEFT LoRA + DoRA; magnitude (out,) close to the row norms of W0 + ΔW."""
    g = _gen(seed)
    alpha = rank / 2 if alpha is None else float(alpha)
    up, down = _lora_pair(g, out_features, in_features, rank, alpha / rank, target_rms)
    merged = None if base_weight is None else base_weight.double() + (alpha / rank) * (up @ down)
    mag = _magnitudes(g, merged, out_features, 1)
    return PeftDoraSpec(down.to(dtype), up.to(dtype), mag.to(dtype), alpha)


def random_full_diff(out_features: int, in_features: int, *, bias: bool = True, seed: int = 0,
                     dtype: torch.dtype = torch.float32, target_rms: float = 0.02) -> FullDiffSpec:
    """Random full weight difference (and bias difference)."""
    g = _gen(seed)
    diff = (_randn(g, out_features, in_features) * target_rms).to(dtype)
    diff_b = (_randn(g, out_features) * target_rms).to(dtype) if bias else None
    return FullDiffSpec(diff, diff_b)


# ------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Libraries create parameters with torch.empty / torch.tensor(float): make those float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _quiet_lycoris() -> Iterator[None]:
    """Silence LyCORIS' INFO/WARNING logging (e.g. "Loading Modules from state dict...")."""
    from lycoris.logging import logger

    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _d(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _linear(shape: tuple[int, int], base_weight: Tensor | None, bias: bool = False) -> nn.Linear:
    out, inp = shape
    lin = nn.Linear(inp, out, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.zeros(out, inp) if base_weight is None else base_weight)
        if bias:
            lin.bias.zero_()
    return lin.eval()


def _module_tree(shapes: Mapping[str, tuple[int, int]], base_weights: Mapping[str, Tensor] | None = None,
                 bias: bool = False) -> nn.Module:
    """nn.Module whose named_modules() contains a float64 nn.Linear under every dotted name."""
    root = nn.Module()
    for name, shape in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, _linear(tuple(shape), (base_weights or {}).get(name), bias))
    return root.eval()


def _needs_base(spec: AdapterSpec) -> bool:
    return isinstance(spec, (LoraDoraSpec, PeftDoraSpec)) or getattr(spec, "dora_scale", None) is not None


def _base(spec: AdapterSpec, base_weight: Tensor | None) -> Tensor:
    if base_weight is None:
        if _needs_base(spec):
            raise ValueError("a DoRA adapter's ΔW depends on the base weight: pass base_weight")
        return torch.zeros(spec.shape, dtype=torch.float64)
    if tuple(base_weight.shape) != tuple(spec.shape):
        raise ValueError(f"base_weight shape {tuple(base_weight.shape)} != adapter shape {spec.shape}")
    return base_weight.detach().to(torch.float64)


# ----------------------------------------------------------------------------------- LyCORIS oracle


def _lycoris_module(spec: AdapterSpec, lin: nn.Linear, multiplier: float) -> nn.Module:
    """Build the LyCORIS module with LyCORIS' own loader (what create_lycoris_from_weights calls)."""
    from lycoris.modules.full import FullModule
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    # LyCORIS' loaders do float(alpha) (no alpha key -> TypeError); its constructors map alpha 0 / None
    # to lora_dim (lokr.py:209, loha.py:132, locon.py:147), which is what a missing alpha means elsewhere.
    alpha = 0.0 if spec.alpha is None else float(spec.alpha)
    d = _d
    with _default_dtype(torch.float64), torch.no_grad():
        try:
            if isinstance(spec, LoKrSpec):
                mod = LokrModule.make_module_from_state_dict(
                    "oracle", lin, d(spec.w1), d(spec.w1_a), d(spec.w1_b), d(spec.w2), d(spec.w2_a),
                    d(spec.w2_b), None, None, alpha, d(spec.dora_scale))
            elif isinstance(spec, LoHaSpec):
                mod = LohaModule.make_module_from_state_dict(
                    "oracle", lin, d(spec.w1_a), d(spec.w1_b), d(spec.w2_a), d(spec.w2_b), None, None, alpha,
                    d(spec.dora_scale))
            elif isinstance(spec, (LoraDoraSpec, PeftDoraSpec)):
                if isinstance(spec, PeftDoraSpec):
                    up, down, scale, on_out = spec.lora_B, spec.lora_A, spec.magnitude.view(-1, 1), True
                else:
                    up, down, scale, on_out = spec.lora_up, spec.lora_down, spec.dora_scale, spec.wd_on_out
                if on_out:
                    mod = LoConModule.make_module_from_state_dict("oracle", lin, d(up), d(down), None, alpha,
                                                                 d(scale))
                else:
                    # LoConModule.make_module_from_state_dict always builds wd_on_out=True (the default
                    # since LyCORIS 2025-04), so (1, in) files need the constructor's wd_on_out=False.
                    mod = LoConModule("oracle", lin, 1.0, spec.rank, alpha, weight_decompose=True,
                                      wd_on_out=False)
                    mod.lora_up.weight.copy_(d(up))
                    mod.lora_down.weight.copy_(d(down))
                    mod.dora_scale.copy_(d(scale))
            elif isinstance(spec, FullDiffSpec):
                mod = FullModule.make_module_from_state_dict("oracle", lin, d(spec.diff), d(spec.diff_b))
            else:
                raise TypeError(f"unknown spec {type(spec).__name__}")
        except (AttributeError, RuntimeError) as exc:
            raise UnrepresentableError(
                f"LyCORIS' {type(spec).__name__} loader cannot build this adapter"
                f" ({getattr(spec, 'layout', '')}): {type(exc).__name__}: {exc}") from exc
    mod = mod.double().eval()
    mod.multiplier = multiplier
    return mod


def _lycoris_forward_delta(mod: nn.Module, base: Tensor, multiplier: float) -> Tensor:
    """ΔW exactly as the module's (non-bypass) forward applies it.

    Mirrors LokrModule._rebuild_forward (lokr.py:560-576), LohaModule.forward (loha.py:315-328) and
    LoConModule.forward (locon.py:325-348) using the modules' own methods.  Deliberately NOT
    get_diff_weight / get_merged_weight / merge_to: for LoKr and LoHa those apply alpha/r twice
    (lokr.py:381-395 on top of get_weight's scale; loha.py:230-244) -- see docs/format.md §11.
    """
    from lycoris.modules.full import FullModule
    from lycoris.modules.locon import LoConModule

    with torch.no_grad():
        if isinstance(mod, FullModule):
            return mod.get_diff_weight(multiplier)[0].to(torch.float64)
        if isinstance(mod, LoConModule):
            diff = mod.make_weight(base.device).to(base.dtype) * mod.scale
        else:
            diff = mod.get_weight(mod.shape).to(base.dtype) * mod.scalar
        if mod.wd:
            new = mod.apply_weight_decompose(base + diff, multiplier)
        else:
            new = base + diff * multiplier
        return (new - base).to(torch.float64)


def _lycoris_functional_delta(spec: AdapterSpec, base: Tensor, multiplier: float) -> Tensor:
    """LyCORIS' functional API: lycoris.functional.lokr.diff_weight (+ functional weight_decompose)."""
    from lycoris.functional import weight_decompose
    from lycoris.functional.lokr import diff_weight

    if not isinstance(spec, LoKrSpec):
        raise UnrepresentableError("the functional oracle is implemented for LoKr only")
    rank = spec.lowrank_rank
    # diff_weight's scale is gamma / rank (rank from w1_a, else w2_a, else gamma itself -> 1):
    # kernels/autograd/lokr.py:104-116.  A missing alpha means alpha = rank (scale 1).
    gamma = float(spec.alpha) if spec.alpha is not None else float(rank or 1)
    d = _d
    with torch.no_grad():
        delta = diff_weight(d(spec.w1), d(spec.w1_a), d(spec.w1_b), d(spec.w2), d(spec.w2_a), d(spec.w2_b),
                            None, gamma=gamma).reshape(spec.shape)
        if spec.dora_scale is None:
            return delta * multiplier
        on_out = tuple(spec.dora_scale.shape) == (spec.shape[0], 1)
        return weight_decompose(base + delta, d(spec.dora_scale), multiplier, on_out) - base


# -------------------------------------------------------------------------------------- PEFT oracle


def _peft_factor(spec: LoKrSpec) -> int:
    """A PEFT ``decompose_factor`` that rebuilds the spec's w1 / w2 shapes (PEFT's own factorization)."""
    from peft.tuners.lokr.layer import factorization

    out, inp = spec.shape
    (a, b), (c, d) = spec.w1_shape, spec.w2_shape
    for f in dict.fromkeys((-1, a, b, c, d)):
        if factorization(out, f) == (a, c) and factorization(inp, f) == (b, d):
            return f
    raise UnrepresentableError(f"no PEFT decompose_factor gives w1 {spec.w1_shape} / w2 {spec.w2_shape}")


def _peft_r_alpha(spec: AdapterSpec) -> tuple[int, float]:
    if isinstance(spec, LoKrSpec):
        r = spec.lowrank_rank or spec.rank or max(spec.w2_shape)
    else:
        r = spec.rank
    return int(r), float(r if spec.alpha is None else spec.alpha)


def _peft_config_kwargs(spec: AdapterSpec) -> tuple[str, dict[str, Any]]:
    """(config class name, its kwargs besides target_modules / patterns) for one module."""
    if isinstance(spec, FullDiffSpec):
        raise UnrepresentableError("PEFT has no full-diff adapter")
    r, alpha = _peft_r_alpha(spec)
    if isinstance(spec, LoKrSpec):
        if spec.dora_scale is not None:
            raise UnrepresentableError("PEFT LoKr has no DoRA")
        w1_low, w2_low = spec.w1 is None, spec.w2 is None
        factor = _peft_factor(spec)
        (a, b), (c, d) = spec.w1_shape, spec.w2_shape
        # PEFT rules, peft/tuners/lokr/layer.py:203-204
        if w1_low and not r < max(a, b) / 2:
            raise UnrepresentableError(f"PEFT makes w1 full for r={r} >= max{spec.w1_shape}/2")
        if w2_low != (r < max(c, d) / 2):
            raise UnrepresentableError(f"PEFT w2 layout for r={r}, w2 {spec.w2_shape} differs from {spec.layout}")
        return "LoKrConfig", dict(r=r, alpha=alpha, decompose_both=w1_low, decompose_factor=factor)
    if isinstance(spec, LoHaSpec):
        if spec.dora_scale is not None:
            raise UnrepresentableError("PEFT LoHa has no DoRA")
        return "LoHaConfig", dict(r=r, alpha=alpha)
    if isinstance(spec, LoraDoraSpec) and not spec.wd_on_out:
        raise UnrepresentableError("PEFT DoRA only normalises output rows; dora_scale (1, in) has no PEFT form")
    return "LoraConfig", dict(r=r, lora_alpha=alpha, use_dora=True)


def _peft_parts(spec: AdapterSpec) -> dict[str, Tensor]:
    """Spec tensors under PEFT's part names (float64)."""
    if isinstance(spec, LoraDoraSpec):
        return {"lora_A.weight": _d(spec.lora_down), "lora_B.weight": _d(spec.lora_up),
                "lora_magnitude_vector": _d(spec.dora_scale).view(-1)}
    return {k: _d(v) for k, v in spec.parts().items()}


def peft_config_for(modules: Mapping[str, AdapterSpec]) -> Any:
    """The PEFT config (LoKrConfig / LoHaConfig / LoraConfig) describing ``modules``: the most common
    r / alpha as defaults, rank_pattern / alpha_pattern for the others (exact module names)."""
    import peft

    per = {name: _peft_config_kwargs(spec) for name, spec in modules.items()}
    classes = {cls for cls, _ in per.values()}
    if len(classes) != 1:
        raise UnrepresentableError(f"one PEFT file holds one adapter type, got {sorted(classes)}")
    cls_name = classes.pop()
    shared = {k: v for k, v in next(iter(per.values()))[1].items() if k not in ("r", "alpha", "lora_alpha")}
    for name, (_, kw) in per.items():
        if {k: v for k, v in kw.items() if k not in ("r", "alpha", "lora_alpha")} != shared:
            raise UnrepresentableError(f"{name}: PEFT options {kw} differ from the other modules' {shared}")
    alpha_key = "lora_alpha" if cls_name == "LoraConfig" else "alpha"
    r0 = Counter(kw["r"] for _, kw in per.values()).most_common(1)[0][0]
    a0 = Counter(kw[alpha_key] for _, kw in per.values()).most_common(1)[0][0]
    rank_pattern = {n: kw["r"] for n, (_, kw) in per.items() if kw["r"] != r0}
    alpha_pattern = {n: kw[alpha_key] for n, (_, kw) in per.items() if kw[alpha_key] != a0}
    return getattr(peft, cls_name)(target_modules=sorted(modules), rank_pattern=rank_pattern,
                                   alpha_pattern=alpha_pattern, **{"r": r0, alpha_key: a0}, **shared)


def _peft_model(shapes: Mapping[str, tuple[int, int]], config, base_weights: Mapping[str, Tensor] | None):
    from peft import get_peft_model

    with _default_dtype(torch.float64):
        model = get_peft_model(_module_tree(shapes, base_weights), config)
    return model.double().eval()


def _peft_load(model, sd: Mapping[str, Tensor]) -> None:
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(model, dict(sd))
    unexpected = list(getattr(res, "unexpected_keys", []))
    missing = [k for k in getattr(res, "missing_keys", []) if any(p in k for p in ("lora_", "lokr_", "hada_"))]
    if unexpected or missing:
        raise AssertionError(f"PEFT did not take the state dict: unexpected={unexpected} missing={missing}")


def _peft_merged_deltas(model, shapes: Mapping[str, tuple[int, int]], base: Mapping[str, Tensor],
                        multiplier: float) -> dict[str, Tensor]:
    if multiplier != 1:
        for module in model.modules():
            if hasattr(module, "scale_layer") and hasattr(module, "scaling"):
                module.scale_layer(multiplier)
    merged = model.merge_and_unload(safe_merge=True)
    named = dict(merged.named_modules())
    return {n: named[n].weight.detach().to(torch.float64) - base[n] for n in shapes}


def _peft_delta(spec: AdapterSpec, base: Tensor, multiplier: float) -> Tensor:
    name = "m.target"
    config = peft_config_for({name: spec})
    model = _peft_model({name: spec.shape}, config, {name: base})
    _peft_load(model, {f"base_model.model.{name}.{p}": t for p, t in _peft_parts(spec).items()})
    return _peft_merged_deltas(model, {name: spec.shape}, {name: base}, multiplier)[name]


# ------------------------------------------------------------------------------------- public oracle


def expected_delta(spec: AdapterSpec, base_weight: Tensor | None = None, *, library: Library = "auto",
                   multiplier: float = 1.0) -> Tensor:
    """ΔW (out, in), float64, computed by a reference library (effective W' − W0 for DoRA).

    library:
      "lycoris"            LyCORIS module built by its own loader, ΔW as its forward applies it;
      "lycoris-functional" lycoris.functional.lokr.diff_weight (LoKr only; any layout);
      "peft"               PEFT model + set_peft_model_state_dict + merge_and_unload;
      "auto"               "lycoris", falling back to "lycoris-functional" for LoKr layouts the
                           LyCORIS module classes cannot hold (w1 low-rank + w2 full; a low-rank half
                           whose rank is >= half its larger side).
    ``multiplier`` is the library's own strength mechanism (LyCORIS ``multiplier``, PEFT
    ``scale_layer``); for DoRA the libraries disagree on what strength means (docs/format.md §11).
    """
    base = _base(spec, base_weight)
    if library == "peft":
        return _peft_delta(spec, base, multiplier)
    if library == "lycoris-functional":
        return _lycoris_functional_delta(spec, base, multiplier)
    if library not in ("lycoris", "auto"):
        raise ValueError(f"unknown library {library!r}")
    try:
        mod = _lycoris_module(spec, _linear(spec.shape, base, bias=isinstance(spec, FullDiffSpec)), multiplier)
    except UnrepresentableError:
        if library == "auto" and isinstance(spec, LoKrSpec):
            return _lycoris_functional_delta(spec, base, multiplier)
        raise
    return _lycoris_forward_delta(mod, base, multiplier)


def expected_bias_delta(spec: FullDiffSpec, *, multiplier: float = 1.0) -> Tensor | None:
    """Δbias of a full-diff adapter, from LyCORIS' FullModule.get_diff_weight (full.py:192-211)."""
    if spec.diff_b is None:
        return None
    mod = _lycoris_module(spec, _linear(spec.shape, None, bias=True), multiplier)
    with torch.no_grad():
        return mod.get_diff_weight(multiplier)[1].to(torch.float64)


# --------------------------------------------------------------------------------------- formulas


def formula_delta(spec: AdapterSpec, base_weight: Tensor | None = None, *, convention: Convention = "lycoris",
                  multiplier: float = 1.0) -> Tensor:
    """Textbook ΔW in float64, with one library's scale / DoRA convention (for cross-checks).

    LoKr  s·kron(w1, w2); s = alpha / r with r the low-rank dimension; s = 1 when both halves are
          full ("lycoris", "comfy") but alpha / r_nominal under "peft"; alpha None means s = 1.
    LoHa  (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r.
    DoRA  W' = m · V / ‖V‖ with V = W0 + s·ΔV, the norm per output row for dora_scale (out, 1) /
          PEFT magnitudes, per input column for (1, in); "comfy" takes the row norm of W0 instead
          of V (ComfyUI weight_adapter/base.py weight_decompose, output-axis branch).
          Strength: "lycoris" W'' = V·(mult·(m/‖V‖ − 1) + 1); "peft" s → mult·s inside V;
          "comfy" W0 + mult·(W' − W0).
    """
    d = _d
    if isinstance(spec, FullDiffSpec):
        return d(spec.diff) * multiplier
    if isinstance(spec, LoKrSpec):
        w1 = d(spec.w1) if spec.w1 is not None else d(spec.w1_a) @ d(spec.w1_b)
        w2 = d(spec.w2) if spec.w2 is not None else d(spec.w2_a) @ d(spec.w2_b)
        raw = torch.kron(w1, w2)
        r = spec.lowrank_rank
        if r is None and convention == "peft":
            r = spec.rank or max(spec.w2_shape)
        s = 1.0 if spec.alpha is None or r is None else spec.alpha / r
    elif isinstance(spec, LoHaSpec):
        raw = (d(spec.w1_a) @ d(spec.w1_b)) * (d(spec.w2_a) @ d(spec.w2_b))
        s = 1.0 if spec.alpha is None else spec.alpha / spec.rank
    elif isinstance(spec, LoraDoraSpec):
        raw, s = d(spec.lora_up) @ d(spec.lora_down), (1.0 if spec.alpha is None else spec.alpha / spec.rank)
    elif isinstance(spec, PeftDoraSpec):
        raw, s = d(spec.lora_B) @ d(spec.lora_A), (1.0 if spec.alpha is None else spec.alpha / spec.rank)
    else:
        raise TypeError(type(spec).__name__)

    scale_vec = spec.magnitude.view(-1, 1) if isinstance(spec, PeftDoraSpec) else getattr(spec, "dora_scale", None)
    if scale_vec is None:
        return raw * (s * multiplier)
    w0 = _base(spec, base_weight)
    m = d(scale_vec)
    on_out = tuple(m.shape) == (spec.shape[0], 1)
    s_eff = s * multiplier if convention == "peft" else s
    v = w0 + s_eff * raw
    normed = w0 if (convention == "comfy" and on_out) else v
    norm = torch.linalg.vector_norm(normed, dim=1, keepdim=True) if on_out \
        else torch.linalg.vector_norm(normed, dim=0, keepdim=True)
    new = v * (m / norm)
    if convention == "lycoris" and multiplier != 1:
        new = v * (multiplier * (m / norm - 1) + 1)
    if convention == "comfy" and multiplier != 1:
        new = w0 + multiplier * (new - w0)
    return new - w0


# -------------------------------------------------------------------------------- file round trips


def _read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def lycoris_deltas_from_file(path: str | Path, shapes: Mapping[str, tuple[int, int]],
                             base_weights: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Read a "lycoris-prefix" (``lycoris_``) or "lycoris-kohya" (``lora_unet_``) file with LyCORIS'
    own ``create_lycoris_from_weights`` onto a module tree with ``shapes``; return each module's ΔW as
    its forward applies it.  (``lora_unet_`` is renamed to ``lycoris_``: LyCORIS builds both names the
    same way, kohya.py:191 vs wrapper.py:166.)"""
    from lycoris.wrapper import create_lycoris_from_weights

    sd, _ = _read_safetensors(path)
    sd = {("lycoris_" + k[len("lora_unet_"):] if k.startswith("lora_unet_") else k): v for k, v in sd.items()}
    base = {n: (base_weights or {}).get(n, torch.zeros(s, dtype=torch.float64)).to(torch.float64)
            for n, s in shapes.items()}
    tree = _module_tree(shapes, base)
    with _default_dtype(torch.float64), torch.no_grad(), _quiet_lycoris():
        network, _ = create_lycoris_from_weights(1.0, "", tree, weights_sd=sd)
    by_name = {m.lora_name: m for m in network.loras}
    out = {}
    for name in shapes:
        mod = by_name.get("lycoris_" + name.replace(".", "_"))
        if mod is None:
            raise KeyError(f"LyCORIS built no module for {name}")
        out[name] = _lycoris_forward_delta(mod.double().eval(), base[name], 1.0)
    return out


def peft_deltas_from_file(path: str | Path, shapes: Mapping[str, tuple[int, int]],
                          base_weights: Mapping[str, Tensor] | None = None, config=None) -> dict[str, Tensor]:
    """Read a "peft" file with PEFT (config from ``config`` or the file's ``lora_adapter_metadata``)
    and return each module's merged ΔW (merge_and_unload)."""
    import peft

    sd, meta = _read_safetensors(path)
    if config is None:
        if "lora_adapter_metadata" not in meta:
            raise ValueError("no config given and no lora_adapter_metadata in the file")
        cfg = json.loads(meta["lora_adapter_metadata"])
        config = peft.PeftConfig.from_peft_type(**cfg)
    base = {n: (base_weights or {}).get(n, torch.zeros(s, dtype=torch.float64)).to(torch.float64)
            for n, s in shapes.items()}
    model = _peft_model(shapes, config, base)
    _peft_load(model, {k: v.to(torch.float64) for k, v in sd.items()})
    return _peft_merged_deltas(model, shapes, base, 1.0)


# ----------------------------------------------------------------------------------------- writers


SCHOOLS = ("lycoris-kohya", "lycoris-prefix", "comfy", "diffusers", "peft", "ai-toolkit-zimage-lokr")


@functools.cache
def _peft_saved_parts(cls_name: str, kwargs_items: tuple, shape: tuple[int, int]) -> frozenset[str]:
    """Part names PEFT itself saves (get_peft_model_state_dict) for one module of this config."""
    import peft
    from peft import get_peft_model, get_peft_model_state_dict

    config = getattr(peft, cls_name)(target_modules=["m.target"], **dict(kwargs_items))
    model = get_peft_model(_module_tree({"m.target": shape}), config)
    prefix = "base_model.model.m.target."
    keys = get_peft_model_state_dict(model).keys()
    assert all(k.startswith(prefix) for k in keys), list(keys)
    return frozenset(k[len(prefix):] for k in keys)


def _peft_part_names(spec: AdapterSpec) -> dict[str, Tensor]:
    """Spec tensors keyed by the part names a real PEFT model of the same config/shape saves."""
    cls_name, kwargs = _peft_config_kwargs(spec)
    saved = _peft_saved_parts(cls_name, tuple(sorted(kwargs.items())), tuple(spec.shape))
    parts = _peft_parts(spec)
    if set(parts) != saved:
        raise AssertionError(f"PEFT saves {sorted(saved)} for this adapter, the spec has {sorted(parts)}")
    src = spec.parts()
    if isinstance(spec, LoraDoraSpec):
        src = {"lora_A.weight": spec.lora_down, "lora_B.weight": spec.lora_up,
               "lora_magnitude_vector": spec.dora_scale.reshape(-1)}
    return {p: src[p] for p in parts}


def _prefix(module: str, school: str) -> str:
    if school == "lycoris-kohya":
        return "lora_unet_" + module.replace(".", "_")
    if school == "lycoris-prefix":
        return "lycoris_" + module.replace(".", "_")
    if school in ("comfy", "ai-toolkit-zimage-lokr"):
        return "diffusion_model." + module
    if school == "diffusers":
        return module
    if school == "peft":
        return "base_model.model." + module
    raise ValueError(f"unknown school {school!r}; expected one of {SCHOOLS}")


def _alpha_value(spec: AdapterSpec, school: str) -> float | None:
    """The alpha a file of this school stores (None: no alpha key)."""
    if school == "ai-toolkit-zimage-lokr" and not isinstance(spec, LoKrSpec):
        raise UnrepresentableError("ai-toolkit-zimage-lokr writes LoKr only")
    if school == "peft" or isinstance(spec, FullDiffSpec):
        return None  # PEFT keeps alpha in adapter_config.json / lora_adapter_metadata
    if school == "ai-toolkit-zimage-lokr":
        # ai-toolkit: peft_format forces alpha = lora_dim (lora_special.py:428-431), and both-full
        # modules store alpha = lora_dim (models/lokr.py:211-216): its scale is always 1.
        if spec.layout == "both_full":
            return float(AI_TOOLKIT_FULL_RANK_ALPHA)
        r = spec.lowrank_rank
        if spec.alpha is not None and spec.alpha != r:
            raise UnrepresentableError(f"ai-toolkit LoKr files always have alpha == rank ({r}), spec has {spec.alpha}")
        return float(r)
    return None if spec.alpha is None else float(spec.alpha)


def adapter_keys(module: str, spec: AdapterSpec, school: str) -> dict[str, str]:
    """{part name: file key} for one module ("alpha" included when the school stores it)."""
    parts = _peft_part_names(spec) if school == "peft" else spec.parts()
    base = _prefix(module, school)
    keys = {p: f"{base}.{p}" for p in parts}
    if _alpha_value(spec, school) is not None:
        keys["alpha"] = f"{base}.alpha"
    return keys


def write_adapter_file(path: str | Path, modules: Mapping[str, AdapterSpec], school: str, *,
                       metadata: Mapping[str, str] | None = None,
                       alpha_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Write ``modules`` (diffusers module name -> spec) as ``school`` names them; return what was written.

    Tensors are written as stored in the spec.  ``alpha`` is a 0-d tensor in the spec's factor dtype
    (LyCORIS save_weights and ai-toolkit get_state_dict cast every tensor to the save dtype) unless
    ``alpha_dtype`` says otherwise; it must be exactly representable there (ai-toolkit's 9999999999
    excepted).  "peft" files carry no alpha: the PEFT config goes into the ``lora_adapter_metadata``
    metadata key (as diffusers' save_lora_adapter does) unless ``metadata`` already has it.
    """
    sd: dict[str, Tensor] = {}
    for module, spec in modules.items():
        parts = _peft_part_names(spec) if school == "peft" else spec.parts()
        base = _prefix(module, school)
        for part, tensor in parts.items():
            sd[f"{base}.{part}"] = tensor.detach().contiguous()
        alpha = _alpha_value(spec, school)
        if alpha is not None:
            dtype = alpha_dtype or next(iter(parts.values())).dtype
            stored = torch.tensor(alpha, dtype=torch.float64).to(dtype)
            exact = float(stored) == alpha
            if not exact and not (school == "ai-toolkit-zimage-lokr" and spec.layout == "both_full"):
                raise ValueError(f"{module}: alpha {alpha} is not exact in {dtype}; pick another alpha")
            sd[f"{base}.alpha"] = stored
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if school == "peft" and "lora_adapter_metadata" not in meta:
        cfg = peft_config_for(modules).to_dict()
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        meta["lora_adapter_metadata"] = json.dumps(cfg, indent=2, sort_keys=True, default=str)
    save_file(sd, str(path), metadata=meta or None)
    return sd


def write_peft_config(directory: str | Path, modules: Mapping[str, AdapterSpec]) -> Path:
    """Write ``adapter_config.json`` for ``modules`` with PEFT's own ``save_pretrained``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config_for(modules).save_pretrained(str(directory))
    return directory / "adapter_config.json"


# --------------------------------------------------------------------------------------- selfcheck


def _maxrel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _forward_identity_delta(spec: AdapterSpec, base: Tensor, multiplier: float = 1.0) -> Tensor:
    """ΔW from the LyCORIS module's real forward on an identity batch (small shapes only)."""
    lin = _linear(spec.shape, base)
    mod = _lycoris_module(spec, lin, multiplier)
    mod.apply_to()
    eye = torch.eye(spec.shape[1], dtype=torch.float64)
    with torch.no_grad():
        return (lin(eye) - eye @ base.T).T


def _check_lycoris_saved_names(names: Mapping[str, tuple[int, int]], verbose: bool) -> None:
    """The "lycoris-prefix" writer produces the key names, shapes and alpha that LyCORIS' own
    create_lycoris(...).save_weights writes for the same modules."""
    import tempfile

    from lycoris import create_lycoris

    cases = {
        "lokr": (dict(factor=-1), lambda o, i: random_lokr(o, i, rank=4, alpha=2.0, dtype=torch.bfloat16)),
        "loha": ({}, lambda o, i: random_loha(o, i, rank=4, alpha=2.0, dtype=torch.bfloat16)),
        "lora": (dict(dora_wd=True), lambda o, i: random_lora_dora(o, i, rank=4, alpha=2.0, dtype=torch.bfloat16)),
        "full": ({}, lambda o, i: random_full_diff(o, i, bias=False, dtype=torch.bfloat16)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for algo, (kw, make) in cases.items():
            with _quiet_lycoris():
                net = create_lycoris(_module_tree(names).float(), 1.0, linear_dim=4, linear_alpha=2, algo=algo, **kw)
                net.apply_to()
                net.save_weights(str(Path(tmp) / f"{algo}.safetensors"), torch.bfloat16, {})
            theirs, _ = _read_safetensors(Path(tmp) / f"{algo}.safetensors")
            ours = write_adapter_file(Path(tmp) / f"{algo}-ours.safetensors",
                                      {n: make(*s) for n, s in names.items()}, "lycoris-prefix")
            layout = lambda sd: {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}  # noqa: E731
            assert layout(ours) == layout(theirs), (algo, layout(ours), layout(theirs))
            alphas = {float(v) for k, v in theirs.items() if k.endswith(".alpha")}
            assert alphas <= {2.0}, alphas
            if verbose:
                print(f"ok   names/shapes/dtypes == LyCORIS save_weights ({algo}, {len(ours)} keys)")


def selfcheck(verbose: bool = True) -> list[tuple[str, float]]:
    """Cross-check libraries, formulas and file round trips; returns [(check, max relative diff)].

    Each check asserts its expectation: "==" means max|a − b| / max|b| < 1e-6, "!=" means > 1e-6
    (documented library disagreements).
    """
    import tempfile

    results: list[tuple[str, float]] = []

    def check(name: str, a: Tensor, b: Tensor, equal: bool = True, tol: float = 1e-6) -> None:
        err = _maxrel(a, b)
        results.append((name, err))
        if verbose:
            print(f"{'ok ' if (err < tol) == equal else 'BAD'} {err:9.2e}  {name}")
        assert (err < tol) == equal, (name, err)

    def skip(name: str, exc: Exception) -> None:
        if verbose:
            print(f"--            {name}: {str(exc)[:110]}")

    zeros = lambda o, i: torch.zeros(o, i, dtype=torch.float64)  # noqa: E731
    for (o, i) in [(256, 256), (128, 512), (512, 128), (96, 160)]:
        w0 = random_base_weight(o, i, seed=o + i)
        for layout in LOKR_LAYOUTS:
            for dtype in (torch.float32, torch.bfloat16):
                alpha = None if layout == "both_full" else 2.0
                spec = random_lokr(o, i, layout=layout, rank=4, alpha=alpha, seed=7, dtype=dtype)
                tag = f"lokr {layout:18s} {o}x{i} {str(dtype)[6:]}"
                ref = formula_delta(spec)
                check(f"{tag} lycoris-functional == formula",
                      expected_delta(spec, library="lycoris-functional"), ref)
                try:
                    check(f"{tag} lycoris module == formula", expected_delta(spec, library="lycoris"), ref)
                    check(f"{tag} lycoris forward(I) == formula", _forward_identity_delta(spec, zeros(o, i)), ref)
                except UnrepresentableError as exc:
                    skip(f"{tag} lycoris module", exc)
                try:
                    peft_delta = expected_delta(spec, library="peft")
                    check(f"{tag} peft == formula(peft)", peft_delta, formula_delta(spec, convention="peft"))
                    check(f"{tag} peft == lycoris", peft_delta, expected_delta(spec))
                except UnrepresentableError as exc:
                    skip(f"{tag} peft", exc)
        spec = random_loha(o, i, rank=4, alpha=2.0, seed=3)
        ref = formula_delta(spec)
        check(f"loha {o}x{i} lycoris == formula", expected_delta(spec), ref)
        check(f"loha {o}x{i} lycoris forward(I) == formula", _forward_identity_delta(spec, zeros(o, i)), ref)
        check(f"loha {o}x{i} peft == lycoris", expected_delta(spec, library="peft"), expected_delta(spec))

        pd = random_peft_dora(o, i, rank=4, alpha=8.0, base_weight=w0, seed=5)
        ref = formula_delta(pd, w0)
        check(f"peft-dora {o}x{i} peft == formula(row norm)", expected_delta(pd, w0, library="peft"), ref)
        check(f"peft-dora {o}x{i} lycoris(wd_on_out) == peft", expected_delta(pd, w0),
              expected_delta(pd, w0, library="peft"))
        check(f"peft-dora {o}x{i} lycoris forward(I) == formula", _forward_identity_delta(pd, w0.double()), ref)
        check(f"peft-dora {o}x{i} comfy(out-axis norm of W0) != formula",
              formula_delta(pd, w0, convention="comfy"), ref, equal=False)
        ld = random_lora_dora(o, i, rank=4, alpha=2.0, wd_on_out=True, base_weight=w0, seed=6)
        check(f"lora-dora(out,1) {o}x{i} lycoris == peft", expected_delta(ld, w0),
              expected_delta(ld, w0, library="peft"))
        lc = random_lora_dora(o, i, rank=4, alpha=2.0, wd_on_out=False, base_weight=w0, seed=6)
        ref = formula_delta(lc, w0)
        check(f"lora-dora(1,in) {o}x{i} lycoris == formula(col norm)", expected_delta(lc, w0), ref)
        check(f"lora-dora(1,in) {o}x{i} lycoris forward(I) == formula", _forward_identity_delta(lc, w0.double()),
              ref)
        check(f"lora-dora(1,in) {o}x{i} comfy == formula(col norm)", formula_delta(lc, w0, convention="comfy"),
              ref)
        lyc = expected_delta(pd, w0, multiplier=0.5)
        check(f"peft-dora {o}x{i} x0.5 lycoris == formula(lycoris)", lyc, formula_delta(pd, w0, multiplier=0.5))
        check(f"peft-dora {o}x{i} x0.5 lycoris forward(I) == formula(lycoris)",
              _forward_identity_delta(pd, w0.double(), 0.5), lyc)
        check(f"peft-dora {o}x{i} x0.5 peft == formula(peft)", expected_delta(pd, w0, library="peft",
              multiplier=0.5), formula_delta(pd, w0, convention="peft", multiplier=0.5))
        check(f"peft-dora {o}x{i} x0.5 lycoris != peft (strength semantics)", lyc,
              expected_delta(pd, w0, library="peft", multiplier=0.5), equal=False)
        for kind, kd in (("dokr", random_lokr(o, i, rank=4, alpha=2.0, seed=8, dora_base_weight=w0)),
                         ("doha", random_loha(o, i, rank=4, alpha=2.0, seed=8, dora_base_weight=w0))):
            check(f"{kind} {o}x{i} lycoris == formula", expected_delta(kd, w0), formula_delta(kd, w0))
            check(f"{kind} {o}x{i} lycoris forward(I) == formula", _forward_identity_delta(kd, w0.double()),
                  formula_delta(kd, w0))
        fd = random_full_diff(o, i, seed=9)
        check(f"full {o}x{i} lycoris == diff", expected_delta(fd), _d(fd.diff))
        check(f"full {o}x{i} lycoris bias == diff_b", expected_bias_delta(fd), _d(fd.diff_b))

    # Documented disagreements.
    spec = random_lokr(256, 256, layout="both_full", alpha=4.0, seed=1)  # nominal r = 16
    check("lokr both_full alpha=4 r=16: peft (alpha/r) != lycoris (scale 1)", expected_delta(spec, library="peft"),
          expected_delta(spec), equal=False)
    check("lokr both_full alpha=4 r=16: lycoris == plain kron (alpha ignored)", expected_delta(spec),
          formula_delta(spec))
    spec = random_lokr(256, 256, rank=4, alpha=2.0, seed=2)
    mod = _lycoris_module(spec, _linear(spec.shape, None), 1.0)
    with torch.no_grad():
        check("lycoris LokrModule.get_diff_weight == (alpha/r)^2 kron (scale applied twice)",
              mod.get_diff_weight()[0].double(), formula_delta(spec) * (2.0 / 4))
    spec = random_loha(256, 256, rank=4, alpha=2.0, seed=2)
    mod = _lycoris_module(spec, _linear(spec.shape, None), 1.0)
    with torch.no_grad():
        check("lycoris LohaModule.get_diff_weight == (alpha/r)^2 hada (scale applied twice)",
              mod.get_diff_weight()[0].double(), formula_delta(spec) * (2.0 / 4))

    w0 = random_base_weight(128, 256, seed=1).double()
    for precise in (False, True):
        spec = random_lokr(128, 256, rank=4, alpha=2.0, seed=4)
        lin = _linear(spec.shape, w0)
        _lycoris_module(spec, lin, 1.0).merge_to(1.0, precise=precise)
        check(f"lycoris LokrModule.merge_to(precise={precise}) == (alpha/r)^2 kron (scale applied twice)",
              lin.weight.detach().double() - w0, formula_delta(spec) * (2.0 / 4))
    spec = random_lora_dora(128, 256, rank=4, alpha=2.0, base_weight=w0, seed=4)
    lin = _linear(spec.shape, w0)
    _lycoris_module(spec, lin, 1.0).merge_to(1.0, precise=True)
    check("lycoris LoConModule.merge_to(precise=True) == plain LoRA (DoRA dropped)",
          lin.weight.detach().double() - w0, _d(spec.lora_up) @ _d(spec.lora_down) * (2.0 / 4))

    # Real layer shapes (Qwen-Image 3072 / 12288, Z-Image 3840 / 10240), bf16 factors.
    for (o, i) in [(3072, 3072), (12288, 3072), (3072, 12288), (3840, 10240), (10240, 3840)]:
        spec = random_lokr(o, i, rank=8, alpha=4.0, seed=11, dtype=torch.bfloat16)
        check(f"lokr {o}x{i} lycoris == peft", expected_delta(spec), expected_delta(spec, library="peft"))
        check(f"lokr {o}x{i} lycoris == formula", expected_delta(spec), formula_delta(spec))

    # Files written per school, read back by the libraries' own loaders.
    names = {"transformer_blocks.0.attn.to_q": (256, 256), "transformer_blocks.0.img_mlp.net.2": (128, 512)}
    _check_lycoris_saved_names(names, verbose)
    w0s = {n: random_base_weight(*s, seed=k) for k, (n, s) in enumerate(names.items())}
    bf = torch.bfloat16
    makers = {
        "lokr": lambda n, s, k: random_lokr(*s, rank=4, alpha=2.0, seed=k, dtype=bf),
        "lokr-both-lowrank": lambda n, s, k: random_lokr(*s, layout="both_lowrank", rank=2, alpha=1.0, seed=k,
                                                         dtype=bf),
        "lokr-both-full": lambda n, s, k: random_lokr(*s, layout="both_full", seed=k, dtype=bf),
        "loha": lambda n, s, k: random_loha(*s, rank=4, alpha=3.0, seed=k, dtype=bf),
        "full": lambda n, s, k: random_full_diff(*s, bias=False, seed=k),
        "lora-dora": lambda n, s, k: random_lora_dora(*s, rank=4, alpha=2.0, base_weight=w0s[n], seed=k, dtype=bf),
        "peft-dora": lambda n, s, k: random_peft_dora(*s, rank=4, alpha=4.0, base_weight=w0s[n], seed=k, dtype=bf),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for kind, make in makers.items():
            mods = {n: make(n, s, k) for k, (n, s) in enumerate(names.items())}
            for school in ("lycoris-prefix", "lycoris-kohya", "peft"):
                if kind == "peft-dora" and school != "peft":
                    continue
                p = Path(tmp) / f"{kind}-{school}.safetensors"
                try:
                    write_adapter_file(p, mods, school)
                except UnrepresentableError as exc:
                    skip(f"file {school} {kind}", exc)
                    continue
                got = (peft_deltas_from_file if school == "peft" else lycoris_deltas_from_file)(p, names, w0s)
                for n, spec in mods.items():
                    lib = "peft" if school == "peft" else "lycoris"
                    check(f"file {school:14s} {kind:17s} {n}: {lib} loader == expected_delta", got[n],
                          expected_delta(spec, w0s[n] if _needs_base(spec) else None, library=lib))
        # ai-toolkit Z-Image LoKr: alpha = 9999999999 in the save dtype (inf in fp16), ignored (scale 1).
        zi = {"layers.0.attention.to_q": (256, 256), "layers.0.feed_forward.w1": (512, 128)}
        for dtype in (torch.bfloat16, torch.float16):
            mods = {n: random_lokr(*s, layout="both_full", seed=k, dtype=dtype) for k, (n, s) in enumerate(zi.items())}
            p = Path(tmp) / f"aitk-{dtype}.safetensors"
            sd = write_adapter_file(p, mods, "ai-toolkit-zimage-lokr")
            for n, spec in mods.items():
                stored = float(sd[f"diffusion_model.{n}.alpha"])
                check(f"ai-toolkit {str(dtype)[6:]} {n} alpha={stored:.6g}: lycoris == kron",
                      expected_delta(replace(spec, alpha=stored)), formula_delta(spec))
    return results


if __name__ == "__main__":
    res = selfcheck()
    print(f"{len(res)} checks passed")

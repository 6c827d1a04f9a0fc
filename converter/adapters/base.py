"""Adapter types: what one LoRA-file module contributes to one layer, one class per type (as PEFT's layer
variants own `get_delta_weight`).

An adapter type declares the key suffixes it owns (`key_patterns`) and which parts mark a module as its
own (`signature`); a module of a LoRA file is split into adapters by `claim`. Each adapter gives a layer
kind what it needs: exact low-rank `factors()` when the update is low-rank by construction (`rank` is
then its exact rank), a dense `delta()` otherwise (or always), or a `bias_delta()`.

To add an adapter type: a module here with one `Adapter` subclass, imported by `__init__`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import MergeError, UnsupportedFormat

if TYPE_CHECKING:
    import torch

    from ..factors import Factors
    from ..lorafile import LoraFile

ADAPTERS: dict[str, type[Adapter]] = {}


@dataclass(frozen=True)
class KeyPattern:
    """A key suffix after the module name. `part`: the part it gives (None: from the regex group `p`, mapped
    through `part_names`); `style`: how the key is spelled, for the report's format line."""

    suffix: str
    part: str | None
    style: str
    part_names: tuple[tuple[str, str], ...] = ()

    def match(self, key: str) -> tuple[str, str, str | None] | None:
        """(module, part, PEFT adapter name or None) if `key` ends with this suffix."""
        m = re.match(r"^(?P<m>.+)\." + self.suffix + "$", key)
        if not m:
            return None
        part = self.part or dict(self.part_names)[m.group("p")]
        return m.group("m"), part, m.groupdict().get("ad")


def prefixed_parts(prefix: str, names: tuple[str, ...], style: str) -> tuple[tuple[KeyPattern, ...], frozenset[str]]:
    """(key patterns, signature) of a type whose parts are named `prefix + name` (LyCORIS' lokr_*, hada_*)."""
    pat = KeyPattern(prefix + "(?P<p>" + "|".join(names) + ")", None, style, tuple((n, prefix + n) for n in names))
    return (pat,), frozenset(prefix + n for n in names)


ALPHA = KeyPattern(r"(?:alpha|lora_alpha)", "alpha", "alpha")
# a PEFT adapter name between the part and `.weight`/`.bias`: `default`, or DiffSynth-Studio's doubled
# `default_0.default` (one name of two segments; never the `weight`/`bias` that ends the key)
ADAPTER_NAME = r"(?:\.(?P<ad>[^.]+(?:\.(?!(?:weight|bias)$)[^.]+)?))?"


class Adapter:
    """One module's update of one type. Subclasses register with `class X(Adapter, name="...")`; `order`
    decides which type claims a module first (a DoRA module is also a LoRA module: DoRA goes first)."""

    name: ClassVar[str]
    title: ClassVar[str]
    key_patterns: ClassVar[tuple[KeyPattern, ...]] = ()
    signature: ClassVar[frozenset[str]] = frozenset()  # any of these parts marks a module as this type
    parts: ClassVar[frozenset[str]]  # every part the type takes (default: the signature and alpha)
    order: ClassVar[int] = 100
    applies_to: ClassVar[str] = "weight"  # or "bias"
    wraps: ClassVar[bool] = False  # modifies the module's weight update (DoRA), attached with `wrap`
    linear: ClassVar[bool] = True  # ΔW scales with strength: copies at s1 and s2 are one at s1 + s2 (DoRA: not)

    def wrap(self, inner: Adapter) -> None:  # pragma: no cover - interface of wrapping types
        raise NotImplementedError

    def __init_subclass__(cls, name: str = "", **kw):
        super().__init_subclass__(**kw)
        if "parts" not in cls.__dict__:  # by default a type takes its own parts and the module's alpha
            cls.parts = cls.signature | {"alpha"}
        if name:
            if name in ADAPTERS:
                raise RuntimeError(f"adapter {name!r} registered twice")
            cls.name = name
            ADAPTERS[name] = cls

    def __init__(self, lf: LoraFile, module: str, keys: dict[str, str]):
        self.lf, self.module, self.keys = lf, module, keys
        self.strength = lf.strength  # a wrapping adapter (DoRA) may set its inner update's own

    def set_strength(self, strength: float) -> None:
        """Merge at another strength (copies of one file folded into one); a scale cached for the old one goes."""
        self.strength = strength
        self.__dict__.pop("scale", None)

    # -- what the planner asks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise a MergeError (one clear line) if the module's tensors are inconsistent."""

    @property
    def shape(self) -> tuple[int, ...]:  # pragma: no cover - interface
        """Shape of the update: (out, in) for a weight, (out,) for a bias or a 1-D parameter."""
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        """Exact rank of `factors()` when the update is low-rank by construction, else None."""
        return None

    def down_identity(self) -> bytes | None:
        """Bytes that identify the down factor (equal bytes: members may share one set of columns)."""
        return None

    # -- what the layer kinds ask --------------------------------------------------------------------------
    def factors(self) -> Factors:  # pragma: no cover - interface
        """(down (r, I), up (O, r)) fp32, scale included; only when `rank` is not None."""
        raise NotImplementedError

    def factors_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(down, up) built straight in `dtype`, each value rounded once from the exact factors, when the stored
        tensors allow it without fp32 temporaries; None: use `factors()`."""
        return None

    @property
    def factors_exact_in_storage(self) -> bool:
        """Whether `factors_in` stores the exact factors (nothing rounded)."""
        return False

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW fp32 in the LoRA's row order (`base`: the layer's current weight, for types that need it)."""
        return self.factors().dense()

    needs_base: ClassVar[bool] = False  # delta() needs the base weight (DoRA)

    # -- helpers -------------------------------------------------------------------------------------------
    def tensor(self, part: str) -> torch.Tensor:
        return self.lf.ckpt.get(self.keys[part])

    def part_shape(self, part: str) -> tuple[int, ...]:
        return self.lf.ckpt.tensors[self.keys[part]].shape

    def alpha(self) -> float | None:
        """The module's alpha: its `alpha` tensor, else the file's PEFT config (LoRA's lora_alpha, LoKr/LoHa's
        alpha, per-module patterns included), else None."""
        key = self.keys.get("alpha")
        if key is None:
            return self.lf.peft.alpha_for(self.module, lora=self.uses_lora_alpha) if self.lf.peft else None
        if math.prod(self.lf.ckpt.tensors[key].shape) != 1:
            raise MergeError(f"{self.lf.name}: alpha {key} is not a scalar")
        value = self.lf.ckpt.scalar(key)
        if not math.isfinite(value):
            raise MergeError(f"{self.lf.name}: alpha {key} is {value}, not a finite number")
        return value

    uses_lora_alpha: ClassVar[bool] = True  # PEFT names a LoRA's alpha `lora_alpha`, LoKr's / LoHa's `alpha`

    def refuse_empty(self) -> None:
        """A factor with a zero dimension (rank 0) is an update that does nothing: a malformed file."""
        empty = sorted(p for p in self.keys if p != "alpha" and 0 in self.part_shape(p))
        if empty:
            raise self.fail(f"has empty factors {empty} (rank 0)")

    def refuse_tucker(self, *parts: str) -> None:
        """LyCORIS writes Tucker cores only for convolutions: refuse them on a linear layer."""
        found = [p for p in parts if p in self.keys]
        if found:
            raise UnsupportedFormat(f"{self.lf.name}: module {self.module} has a Tucker core ({'/'.join(found)}), "
                                    "which LyCORIS only makes for convolutions; this layer is linear")

    def fail(self, what: str) -> MergeError:
        return MergeError(f"{self.lf.name}: module {self.module} {what}")


def lycoris_scale(a: Adapter, r: int | None, peft_rank: int | None) -> float:
    """alpha / r as LyCORIS (and kohya, ai-toolkit, ComfyUI) define it for LoKr / LoHa: no low-rank factor
    (r None) -> 1; alpha absent or 0 -> alpha = r. A PEFT file (no alpha tensor, a PEFT config) uses its config's
    alpha / r, in every layout (PEFT's own rule)."""
    if "alpha" not in a.keys and a.lf.peft is not None and a.lf.peft.alpha is not None:
        rank = a.lf.peft.rank_for(a.module) or peft_rank
        return a.lf.peft.alpha_for(a.module, lora=False) / rank if rank else 1.0
    if r is None:  # no low-rank factor: whatever alpha says (ai-toolkit: 9999999999, inf in fp16)
        return 1.0
    alpha = a.alpha() if "alpha" in a.keys else None
    return alpha / r if alpha else 1.0


def key_patterns() -> list[tuple[KeyPattern, type[Adapter] | None]]:
    """Every registered suffix, most specific first (a `.diff_b` must not be read as `.diff`)."""
    pats = [(p, cls) for cls in sorted(ADAPTERS.values(), key=lambda c: c.order) for p in cls.key_patterns]
    return pats + [(ALPHA, None)]


def claim(lf: LoraFile, module: str, keys: dict[str, str]) -> tuple[list[Adapter], dict[str, str]]:
    """Split one module's parts into adapters; returns them and the parts no type took. A wrapping type (DoRA)
    takes the module's weight update inside it."""
    left = dict(keys)
    found: list[Adapter] = []
    for cls in sorted(ADAPTERS.values(), key=lambda c: c.order):
        if not cls.signature & left.keys():
            continue
        mine = {p: k for p, k in left.items() if p in cls.parts}
        for p in mine:
            del left[p]
        a = cls(lf, module, mine)
        if cls.wraps:
            inner = [b for b in found if b.applies_to == "weight"]
            if len(inner) != 1:
                raise a.fail(f"has a {cls.title} magnitude but {'no' if not inner else 'several'} weight updates "
                             "(lora_A/B, lokr_*, hada_*) to apply it to")
            found.remove(inner[0])
            a.wrap(inner[0])
        a.validate()
        found.append(a)
    return found, left

"""LyCORIS LoHa: ΔW = scale · (W1a·W1b) ⊙ (W2a·W2b), scale = alpha / r with r the rank of W1 (alpha absent or 0
means alpha = r; PEFT files: alpha / r from their config).

Low-rank by construction: the Hadamard product of two rank-r matrices has the row-wise Khatri–Rao factors
up[o, i·r2+j] = W1a[o,i]·W2a[o,j] and down[i·r2+j, k] = W1b[i,k]·W2b[j,k], of rank r1·r2, exactly."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from .base import Adapter, lycoris_scale, prefixed_parts

if TYPE_CHECKING:
    import torch

    from ..factors import Factors

_PARTS = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")


class Loha(Adapter, name="loha"):
    title = "LoHa"
    key_patterns, signature = prefixed_parts("hada_", _PARTS, "loha")

    def validate(self) -> None:
        self.refuse_empty()
        self.refuse_tucker("hada_t1", "hada_t2")
        missing = [p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if p not in self.keys]
        if missing:
            raise self.fail(f"has no {', '.join(missing)} tensor")
        s = {p: tuple(self.part_shape(p)) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        if any(len(v) != 2 for v in s.values()) or s["hada_w1_a"][1] != s["hada_w1_b"][0] or \
                s["hada_w2_a"][1] != s["hada_w2_b"][0] or s["hada_w1_a"][0] != s["hada_w2_a"][0] or \
                s["hada_w1_b"][1] != s["hada_w2_b"][1]:
            raise self.fail(f"has inconsistent factor shapes {s}")

    @property
    def rank(self) -> int:
        return self.part_shape("hada_w1_b")[0] * self.part_shape("hada_w2_b")[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.part_shape("hada_w1_a")[0], self.part_shape("hada_w1_b")[1]

    @cached_property
    def scale(self) -> float:
        r = self.part_shape("hada_w1_b")[0]
        return self.strength * lycoris_scale(self, r, peft_rank=r)

    def factors(self) -> Factors:
        from ..factors import Factors

        w1a, w1b, w2a, w2b = (self.tensor(p).float() for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
        down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
        return Factors(down * self.scale, up)

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (self.tensor(p).float() for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        return (w1a @ w1b) * (w2a @ w2b) * self.scale

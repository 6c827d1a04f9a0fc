"""Full-weight delta (`.diff`): ΔW = strength·diff, a dense update (of a matrix, or of a 1-D parameter such
as a norm weight)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Adapter, KeyPattern

if TYPE_CHECKING:
    import torch


class FullDiff(Adapter, name="diff"):
    title = "full diff"
    key_patterns = (KeyPattern(r"diff", "diff", "diff"),)
    signature = parts = frozenset({"diff"})
    order = 80

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.part_shape("diff"))

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        return self.tensor("diff").float() * self.strength

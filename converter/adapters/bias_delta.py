"""Bias delta (`.diff_b`, or a bias on `lora_B`/`lora_up`): Δb = strength·diff_b."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ADAPTER_NAME, Adapter, KeyPattern

if TYPE_CHECKING:
    import torch


class BiasDelta(Adapter, name="diff_b"):
    title = "bias delta"
    key_patterns = (KeyPattern(r"diff_b", "diff_b", "diff"),
                    KeyPattern(r"lora_(?:B|up)" + ADAPTER_NAME + r"\.bias", "diff_b", "diff"))
    signature = parts = frozenset({"diff_b"})
    order = 70
    applies_to = "bias"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.part_shape("diff_b"))

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        return self.tensor("diff_b").float() * self.strength

"""LyCORIS LoKr: ΔW = scale · kron(W1, W2), each factor full (`lokr_w1`, `lokr_w2`) or low-rank
(`lokr_w1_a`·`lokr_w1_b`, `lokr_w2_a`·`lokr_w2_b`). Scale as LyCORIS defines it: alpha / r with r the rank of
the low-rank factor (w1's if it has one, else w2's); alpha absent or 0 means alpha = r; both factors full means
scale 1 whatever alpha says (ai-toolkit stores 9999999999, inf in fp16). PEFT files carry no alpha tensor: their
config (`lora_adapter_metadata`) gives alpha / r, which PEFT applies in every layout.

Low-rank by construction: kron(U1·V1, U2·V2) = kron(U1, U2) · kron(V1, V2), so its exact factors have rank
rank(W1)·rank(W2) (a full factor counts its smaller side)."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from .base import Adapter, lycoris_scale, prefixed_parts

if TYPE_CHECKING:
    import torch

    from ..factors import Factors

_PARTS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")


class Lokr(Adapter, name="lokr"):
    title = "LoKr"
    key_patterns, signature = prefixed_parts("lokr_", _PARTS, "lokr")

    def validate(self) -> None:
        self.refuse_empty()
        self.refuse_tucker("lokr_t2")
        flat = sorted(p for p in self.keys if p != "alpha" and len(self.part_shape(p)) != 2)
        if flat:
            raise self.fail(f"has factors that are not matrices: {', '.join(f'{p} {self.part_shape(p)}' for p in flat)}")
        for i in ("1", "2"):
            full, a, b = (f"lokr_w{i}{s}" in self.keys for s in ("", "_a", "_b"))
            if full == (a or b) or a != b:
                raise self.fail(f"needs lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b, has "
                                f"{sorted(k for k in self.keys if k.startswith(f'lokr_w{i}'))}")
            if a and self.part_shape(f"lokr_w{i}_a")[1] != self.part_shape(f"lokr_w{i}_b")[0]:
                raise self.fail(f"has lokr_w{i}_a {self.part_shape(f'lokr_w{i}_a')} and lokr_w{i}_b "
                                f"{self.part_shape(f'lokr_w{i}_b')}: inconsistent factor shapes")
        if any(len(self._factor_shape(i)) != 2 for i in ("1", "2")):
            raise self.fail("has factors that are not matrices")

    def _factor_shape(self, i: str) -> tuple[int, ...]:
        if f"lokr_w{i}" in self.keys:
            return tuple(self.part_shape(f"lokr_w{i}"))
        return self.part_shape(f"lokr_w{i}_a")[0], self.part_shape(f"lokr_w{i}_b")[-1]

    def _factor_rank(self, i: str) -> int:
        if f"lokr_w{i}" in self.keys:
            return min(self._factor_shape(i))
        return self.part_shape(f"lokr_w{i}_b")[0]

    @property
    def shape(self) -> tuple[int, int]:
        (a, b), (c, d) = self._factor_shape("1"), self._factor_shape("2")
        return a * c, b * d

    @property
    def rank(self) -> int:
        return self._factor_rank("1") * self._factor_rank("2")

    @cached_property
    def scale(self) -> float:
        return self.strength * lycoris_scale(self, self._lowrank_dim(), peft_rank=self._lowrank_dim())

    def _lowrank_dim(self) -> int | None:
        return next((self.part_shape(f"lokr_w{i}_a")[1] for i in ("1", "2") if f"lokr_w{i}_a" in self.keys), None)

    def _pair(self, i: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with W_i = U·V, fp32; a full factor is paired with an identity on its smaller side."""
        import torch

        if f"lokr_w{i}" not in self.keys:
            return self.tensor(f"lokr_w{i}_a").float(), self.tensor(f"lokr_w{i}_b").float()
        w = self.tensor(f"lokr_w{i}").float()
        a, b = w.shape
        return (torch.eye(a), w) if a <= b else (w, torch.eye(b))

    def factors(self) -> Factors:
        import torch

        from ..factors import Factors

        (u1, v1), (u2, v2) = self._pair("1"), self._pair("2")
        return Factors(torch.kron(v1, v2) * self.scale, torch.kron(u1, u2))

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        w = [self.tensor(f"lokr_w{i}").float() if f"lokr_w{i}" in self.keys
             else self.tensor(f"lokr_w{i}_a").float() @ self.tensor(f"lokr_w{i}_b").float() for i in ("1", "2")]
        return torch.kron(w[0], w[1]) * self.scale

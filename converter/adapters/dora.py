"""DoRA: a LoRA whose merged weight is re-normalised, W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, with the norm per
output row (PEFT's `lora_magnitude_vector` (O,), LyCORIS's `dora_scale` (O, 1)) or per input column
(LyCORIS `dora_scale` (1, I), `wd_on_out=False`). The update a merge applies is ΔW = strength·(W' − W):
it needs the base weight and is not low-rank (a row or column scaling of W), so dense layers take it
exactly and 4-bit layers by truncated SVD."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import KeyPattern
from .lora import Lora

if TYPE_CHECKING:
    import torch

EPS = 1e-6  # LyCORIS and ComfyUI add this to the norm; PEFT does not (a 1e-6 shift of a norm ~1 is ~1e-6)


class Dora(Lora, name="dora"):
    title = "DoRA"
    key_patterns = (KeyPattern(r"dora_scale", "magnitude", "dora"),
                    KeyPattern(r"lora_magnitude_vector(?:\.(?P<ad>[^.]+))?(?:\.weight)?", "magnitude", "dora"))
    signature = frozenset({"magnitude"})
    parts = frozenset({"A", "B", "alpha", "magnitude"})
    order = 40  # before plain LoRA: a DoRA module is a LoRA module with a magnitude
    needs_base = True

    def validate(self) -> None:
        super().validate()
        out, inp = self.shape
        m = tuple(self.part_shape("magnitude"))
        if m not in ((out,), (out, 1), (1, inp)):
            raise self.fail(f"has a DoRA magnitude of shape {m}; a {out}x{inp} layer needs ({out},), ({out}, 1) "
                            f"or (1, {inp})")

    @property
    def rank(self) -> None:
        return None  # W' − W rescales the whole base weight: not low-rank

    @property
    def per_row(self) -> bool:
        """Norm per output row (PEFT; LyCORIS wd_on_out), else per input column."""
        return tuple(self.part_shape("magnitude")) != (1, self.shape[1]) or self.shape[0] == 1

    def down_identity(self) -> None:
        return None

    def factors_in(self, dtype):
        return None

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise RuntimeError("DoRA needs the base weight")  # the layer kinds pass it (needs_base)
        lora = self.tensor("B").float() @ (self.tensor("A").float() * self.lora_scale)
        merged = base.float() + lora
        m = self.tensor("magnitude").float()
        if self.per_row:
            norm = merged.norm(dim=1, keepdim=True) + EPS
            m = m.reshape(-1, 1)
        else:
            norm = merged.norm(dim=0, keepdim=True) + EPS
            m = m.reshape(1, -1)
        return self.lf.strength * (merged * (m / norm) - base.float())

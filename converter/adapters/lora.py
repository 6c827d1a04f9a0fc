"""Plain LoRA: ΔW = scale·B·A with scale = strength·alpha/rank (rank = rows of this module's own A; alpha
absent: alpha/rank = 1; rsLoRA: alpha/√rank), as PEFT's `get_delta_weight` defines it."""

from __future__ import annotations

import math
from functools import cached_property

from typing import TYPE_CHECKING

from ..errors import UnsupportedFormat
from .base import ADAPTER_NAME, Adapter, KeyPattern

if TYPE_CHECKING:
    import torch

    from ..factors import Factors

_AB = (("A", "A"), ("B", "B"), ("down", "A"), ("up", "B"))


class Lora(Adapter, name="lora"):
    title = "LoRA"
    key_patterns = (
        KeyPattern(r"lora_(?P<p>A|B)" + ADAPTER_NAME + r"\.weight", None, "A/B", _AB),
        KeyPattern(r"lora_(?P<p>down|up)" + ADAPTER_NAME + r"\.weight", None, "down/up", _AB),
        KeyPattern(r"lora\.(?P<p>down|up)\.weight", None, "down/up", _AB),
        KeyPattern(r"lora_linear_layer\.(?P<p>down|up)\.weight", None, "down/up", _AB),
    )
    signature = frozenset({"A", "B"})
    order = 50

    def validate(self) -> None:
        if "A" not in self.keys or "B" not in self.keys:
            raise self.fail(f"has no {'lora_B/lora_up' if 'A' in self.keys else 'lora_A/lora_down'} tensor")
        a, b = self.part_shape("A"), self.part_shape("B")
        if len(a) != 2 or len(b) != 2:
            raise UnsupportedFormat(f"{self.lf.name}: module {self.module} has non-matrix LoRA weights {a} / {b} "
                                    "(convolution LoRAs are not supported)")
        if a[0] != b[1]:
            raise self.fail(f"has lora_A rank {a[0]} but lora_B rank {b[1]}")
        if a[0] == 0:
            raise self.fail("has rank 0 (empty lora_A / lora_B): an update that does nothing")

    @property
    def shape(self) -> tuple[int, int]:
        return self.part_shape("B")[0], self.part_shape("A")[1]

    @property
    def rank(self) -> int:
        return self.part_shape("A")[0]

    @cached_property
    def lora_scale(self) -> float:
        """alpha/rank (alpha/√rank with rsLoRA); 1 without alpha."""
        alpha = self.alpha()
        if alpha is None:
            return 1.0
        rslora = self.lf.peft is not None and self.lf.peft.rslora
        return alpha / (math.sqrt(self.rank) if rslora else self.rank)

    @property
    def scale(self) -> float:
        return self.strength * self.lora_scale

    def down_identity(self) -> bytes:
        # bit-identical A (stricter than ==, which would also pair +0.0 with -0.0), with its dtype and scale
        info = self.lf.ckpt.tensors[self.keys["A"]]
        return repr((info.dtype, info.shape, self.scale)).encode() + bytes(self.lf.ckpt.read_bytes(self.keys["A"]))

    def factors_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """scale·A rounded once to `dtype` (as the fp32 route rounds it) and B as stored, when both are stored
        in `dtype`."""
        ck = self.lf.ckpt
        if any(ck.tensors[self.keys[p]].torch_dtype != dtype for p in ("A", "B")):
            return None
        a, scale = self.tensor("A"), self.scale
        return (a if scale == 1.0 else a * scale), self.tensor("B")

    @property
    def factors_exact_in_storage(self) -> bool:
        return self.scale == 1.0

    def factors(self) -> Factors:
        from ..factors import Factors

        return Factors(self.tensor("A").float() * self.scale, self.tensor("B").float())

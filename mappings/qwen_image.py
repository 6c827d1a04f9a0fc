"""Qwen-Image / Qwen-Image-Edit (and their Lightning variants): `NunchakuQwenImageTransformer2DModel`.

Checkpoint layers keep diffusers names, except that q/k/v are fused: `attn.to_qkv` = [to_q; to_k; to_v] and
`attn.add_qkv_proj` = [add_q_proj; add_k_proj; add_v_proj] (plain row concatenation, no head permutation).
`img_mod.1` / `txt_mod.1` are AWQ W4A16 with output rows interleaved: checkpoint row d*6+k = diffusers row k*D+d.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from converter.layout import Family, Layer, Segment, split_rows, whole

if TYPE_CHECKING:
    import torch

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
MOD_SPLITS = 6  # shift, scale, gate of the attention and of the MLP
QKV = ("q", "k", "v")


class ModulationInterleave:
    """Rows of `img_mod.1` / `txt_mod.1`: diffusers row k*D+d is stored as row d*splits+k (deepcompressor's
    conversion), and Nunchaku's block de-interleaves the output right after the layer."""

    def __init__(self, splits: int = MOD_SPLITS):
        self.splits = splits

    def to_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        d = t.shape[0] // self.splits
        return t.reshape(self.splits, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def to_lora(self, t: torch.Tensor) -> torch.Tensor:
        d = t.shape[0] // self.splits
        return t.reshape(d, self.splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


class QwenImage(Family):
    name = "qwen-image"
    title = "Qwen-Image"
    model_class = "NunchakuQwenImageTransformer2DModel"
    signatures = (r"^transformer_blocks[._]\d+[._](attn|img_mlp|txt_mlp|img_mod|txt_mod)", r"^(img_in|txt_in|proj_out)$")
    # timestep embedder that produces the modulation layers' input (see converter.modulation)
    timestep_keys = {
        "linear_1": "time_text_embed.timestep_embedder.linear_1",
        "linear_2": "time_text_embed.timestep_embedder.linear_2",
        "addition_t_embedding": "time_text_embed.addition_t_embedding.weight",
    }

    def matches(self, metadata, tensors) -> bool:
        return metadata.get("model_class") == self.model_class or "transformer_blocks.0.attn.to_qkv.qweight" in tensors

    def row_order(self, prefix: str) -> ModulationInterleave | None:
        if prefix.endswith((".img_mod.1", ".txt_mod.1")) and _BLOCK.match(prefix):
            return ModulationInterleave()
        return None

    def smoothing_producers(self, prefix: str, layers) -> list[Segment] | None:
        """Attention outputs: their input is the attention of the V rows of both streams' fused q/k/v (joint
        attention mixes them), so deepcompressor folds the smoothing into those V rows."""
        if not prefix.endswith((".attn.to_out.0", ".attn.to_add_out")):
            return None
        attn = prefix.rsplit(".attn.", 1)[0] + ".attn."
        out = []
        for fused in ("to_qkv", "add_qkv_proj"):
            layer = layers.get(attn + fused)
            if layer is None:
                return None
            d = layer.out_features // 3
            out.append(Segment(layer.prefix, 2 * d, 0, d, "v"))
        return out

    def lora_targets(self, layers: dict[str, Layer]) -> dict[str, list[Segment]]:
        targets = {p: whole(l) for p, l in layers.items()}
        for p, l in layers.items():
            if p.endswith(".attn.to_qkv"):
                base = p[: -len("to_qkv")]
                for c, segs in split_rows(l, QKV).items():
                    targets[f"{base}to_{c}"] = segs
            elif p.endswith(".attn.add_qkv_proj"):
                base = p[: -len("add_qkv_proj")]
                for c, segs in split_rows(l, QKV).items():
                    targets[f"{base}add_{c}_proj"] = segs
            elif p.endswith(".attn.to_out.0"):
                targets.setdefault(p[:-2], whole(l))  # `attn.to_out` (no `.0`) seen in some trainers
        return targets


FAMILY = QwenImage()

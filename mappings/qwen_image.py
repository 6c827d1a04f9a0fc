"""Qwen-Image / Qwen-Image-Edit (and their Lightning variants): `NunchakuQwenImageTransformer2DModel`.

Checkpoint layers keep diffusers names, except that q/k/v are fused: `attn.to_qkv` = [to_q; to_k; to_v] and
`attn.add_qkv_proj` = [add_q_proj; add_k_proj; add_v_proj] (plain row concatenation, no head permutation).
`img_mod.1` / `txt_mod.1` are AWQ W4A16 with output rows interleaved: checkpoint row d*6+k = diffusers row k*D+d.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from converter.layout import Family, Layer, Segment, fused_modules, whole
from converter.layout import DiffusersPart, Layout

if TYPE_CHECKING:
    import torch

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
MOD_SPLITS = 6  # shift, scale, gate of the attention and of the MLP
# Nunchaku's int4 kernel adds SHIFT_GELU to the GELU output feeding `*_mlp.net.2` before quantizing it (unsigned
# activations); deepcompressor's conversion cancelled the shift in that layer's bias (see activation_shift)
SHIFT_GELU = 0.171875
# the fused q/k/v layers and the modules their rows are, in order: (component, module name in the block), the names
# LoRAs and diffusers' QwenImageTransformer2DModel both use
FUSED_QKV = {".attn.to_qkv": (("q", "attn.to_q"), ("k", "attn.to_k"), ("v", "attn.to_v")),
             ".attn.add_qkv_proj": (("q", "attn.add_q_proj"), ("k", "attn.add_k_proj"), ("v", "attn.add_v_proj"))}


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

    # diffusers' QwenImageTransformer2DModel (transformer_qwenimage.py): its __init__ arguments
    diffusers_class = "QwenImageTransformer2DModel"
    diffusers_config_keys = frozenset({
        "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "guidance_embeds", "axes_dims_rope", "zero_cond_t", "use_additional_t_cond",
        "use_layer3d_rope"})

    def diffusers_parts(self, layer: Layer) -> list[DiffusersPart]:
        """diffusers' attention calls to_q/to_k/to_v (add_q/k/v_proj) separately: the fused rows split in thirds."""
        fused = fused_modules(layer, FUSED_QKV)
        if fused is not None:
            return [DiffusersPart.of(name, segments) for name, segments in fused.items()]
        return [DiffusersPart(layer.prefix, 0, layer.out_features)]

    def activation_shift(self, layer: Layer) -> float:
        """Nunchaku runs `img_mlp.net.2` / `txt_mlp.net.2` on the GELU output + SHIFT_GELU (int4 only: nvfp4 has no
        shift); diffusers' SVDQW4A4Linear quantizes the unshifted input."""
        if layer.layout == Layout.SVDQ_INT4 and layer.prefix.endswith((".img_mlp.net.2", ".txt_mlp.net.2")):
            return SHIFT_GELU
        return 0.0

    def folded_bias(self, layer: Layer) -> tuple[tuple[int, int, float], ...]:
        """deepcompressor folded the +1 of `x * (1 + scale)` into the bias of the two scale chunks (k = 1, 4) of the
        modulation rows, where Nunchaku runs with scale_shift 0; diffusers' block adds the 1 itself."""
        if self.row_order(layer.prefix) is None:
            return ()
        d = layer.out_features // MOD_SPLITS
        return ((d, 2 * d, 1.0), (4 * d, 5 * d, 1.0))

    def row_order(self, prefix: str) -> ModulationInterleave | None:
        if prefix.endswith((".img_mod.1", ".txt_mod.1")) and _BLOCK.match(prefix):
            return ModulationInterleave()
        return None

    def smoothing_producers(self, prefix: str, layers) -> list[Segment] | None:
        """Attention outputs: their input is the attention of the V rows of both streams' fused q/k/v (joint
        attention mixes them), so deepcompressor folds the smoothing into those V rows."""
        if not prefix.endswith((".attn.to_out.0", ".attn.to_add_out")):
            return None
        block = prefix.rsplit(".attn.", 1)[0]
        out = []
        for fused, modules in FUSED_QKV.items():
            layer = layers.get(block + fused)
            if layer is None:
                return None
            out += fused_modules(layer, FUSED_QKV)[f"{block}.{modules[-1][1]}"]  # the V rows
        return out

    def lora_targets(self, layers: dict[str, Layer]) -> dict[str, list[Segment]]:
        targets = {p: whole(l) for p, l in layers.items()}
        for p, l in layers.items():
            fused = fused_modules(l, FUSED_QKV)
            if fused is not None:
                targets.update(fused)
            elif p.endswith(".attn.to_out.0"):
                targets.setdefault(p[:-2], whole(l))  # `attn.to_out` (no `.0`) seen in some trainers
        return targets


FAMILY = QwenImage()

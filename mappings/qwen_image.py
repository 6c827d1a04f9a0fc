"""Qwen-Image / Qwen-Image-Edit (and their Lightning variants): `NunchakuQwenImageTransformer2DModel`.

Checkpoint layers keep diffusers names, except that q/k/v are fused: `attn.to_qkv` = [to_q; to_k; to_v] and
`attn.add_qkv_proj` = [add_q_proj; add_k_proj; add_v_proj] (plain row concatenation, no head permutation).
`img_mod.1` / `txt_mod.1` are AWQ W4A16 with output rows interleaved: checkpoint row d*6+k = diffusers row k*D+d.
"""

from __future__ import annotations

import re

from converter.model import Layer, Segment, split_rows, whole

NAME = "qwen-image"
TITLE = "Qwen-Image"
MODEL_CLASS = "NunchakuQwenImageTransformer2DModel"

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
MOD_SPLITS = 6
QKV = ("q", "k", "v")

# timestep embedder that produces the modulation layers' input (see converter.modulation)
timestep_keys = {
    "linear_1": "time_text_embed.timestep_embedder.linear_1",
    "linear_2": "time_text_embed.timestep_embedder.linear_2",
    "addition_t_embedding": "time_text_embed.addition_t_embedding.weight",
}

SIGNATURES = (r"^transformer_blocks[._]\d+[._](attn|img_mlp|txt_mlp|img_mod|txt_mod)", r"^(img_in|txt_in|proj_out)$")


def matches(metadata: dict[str, str], tensors) -> bool:
    if metadata.get("model_class") == MODEL_CLASS:
        return True
    return "transformer_blocks.0.attn.to_qkv.qweight" in tensors


def modulation_splits(prefix: str) -> int | None:
    return MOD_SPLITS if prefix.endswith((".img_mod.1", ".txt_mod.1")) and _BLOCK.match(prefix) else None


def lora_targets(layers: dict[str, Layer]) -> dict[str, list[Segment]]:
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

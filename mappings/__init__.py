"""Model families: how LoRA module names map onto the layers of a Nunchaku checkpoint.

Each family module is data plus small pure functions: `NAME`, `TITLE`, `matches(metadata, tensors)`,
`lora_targets(layers)` -> {LoRA module name: [Segment, ...]}, `modulation_splits(prefix)` (row interleave of
AWQ modulation layers), `timestep_keys` and `SIGNATURES` (regexes recognising this family's LoRA modules,
used to tell the user that a LoRA was made for another model). Logic lives in `converter.planner`.
"""

from . import qwen_image, z_image

FAMILIES = (qwen_image, z_image)

# LoRA module patterns of families we do not merge into, for clear wrong-family messages.
FOREIGN_SIGNATURES = {
    "Flux": (r"^(double_blocks|single_blocks)[._]\d", r"^(single_)?transformer_blocks[._]\d+[._](ff_context|norm1_context)"),
    "SD/SDXL UNet": (r"^(down_blocks|up_blocks|mid_block|input_blocks|output_blocks)[._]",),
    "Wan video": (r"^blocks[._]\d+[._](self_attn|cross_attn|ffn)",),
    "HunyuanVideo": (r"^(double_blocks|single_blocks)[._]\d+[._](img_attn|linear1)",),
}


def by_name(name: str):
    for f in FAMILIES:
        if f.NAME == name:
            return f
    raise KeyError(name)

"""Model families: how LoRA module names map onto the layers of a Nunchaku checkpoint.

Each family module defines one `converter.layout.Family` subclass (data plus small pure methods) and an
instance `FAMILY`. To add a family: write `mappings/<name>.py`, add its `FAMILY` to `FAMILIES`.
"""

from converter.layout import Family

from . import qwen_image, z_image

FAMILIES: tuple[Family, ...] = (qwen_image.FAMILY, z_image.FAMILY)

# LoRA module patterns of families we do not merge into, for clear wrong-family messages.
FOREIGN_SIGNATURES = {
    "Flux": (r"^(double_blocks|single_blocks)[._]\d", r"^(single_)?transformer_blocks[._]\d+[._](ff_context|norm1_context)"),
    "SD/SDXL UNet": (r"^(down_blocks|up_blocks|mid_block|input_blocks|output_blocks)[._]",),
    "Wan video": (r"^blocks[._]\d+[._](self_attn|cross_attn|ffn)",),
    "HunyuanVideo": (r"^(double_blocks|single_blocks)[._]\d+[._](img_attn|linear1)",),
}


def by_name(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(name)

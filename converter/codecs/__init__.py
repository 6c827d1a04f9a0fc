"""Packed-layout codecs of Nunchaku checkpoints, one module per layout (see base.py for the two registries)."""

from .base import LAYER_CODECS, Codec, LayerCodec, group_dequantize, layer_codec, require  # noqa: F401

# the modules below register themselves on import
from . import awq_w4a16, lowrank, svdq_scales, svdq_weight  # noqa: E402,F401

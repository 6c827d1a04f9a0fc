"""Checkpoint inventory: which layers a Nunchaku checkpoint holds, of which layout and size, and its family.

Everything here comes from the header (names, shapes, dtypes) and the metadata; no tensor is read but the
smoothing vectors (raw bytes, to detect fused smoothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mappings import FAMILIES

from .errors import MergeError, UnknownFamily
from .layers import detect_layer
from .layout import Family, Layer, Layout
from .lorafile import lora_key_example
from .st_reader import Checkpoint


@dataclass
class Model:
    family: Family
    layers: dict[str, Layer]
    precision: str | None  # "int4" | "nvfp4" | None (no quantized layer)
    rank: int  # uniform SVDQ rank (0 if none)
    quant_config: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    fused_smoothing: dict[str, bytes] = field(default_factory=dict)  # SVDQ layer -> raw smooth_factor_orig

    def smoothing_bytes(self, prefix: str) -> bytes:
        return self.fused_smoothing[prefix]


def inventory(ckpt: Checkpoint) -> dict[str, Layer]:
    """Group the checkpoint's tensors into layers: each layer kind tells the layers of its layouts
    (`LayerKind.detect`)."""
    layers: dict[str, Layer] = {}
    for name in ckpt.tensors:
        layer = detect_layer(ckpt.path, ckpt.tensors, name)
        if layer is not None:
            layers[layer.prefix] = layer
    return layers


def parse_quant_config(meta: dict[str, str], path: str = "checkpoint") -> dict:
    raw = meta.get("quantization_config")
    if raw is None:
        return {}
    try:
        qc = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise MergeError(f"{path}: metadata 'quantization_config' is not valid JSON (or nests too deep)") from None
    if not isinstance(qc, dict):
        raise MergeError(f"{path}: metadata 'quantization_config' is not a JSON object")
    return qc


def detect_family(ckpt: Checkpoint, layers: dict[str, Layer]) -> Family:
    for fam in FAMILIES:
        if fam.matches(ckpt.metadata, ckpt.tensors):
            return fam
    example = lora_key_example(ckpt.keys())
    if example is not None and not any(l.layout.is_svdq for l in layers.values()):
        raise UnknownFamily(f"{ckpt.path} is a LoRA file (it holds {example}), not a Nunchaku checkpoint; the base "
                            "checkpoint comes first: qwenlora-merge BASE LORA[:STRENGTH]...")
    svdq = sum(1 for l in layers.values() if l.layout.is_svdq)
    hint = f" ({svdq} SVDQ layers found)" if svdq else " (no Nunchaku SVDQ layer found)"
    raise UnknownFamily(f"{ckpt.path}: not a Nunchaku Qwen-Image or Z-Image-Turbo checkpoint{hint}; "
                        f"model_class={ckpt.metadata.get('model_class', '<none>')}")


def load_model(ckpt: Checkpoint) -> Model:
    layers = inventory(ckpt)
    fam = detect_family(ckpt, layers)
    svdq_layers = [l for l in layers.values() if l.layout.is_svdq]
    ranks = sorted({l.rank for l in svdq_layers})
    if len(ranks) > 1:
        raise MergeError(f"{ckpt.path}: SVDQ layers have different ranks {ranks}; stock loaders need one rank")
    layouts = {l.layout for l in svdq_layers}
    if len(layouts) > 1:
        raise MergeError(f"{ckpt.path}: mixes int4 and nvfp4 SVDQ layers")
    precision = None if not layouts else ("nvfp4" if Layout.SVDQ_NVFP4 in layouts else "int4")
    return Model(fam, layers, precision, ranks[0] if ranks else 0, parse_quant_config(ckpt.metadata, ckpt.path),
                 dict(ckpt.metadata), detect_fused_smoothing(ckpt, svdq_layers))


def detect_fused_smoothing(ckpt: Checkpoint, svdq_layers: list[Layer]) -> dict[str, bytes]:
    """smooth_factor == 1 everywhere while smooth_factor_orig is not: deepcompressor's fuse_when_possible.
    Returns the raw smooth_factor_orig of each such layer (to compare layers that share a producer)."""
    out = {}
    for l in svdq_layers:
        k, ko = l.key("smooth_factor"), l.key("smooth_factor_orig")
        if k not in ckpt or ko not in ckpt:
            continue
        if ckpt.all_equal(k, 1.0) and not ckpt.all_equal(ko, 1.0):
            out[l.prefix] = bytes(ckpt.read_bytes(ko))
    return out

"""Checkpoint inventory: which layers a Nunchaku checkpoint holds, of which kind and size, and its family.

Everything here comes from the header (names, shapes, dtypes) and the metadata; no tensor is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

from .errors import MergeError, UnknownFamily
from .st_io import Checkpoint


class Layout(str, Enum):
    SVDQ_INT4 = "svdq-int4"
    SVDQ_NVFP4 = "svdq-nvfp4"
    AWQ_W4A16 = "awq-w4a16"
    DENSE = "dense"  # plain 16-bit nn.Linear
    VECTOR = "vector"  # a 1-D parameter such as a norm weight

    @property
    def is_svdq(self) -> bool:
        return self in (Layout.SVDQ_INT4, Layout.SVDQ_NVFP4)


@dataclass(frozen=True)
class Layer:
    prefix: str
    layout: Layout
    in_features: int
    out_features: int
    has_bias: bool
    rank: int = 0  # SVDQ low-rank branch width
    dtype: str = "BF16"  # dtype of the 16-bit tensors of this layer

    def key(self, part: str) -> str:
        return f"{self.prefix}.{part}"


@dataclass
class Model:
    family: str  # mapping name, e.g. "qwen-image"
    family_title: str
    layers: dict[str, Layer]
    precision: str | None  # "int4" | "nvfp4" | None (no quantized layer)
    rank: int  # uniform SVDQ rank (0 if none)
    quant_config: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    fused_smoothing: set[str] = field(default_factory=set)  # SVDQ layers with smoothing fused upstream


def inventory(ckpt: Checkpoint) -> dict[str, Layer]:
    """Group the checkpoint's tensors into layers."""
    t = ckpt.tensors
    layers: dict[str, Layer] = {}
    for name, info in t.items():
        prefix, _, part = name.rpartition(".")
        if part == "qweight":
            bias = f"{prefix}.bias" in t
            if info.dtype == "I8":
                down, up = t.get(f"{prefix}.proj_down"), t.get(f"{prefix}.proj_up")
                ws = t.get(f"{prefix}.wscales")
                if down is None or up is None or ws is None:
                    raise MergeError(f"{ckpt.path}: SVDQ layer {prefix} lacks proj_down/proj_up/wscales")
                layout = Layout.SVDQ_NVFP4 if ws.dtype.startswith("F8") else Layout.SVDQ_INT4
                o, i = info.shape[0], info.shape[1] * 2
                if down.shape != (i, down.shape[1]) or up.shape != (o, down.shape[1]):
                    raise MergeError(f"{ckpt.path}: {prefix} has inconsistent proj_down/proj_up shapes")
                layers[prefix] = Layer(prefix, layout, i, o, bias, rank=down.shape[1], dtype=down.dtype)
            elif info.dtype == "I32":
                ws = t.get(f"{prefix}.wscales")
                if ws is None or f"{prefix}.wzeros" not in t:
                    raise MergeError(f"{ckpt.path}: AWQ layer {prefix} lacks wscales/wzeros")
                layers[prefix] = Layer(prefix, Layout.AWQ_W4A16, info.shape[1] * 2, info.shape[0] * 4, bias, dtype=ws.dtype)
        elif part == "weight" and info.dtype in ("BF16", "F16", "F32"):
            if len(info.shape) == 2:
                layers[prefix] = Layer(prefix, Layout.DENSE, info.shape[1], info.shape[0], f"{prefix}.bias" in t, dtype=info.dtype)
            elif len(info.shape) == 1:
                layers[prefix] = Layer(prefix, Layout.VECTOR, info.shape[0], info.shape[0], f"{prefix}.bias" in t, dtype=info.dtype)
    return layers


def parse_quant_config(meta: dict[str, str]) -> dict:
    raw = meta.get("quantization_config")
    if raw is None:
        return {}
    try:
        qc = json.loads(raw)
    except json.JSONDecodeError:
        raise MergeError("checkpoint metadata 'quantization_config' is not valid JSON") from None
    if not isinstance(qc, dict):
        raise MergeError("checkpoint metadata 'quantization_config' is not a JSON object")
    return qc


def load_model(ckpt: Checkpoint) -> Model:
    from mappings import FAMILIES

    layers = inventory(ckpt)
    fam = None
    for f in FAMILIES:
        if f.matches(ckpt.metadata, ckpt.tensors):
            fam = f
            break
    if fam is None:
        svdq = sum(1 for l in layers.values() if l.layout.is_svdq)
        hint = f" ({svdq} SVDQ layers found)" if svdq else " (no Nunchaku SVDQ layer found)"
        raise UnknownFamily(
            f"{ckpt.path}: not a Nunchaku Qwen-Image or Z-Image-Turbo checkpoint{hint}; "
            f"model_class={ckpt.metadata.get('model_class', '<none>')}"
        )
    svdq_layers = [l for l in layers.values() if l.layout.is_svdq]
    ranks = sorted({l.rank for l in svdq_layers})
    if len(ranks) > 1:
        raise MergeError(f"{ckpt.path}: SVDQ layers have different ranks {ranks}; stock loaders need one rank")
    layouts = {l.layout for l in svdq_layers}
    precision = None
    if layouts:
        if len(layouts) > 1:
            raise MergeError(f"{ckpt.path}: mixes int4 and nvfp4 SVDQ layers")
        precision = "nvfp4" if Layout.SVDQ_NVFP4 in layouts else "int4"
    model = Model(fam.NAME, fam.TITLE, layers, precision, ranks[0] if ranks else 0,
                  parse_quant_config(ckpt.metadata), dict(ckpt.metadata))
    model.fused_smoothing = detect_fused_smoothing(ckpt, svdq_layers)
    return model


def detect_fused_smoothing(ckpt: Checkpoint, svdq_layers: list[Layer]) -> set[str]:
    """smooth_factor == 1 everywhere while smooth_factor_orig is not: deepcompressor's fuse_when_possible."""
    out = set()
    for l in svdq_layers:
        k, ko = l.key("smooth_factor"), l.key("smooth_factor_orig")
        if k not in ckpt or ko not in ckpt:
            continue
        if ckpt.all_equal(k, 1.0) and not ckpt.all_equal(ko, 1.0):
            out.add(l.prefix)
    return out


@dataclass(frozen=True)
class Segment:
    """Rows [lora_start, lora_start+rows) of a LoRA module's output land on rows
    [target_start, target_start+rows) of checkpoint layer `target`."""

    target: str
    target_start: int
    lora_start: int
    rows: int
    component: str = ""  # e.g. "q", "w3": for reports


def whole(layer: Layer) -> list[Segment]:
    return [Segment(layer.prefix, 0, 0, layer.out_features)]


def split_rows(layer: Layer, names: tuple[str, ...]) -> dict[str, list[Segment]]:
    """Per-component segments of a layer whose rows are the concatenation of equal parts `names`."""
    n = layer.out_features // len(names)
    return {c: [Segment(layer.prefix, i * n, 0, n, c)] for i, c in enumerate(names)}


def fused_over(layers: list[Layer], names: tuple[str, ...]) -> list[Segment]:
    """A fused LoRA module (e.g. qkv) whose row parts land on separate layers."""
    out, start = [], 0
    for layer, c in zip(layers, names):
        out.append(Segment(layer.prefix, 0, start, layer.out_features, c))
        start += layer.out_features
    return out

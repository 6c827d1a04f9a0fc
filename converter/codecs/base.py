"""Packed-layout codecs of Nunchaku checkpoints, one module per layout.

Two registries, as gguf-py's `quants.py` has one class per quant type:
* tensor codecs (`Codec`): stateless classes registered by name; `pack` turns a logical tensor into its
  on-disk layout, `unpack` is its exact inverse. Pure torch, no I/O, tested bit-exact against
  deepcompressor's packers.
* layer codecs (`LayerCodec`): one per quantized `Layout`, registered by it; `dequantize` turns a layer's
  stored tensors into its fp32 weight. The base class checks the shapes; a subclass does only its block
  maths. Merge, reference forward and verify all dequantize through `layer_codec(layout)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Mapping

from ..errors import CodecError
from ..layout import Layout

if TYPE_CHECKING:
    import torch

LAYER_CODECS: dict[Layout, type[LayerCodec]] = {}


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise CodecError(msg)


class Codec:
    """Base class of one packed tensor's format: `class X(Codec, name="...")`, the name for messages. Codecs are
    called by class; only the layer codecs are looked up (by `Layout`, `layer_codec`)."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str = "", **kw):
        super().__init_subclass__(**kw)
        if name:
            cls.name = name

    @classmethod
    def pack(cls, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def unpack(cls, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class LayerCodec:
    """A quantized layer layout; subclasses register with `class X(LayerCodec, layout=Layout.…)`.

    `weight_parts`: the stored tensors of the quantized weight (what a LoRA merge never changes, for SVDQ);
    `group_size`: input channels per scale (the layout's `group_size`)."""

    layout: ClassVar[Layout]
    weight_parts: ClassVar[tuple[str, ...]] = ()
    required_parts: ClassVar[tuple[str, ...]] = ()
    group_size: ClassVar[int] = 0

    def __init_subclass__(cls, layout: Layout | None = None, **kw):
        super().__init_subclass__(**kw)
        if layout is not None:
            require(layout not in LAYER_CODECS, f"layer codec {layout} registered twice")
            cls.layout = layout
            cls.group_size = layout.group_size  # the layout's fact (layout.py), not restated here
            LAYER_CODECS[layout] = cls

    @classmethod
    def dequantize(cls, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """fp32 (O, I) weight from the layer's stored tensors (keyed by part name: qweight, wscales, …)."""
        missing = [p for p in cls.required_parts if p not in t]
        require(not missing, f"{cls.layout.value} layer lacks {', '.join(missing)}")
        o, i = cls.logical_shape(t["qweight"])
        require(o > 0 and i % cls.group_size == 0, f"{cls.layout.value}: in_features {i} is not a multiple of "
                                                    f"the group size {cls.group_size}")
        return cls._dequantize(t, o, i)

    @classmethod
    def logical_shape(cls, qweight: torch.Tensor) -> tuple[int, int]:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def _dequantize(cls, t: Mapping[str, torch.Tensor], o: int, i: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def layer_codec(layout: Layout) -> type[LayerCodec]:
    try:
        return LAYER_CODECS[layout]
    except KeyError:
        raise CodecError(f"no layer codec for layout {layout.value}") from None


def group_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """W[n, k] = codes[n, k]·scales[n, k // g] (+ zeros[n, k // g]), fp32 (O, I); g = I / scales.shape[1]."""
    o, i = codes.shape
    ng = scales.shape[1]
    require(scales.shape[0] == o and i % ng == 0, f"scales {tuple(scales.shape)} do not fit codes {(o, i)}")
    w = codes.float().reshape(o, ng, i // ng) * scales.float()[..., None]
    if zeros is not None:
        w = w + zeros.float()[..., None]
    return w.reshape(o, i)

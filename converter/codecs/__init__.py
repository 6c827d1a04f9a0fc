"""Packed-layout codecs of Nunchaku checkpoints, one module per layout.

Every codec is a stateless class registered by name (as gguf-py does for quant types): `pack` turns the
logical tensor into the on-disk layout, `unpack` is its exact inverse. They are pure torch, never do I/O
and are tested bit-exact against deepcompressor's packers.
"""

from __future__ import annotations

import torch

from ..errors import CodecError

CODECS: dict[str, type["Codec"]] = {}


class Codec:
    """Base class; subclasses register themselves with `class X(Codec, name="...")`."""

    name: str = ""

    def __init_subclass__(cls, name: str = "", **kw):
        super().__init_subclass__(**kw)
        if name:
            if name in CODECS:
                raise RuntimeError(f"codec {name!r} registered twice")
            cls.name = name
            CODECS[name] = cls

    @classmethod
    def pack(cls, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def unpack(cls, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise CodecError(msg)


def get_codec(name: str) -> type[Codec]:
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"no codec named {name!r}") from None


# Import the layout modules so that they register.
from . import awq_w4a16, lowrank, svdq_scales, svdq_weight  # noqa: E402,F401

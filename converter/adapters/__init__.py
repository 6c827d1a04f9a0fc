"""Adapter types: what one LoRA-file module contributes to a layer, one module per type (see base.py).

To add an adapter type: a module here with one `Adapter` subclass, imported below."""

from .base import ADAPTERS, ALPHA, Adapter, KeyPattern, claim, key_patterns  # noqa: F401

# the modules below register themselves on import
from . import bias_delta, dora, full_diff, loha, lokr, lora  # noqa: E402,F401

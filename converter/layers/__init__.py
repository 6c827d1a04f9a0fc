"""Layer kinds: how a layer of one storage layout takes a LoRA, one module per kind (see base.py).

To add a layer kind: a module here with one `LayerKind` subclass (`layouts=(...)`), imported below."""

from .base import (BY_NAME, DETECTORS, KINDS, LayerKind, MergeContext, VerifyContext, by_name,  # noqa: F401
                   compute_layer, count_layers, detect_layer, kind_of, merge_layer)

# the modules below register themselves on import
from . import dense_add, lowrank_append, modulation  # noqa: E402,F401

"""The export's config.json: the diffusers config the Nunchaku checkpoint carries (metadata "config"), reduced to
the arguments of the stock class, plus the Nunchaku Lite `quantization_config` diffusers reads back
(quantizers/quantization_config.py: NunchakuLiteQuantizationConfig; modeling_utils.py reads it from config.json
and builds the quantized modules from its exact target paths)."""

from __future__ import annotations

import json

from ..dtypes import TORCH_NAMES
from ..errors import ExportError
from ..layout import Layout
from .tree import ExportTree

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose Nunchaku Lite contract the export follows
PRECISIONS = {"int4": "int4", "fp4_e2m1_all": "nvfp4"}  # nunchaku's quantization_config.weight.dtype -> diffusers'
# the layout of each precision, whose group size diffusers checks (quantization_config.py post_init refuses others)
SVDQ_LAYOUTS = {"int4": Layout.SVDQ_INT4, "nvfp4": Layout.SVDQ_NVFP4}


def precision(model) -> str:
    """int4 or nvfp4, from the tensors, cross-checked with the metadata's quantization_config.weight.dtype."""
    weight = model.quant_config.get("weight")
    declared = weight.get("dtype") if isinstance(weight, dict) else None
    if declared is not None and declared not in PRECISIONS:
        raise ExportError(f"quantization_config.weight.dtype {declared!r} is neither int4 nor fp4_e2m1_all; "
                          "diffusers' Nunchaku Lite loads int4 and nvfp4 only")
    if declared is not None and PRECISIONS[declared] != model.precision:
        raise ExportError(f"the metadata says {declared} but the W4A4 layers are {model.precision}")
    return model.precision


def quantization_config(model, tree: ExportTree, rank: int) -> dict:
    prec = precision(model)
    qc = {"quant_method": "nunchaku_lite", "compute_dtype": TORCH_NAMES[tree.compute_dtype],
          "svdq_w4a4": {"precision": prec, "group_size": SVDQ_LAYOUTS[prec].group_size, "rank": rank,
                        "targets": tree.svdq_targets}}
    if tree.awq_targets:  # its group size is not checked by diffusers, but its AWQ kernels are hard-wired to it
        qc["awq_w4a16"] = {"precision": "int4", "group_size": Layout.AWQ_W4A16.group_size, "targets": tree.awq_targets}
    return qc


def diffusers_config(model, tree: ExportTree, rank: int) -> tuple[dict, list[str]]:
    """(config.json, the checkpoint's config keys the stock class does not take, which are left out)."""
    raw = model.metadata.get("config")
    try:
        base_cfg = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        base_cfg = None
    if not isinstance(base_cfg, dict):
        raise ExportError("the checkpoint's metadata carries no diffusers config ('config'): config.json cannot be "
                          "written")
    fam = model.family
    kept = {k: v for k, v in sorted(base_cfg.items()) if k in fam.diffusers_config_keys}
    dropped = sorted(k for k in base_cfg if k not in kept and not k.startswith("_"))
    cfg = {"_class_name": fam.diffusers_class, "_diffusers_version": DIFFUSERS_VERSION, **kept,
           "quantization_config": quantization_config(model, tree, rank)}
    return cfg, dropped

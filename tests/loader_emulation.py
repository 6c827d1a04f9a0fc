"""CPU emulation of what the stock loaders do with a Nunchaku Qwen-Image / Z-Image file.

Emulated: nunchaku's diffusers path (``from_pretrained`` → ``from_config(metadata["config"])`` →
``_patch_model(precision, rank)`` → ``patch_scale_key`` → strict ``load_state_dict``) and ComfyUI-nunchaku
(precision from ``quantization_config.weight``, ``rank`` default 32, ``skip_refiners``; strict for Qwen).

The expected parameter table is built ONLY from the file's metadata (``model_class``, ``config``,
``quantization_config``), never from its tensor list, then compared with the file header:
  - every expected key present (``.wcscales`` may be missing: loaders fill ones),
  - ``.wtscale`` (nvfp4 SVDQ layers only) is popped before the load; it must hold one element,
  - no unexpected key, shapes equal, dtypes equal (patch_scale_key asserts dtype equality).

Public API
----------
check_loadable(path) -> None                  raises AssertionError listing every problem
expected_parameters(metadata) -> dict[str, (shape tuple, torch.dtype)]
parse_metadata(metadata) -> dict              family/precision/rank/skip_refiners/config
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

__all__ = ["check_loadable", "expected_parameters", "parse_metadata", "header_table"]

BF16 = torch.bfloat16
HEAD_DIM_QWEN = 128
DEFAULT_RANK = 32  # what every loader uses when quantization_config has no "rank"
MAX_RANK = 1024

_ST_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_MODEL_CLASSES = {
    "NunchakuQwenImageTransformer2DModel": "qwen",
    "NunchakuZImageTransformer2DModel": "zimage",
}
_PRECISIONS = {"int4": "int4", "fp4_e2m1_all": "nvfp4"}


# ------------------------------------------------------------------------------------------ metadata


def _json_field(metadata: dict, name: str) -> dict:
    if name not in metadata:
        raise AssertionError(f"metadata has no {name!r} (loaders json.loads it unconditionally)")
    try:
        value = json.loads(metadata[name])
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"metadata {name!r} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise AssertionError(f"metadata {name!r} is not a JSON object: {type(value).__name__}")
    return value


def parse_metadata(metadata: dict | None) -> dict:
    """What the loaders read from the metadata; AssertionError on anything they would choke on."""
    if not metadata:
        raise AssertionError("file has no metadata (config / quantization_config required)")
    model_class = metadata.get("model_class")
    if model_class not in _MODEL_CLASSES:
        raise AssertionError(f"unknown or missing model_class {model_class!r}; expected one of {sorted(_MODEL_CLASSES)}")
    family = _MODEL_CLASSES[model_class]
    config = _json_field(metadata, "config")
    qc = _json_field(metadata, "quantization_config")
    if qc.get("method", "svdquant") != "svdquant":
        raise AssertionError(f"quantization_config.method is {qc.get('method')!r}, expected 'svdquant'")
    weight = qc.get("weight")
    if not isinstance(weight, dict) or weight.get("dtype") not in _PRECISIONS:
        raise AssertionError(
            f"quantization_config.weight.dtype must be one of {sorted(_PRECISIONS)}, got {weight!r}"
        )
    precision = _PRECISIONS[weight["dtype"]]
    want_gs = 64 if precision == "int4" else 16
    if weight.get("group_size", want_gs) != want_gs:
        raise AssertionError(f"{weight['dtype']} needs group_size {want_gs}, metadata says {weight.get('group_size')!r}")
    rank = qc.get("rank", DEFAULT_RANK)
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise AssertionError(f"quantization_config.rank must be an int, got {rank!r}")
    if rank <= 0 or rank % 16 or rank > MAX_RANK:
        raise AssertionError(f"quantization_config.rank={rank}: must be a positive multiple of 16, <= {MAX_RANK}")
    skip_refiners = qc.get("skip_refiners", False)
    if not isinstance(skip_refiners, bool):
        raise AssertionError(f"quantization_config.skip_refiners must be a bool, got {skip_refiners!r}")
    return {
        "family": family,
        "model_class": model_class,
        "precision": precision,
        "rank": rank,
        "skip_refiners": skip_refiners,
        "config": config,
        "quantization_config": qc,
    }


# ------------------------------------------------------------------------------ module parameter sets


def _linear(table, name, out_f, in_f, bias=True):
    table[f"{name}.weight"] = ((out_f, in_f), BF16)
    if bias:
        table[f"{name}.bias"] = ((out_f,), BF16)


def _svdq(table, name, out_f, in_f, *, rank, precision, bias):
    """nunchaku SVDQW4A4Linear (linear.py:96-131)."""
    for n, what in ((in_f, "in_features"), (out_f, "out_features")):
        if n % 128:
            raise AssertionError(f"{name}: {what}={n} is not a multiple of 128 (config inconsistent)")
    gs = 64 if precision == "int4" else 16
    table[f"{name}.qweight"] = ((out_f, in_f // 2), torch.int8)
    table[f"{name}.wscales"] = ((in_f // gs, out_f), BF16 if precision == "int4" else torch.float8_e4m3fn)
    table[f"{name}.smooth_factor"] = ((in_f,), BF16)
    table[f"{name}.smooth_factor_orig"] = ((in_f,), BF16)
    table[f"{name}.proj_down"] = ((in_f, rank), BF16)
    table[f"{name}.proj_up"] = ((out_f, rank), BF16)
    if bias:
        table[f"{name}.bias"] = ((out_f,), BF16)
    if precision == "nvfp4":
        table[f"{name}.wcscales"] = ((out_f,), BF16)


def _awq(table, name, out_f, in_f):
    """nunchaku AWQW4A16Linear (linear.py:327-342), group size 64, with bias."""
    table[f"{name}.qweight"] = ((out_f // 4, in_f // 2), torch.int32)
    table[f"{name}.wscales"] = ((in_f // 64, out_f), BF16)
    table[f"{name}.wzeros"] = ((in_f // 64, out_f), BF16)
    table[f"{name}.bias"] = ((out_f,), BF16)


def _cfg(config: dict, key: str, default=None):
    if key in config:
        return config[key]
    if default is None:
        raise AssertionError(f"config has no {key!r}")
    return default


def _qwen_table(info: dict) -> dict:
    c = info["config"]
    heads = _cfg(c, "num_attention_heads")
    head_dim = _cfg(c, "attention_head_dim")
    D = heads * head_dim
    layers = _cfg(c, "num_layers")
    text_dim = _cfg(c, "joint_attention_dim")
    in_ch = _cfg(c, "in_channels")
    patch = _cfg(c, "patch_size")
    out_ch = c.get("out_channels") or in_ch
    if c.get("guidance_embeds"):
        raise AssertionError("guidance_embeds=true is not emulated")
    rank, prec = info["rank"], info["precision"]
    t: dict = {}
    _linear(t, "img_in", D, in_ch)
    t["txt_norm.weight"] = ((text_dim,), BF16)
    _linear(t, "txt_in", D, text_dim)
    _linear(t, "time_text_embed.timestep_embedder.linear_1", D, 256)
    _linear(t, "time_text_embed.timestep_embedder.linear_2", D, D)
    for i in range(layers):
        p = f"transformer_blocks.{i}"
        _awq(t, f"{p}.img_mod.1", 6 * D, D)
        _awq(t, f"{p}.txt_mod.1", 6 * D, D)
        for name, o, n in (
            ("attn.to_qkv", 3 * D, D),
            ("attn.add_qkv_proj", 3 * D, D),
            ("attn.to_out.0", D, D),
            ("attn.to_add_out", D, D),
            ("img_mlp.net.0.proj", 4 * D, D),
            ("txt_mlp.net.0.proj", 4 * D, D),
            ("img_mlp.net.2", D, 4 * D),
            ("txt_mlp.net.2", D, 4 * D),
        ):
            _svdq(t, f"{p}.{name}", o, n, rank=rank, precision=prec, bias=True)
        for nm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            t[f"{p}.attn.{nm}.weight"] = ((head_dim,), BF16)
    _linear(t, "norm_out.linear", 2 * D, D)
    _linear(t, "proj_out", patch * patch * out_ch, D)
    return t


def _zimage_table(info: dict) -> dict:
    c = info["config"]
    D = _cfg(c, "dim")
    heads = _cfg(c, "n_heads")
    kv_heads = c.get("n_kv_heads") or heads
    hd = D // heads
    layers = _cfg(c, "n_layers")
    refiners = _cfg(c, "n_refiner_layers", 2)
    cap = _cfg(c, "cap_feat_dim")
    in_ch = _cfg(c, "in_channels")
    patches = _cfg(c, "all_patch_size", [2])
    f_patches = _cfg(c, "all_f_patch_size", [1])
    ffn = int(D / 3 * 8)
    adaln = min(D, 256)
    qkv_out = (heads + 2 * kv_heads) * hd
    rank, prec = info["rank"], info["precision"]
    t: dict = {}
    blocks = [(f"layers.{i}", True, True) for i in range(layers)]
    blocks += [(f"noise_refiner.{i}", False, True) for i in range(refiners)]
    blocks += [(f"context_refiner.{i}", False, False) for i in range(refiners)]
    for p, is_layer, modulation in blocks:
        if is_layer or not info["skip_refiners"]:
            _svdq(t, f"{p}.attention.to_qkv", qkv_out, D, rank=rank, precision=prec, bias=False)
            _svdq(t, f"{p}.attention.to_out.0", D, heads * hd, rank=rank, precision=prec, bias=False)
            _svdq(t, f"{p}.feed_forward.net.0.proj", 2 * ffn, D, rank=rank, precision=prec, bias=False)
            _svdq(t, f"{p}.feed_forward.net.2", D, ffn, rank=rank, precision=prec, bias=False)
        else:
            _linear(t, f"{p}.attention.to_q", heads * hd, D, bias=False)
            _linear(t, f"{p}.attention.to_k", kv_heads * hd, D, bias=False)
            _linear(t, f"{p}.attention.to_v", kv_heads * hd, D, bias=False)
            _linear(t, f"{p}.attention.to_out.0", D, heads * hd, bias=False)
            _linear(t, f"{p}.feed_forward.net.0.proj", 2 * ffn, D, bias=False)
            _linear(t, f"{p}.feed_forward.net.2", D, ffn, bias=False)
        t[f"{p}.attention.norm_q.weight"] = ((hd,), BF16)
        t[f"{p}.attention.norm_k.weight"] = ((hd,), BF16)
        for nm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            t[f"{p}.{nm}.weight"] = ((D,), BF16)
        if modulation:
            _linear(t, f"{p}.adaLN_modulation.0", 4 * D, adaln)
    for p, f in zip(patches, f_patches):
        _linear(t, f"all_x_embedder.{p}-{f}", D, f * p * p * in_ch)
        _linear(t, f"all_final_layer.{p}-{f}.linear", p * p * f * in_ch, D)
        _linear(t, f"all_final_layer.{p}-{f}.adaLN_modulation.1", D, adaln)
    _linear(t, "t_embedder.mlp.0", 1024, 256)
    _linear(t, "t_embedder.mlp.2", adaln, 1024)
    t["cap_embedder.0.weight"] = ((cap,), BF16)
    _linear(t, "cap_embedder.1", D, cap)
    t["x_pad_token"] = ((1, D), BF16)
    t["cap_pad_token"] = ((1, D), BF16)
    return t


def expected_parameters(metadata: dict) -> dict:
    """{key: (shape, dtype)} of the patched Nunchaku module tree, from the metadata alone."""
    info = parse_metadata(metadata)
    return _qwen_table(info) if info["family"] == "qwen" else _zimage_table(info)


# ------------------------------------------------------------------------------------------ compare


def header_table(path) -> tuple[dict, dict]:
    """({key: (shape, dtype)}, metadata) read from the header only (no tensor data)."""
    table = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for k in f.keys():
            sl = f.get_slice(k)
            dt = sl.get_dtype()
            if dt not in _ST_DTYPES:
                raise AssertionError(f"{k}: unsupported safetensors dtype {dt}")
            table[k] = (tuple(sl.get_shape()), _ST_DTYPES[dt])
    return table, metadata


def check_loadable(path) -> None:
    """Raise AssertionError (listing every problem) unless the stock loaders would accept ``path``."""
    file_table, metadata = header_table(path)
    info = parse_metadata(metadata)
    expected = _qwen_table(info) if info["family"] == "qwen" else _zimage_table(info)
    svdq_layers = {k[: -len(".qweight")] for k, (_, dt) in expected.items() if k.endswith(".qweight") and dt == torch.int8}

    problems: list[str] = []
    state = dict(file_table)
    # patch_scale_key: pop wtscale (nvfp4 SVDQ layers), fill missing wcscales with ones.
    for k in sorted(state):
        if k.endswith(".wtscale"):
            layer = k[: -len(".wtscale")]
            shape, dt = state.pop(k)
            if info["precision"] != "nvfp4" or layer not in svdq_layers:
                problems.append(f"unexpected key {k} (wtscale outside an nvfp4 SVDQ layer)")
            elif int(torch.Size(shape).numel()) != 1 or not dt.is_floating_point:
                problems.append(f"{k}: wtscale must be one float element, got shape {shape} {dt}")
    for k, spec in expected.items():
        if k.endswith(".wcscales") and k not in state:
            state[k] = spec  # filled with ones by the loader

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    for k in missing:
        problems.append(f"missing key {k} (expected {list(expected[k][0])} {expected[k][1]})")
    for k in unexpected:
        problems.append(f"unexpected key {k} ({list(state[k][0])} {state[k][1]})")
    for k in sorted(set(expected) & set(state)):
        (es, ed), (fs, fd) = expected[k], state[k]
        if tuple(es) != tuple(fs):
            problems.append(f"shape mismatch {k}: file {list(fs)}, model {list(es)}")
        if ed != fd:
            problems.append(f"dtype mismatch {k}: file {fd}, model {ed}")
    if problems:
        head = (
            f"{path}: not loadable as {info['model_class']} "
            f"(precision={info['precision']}, rank={info['rank']}, skip_refiners={info['skip_refiners']}): "
            f"{len(problems)} problem(s)"
        )
        shown = problems[:60]
        more = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
        raise AssertionError("\n  ".join([head, *shown, *more]))

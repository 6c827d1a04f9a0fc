"""Write LoRA .safetensors files in every key format the converter supports.

Public API
----------
FORMATS                         tuple of supported format names
lora_keys(module, fmt) -> (a_key, b_key, alpha_key)
write_lora(path, modules, fmt, *, extra=None, metadata=None) -> dict[str, Tensor]
random_lora_modules(shapes, rank, seed, alpha=None, scale=0.05, dtype=torch.bfloat16) -> modules

``modules`` maps a canonical diffusers module path (``transformer_blocks.0.attn.to_q``,
``layers.0.feed_forward.w1``) to ``(A, B, alpha_or_None)`` with A (r, in) = lora_A / lora_down and
B (out, r) = lora_B / lora_up.  The alpha key is written only when alpha is not None, as a 0-dim float32
tensor (what kohya / lightx2v files carry).

Formats (m = module path, m_ = m with every "." replaced by "_"):
  diffusers     m.lora_A.weight                 m.lora_B.weight                 m.alpha
  peft_adapter  m.lora_A.default.weight         m.lora_B.default.weight         m.alpha
  peft_raw      base_model.model.m.lora_A.weight ...                            base_model.model.m.alpha
  transformer   transformer.m.lora_A.weight     ...                             transformer.m.alpha
  comfy         diffusion_model.m.lora_A.weight ...                             diffusion_model.m.alpha
  lightx2v      m.lora_down.weight              m.lora_up.weight                m.alpha
  kohya         lora_unet_m_.lora_down.weight   lora_unet_m_.lora_up.weight     lora_unet_m_.alpha
  lycoris       lycoris_m_.lora_down.weight     lycoris_m_.lora_up.weight       lycoris_m_.alpha
  diffsynth     m.lora_A.default_0.default.weight  m.lora_B.default_0.default.weight  m.alpha
                (DiffSynth-Studio's doubled PEFT adapter name)
  anime_z       m'.lora.down.weight             m'.lora.up.weight               m.alpha
                (Z-Image only, not in FORMATS: m' = m with a final to_q/to_k/to_v written to.q/to.k/to.v; the
                alpha keeps the underscore name, as Anime-Z's files do and diffusers' Z-Image converter pairs them)
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["FORMATS", "FAMILY_FORMATS", "lora_keys", "write_lora", "random_lora_modules"]

FORMATS = ("diffusers", "peft_adapter", "peft_raw", "transformer", "comfy", "lightx2v", "kohya", "lycoris", "diffsynth")
# spellings of one family only (their module names are that family's): written by the same functions
FAMILY_FORMATS = ("anime_z",)

_AB = ("lora_A.weight", "lora_B.weight")
_AB_PEFT = ("lora_A.default.weight", "lora_B.default.weight")
_DOWN_UP = ("lora_down.weight", "lora_up.weight")
_AB_DIFFSYNTH = ("lora_A.default_0.default.weight", "lora_B.default_0.default.weight")
_DOT = ("lora.down.weight", "lora.up.weight")


def _base_and_suffixes(module: str, fmt: str) -> tuple[str, tuple[str, str]]:
    if fmt == "diffusers":
        return module, _AB
    if fmt == "peft_adapter":
        return module, _AB_PEFT
    if fmt == "peft_raw":
        return f"base_model.model.{module}", _AB
    if fmt == "transformer":
        return f"transformer.{module}", _AB
    if fmt == "comfy":
        return f"diffusion_model.{module}", _AB
    if fmt == "lightx2v":
        return module, _DOWN_UP
    if fmt == "kohya":
        return "lora_unet_" + module.replace(".", "_"), _DOWN_UP
    if fmt == "lycoris":
        return "lycoris_" + module.replace(".", "_"), _DOWN_UP
    if fmt == "diffsynth":
        return module, _AB_DIFFSYNTH
    if fmt == "anime_z":
        return re.sub(r"\.to_([qkv])$", r".to.\1", module), _DOT
    raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {FORMATS + FAMILY_FORMATS}")


def lora_keys(module: str, fmt: str) -> tuple[str, str, str]:
    """(A/down key, B/up key, alpha key) for ``module`` in format ``fmt``."""
    base, (a, b) = _base_and_suffixes(module, fmt)
    alpha_base = module if fmt == "anime_z" else base
    return f"{base}.{a}", f"{base}.{b}", f"{alpha_base}.alpha"


def write_lora(path, modules: dict, fmt: str, *, extra: dict | None = None, metadata: dict | None = None) -> dict:
    """Write ``modules`` as a LoRA file in format ``fmt``; return the {key: tensor} dict written.

    extra: additional tensors written verbatim under their given keys (e.g. ``.diff_b`` deltas, text
    encoder keys).  metadata: str -> str safetensors metadata (values are str()-ed).
    """
    sd: dict[str, torch.Tensor] = {}
    for module, spec in modules.items():
        if len(spec) != 3:
            raise ValueError(f"{module}: expected (A, B, alpha_or_None), got {len(spec)} items")
        a, b, alpha = spec
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r, in) and (out, r)")
        ka, kb, kalpha = lora_keys(module, fmt)
        for k in (ka, kb):
            if k in sd:
                raise ValueError(f"duplicate key {k}")
        sd[ka] = a.contiguous()
        sd[kb] = b.contiguous()
        if alpha is not None:
            sd[kalpha] = torch.tensor(float(alpha), dtype=torch.float32)
    for k, v in (extra or {}).items():
        if k in sd:
            raise ValueError(f"extra key {k} collides with a LoRA key")
        sd[k] = v.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    save_file(sd, str(path), metadata=md)
    return sd


def random_lora_modules(
    shapes: dict,
    rank: int,
    seed: int,
    alpha: float | None = None,
    scale: float = 0.05,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Random (A, B, alpha) per module: A (rank, in), B (out, rank).

    Scaled so that the EFFECTIVE delta γ·B·A (γ = alpha/rank, or 1 without alpha) has Frobenius norm
    ``scale`` × sqrt(out), i.e. ``scale`` × the norm of a weight with unit-variance-normalised entries
    (std 1/sqrt(in), as the builders use).  Deterministic in (seed, module order).
    """
    g = torch.Generator()
    g.manual_seed(int(seed))
    gamma = 1.0 if alpha is None else float(alpha) / rank
    out: dict = {}
    for name, (out_f, in_f) in shapes.items():
        a = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
        b = torch.randn(out_f, rank, generator=g) / math.sqrt(rank)
        norm = float((b @ a).norm()) * abs(gamma)
        f = scale * math.sqrt(out_f) / max(norm, 1e-12)
        # split the factor evenly between A and B so neither is tiny in bf16
        r = math.sqrt(f)
        out[name] = ((a * r).to(dtype), (b * r).to(dtype), alpha)
    return out

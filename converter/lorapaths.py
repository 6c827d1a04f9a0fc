"""`LORA[:STRENGTH]` arguments -> a LoRA file and its strength, with messages that name the real cause: a
strength that is not a number, a folder, a checkpoint given where a LoRA belongs."""

from __future__ import annotations

import math
import os

from .errors import MergeError
from .st_reader import Checkpoint

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # PEFT's save_pretrained names
# tensor names only a Nunchaku checkpoint holds (SVDQ branch, AWQ / SVDQ codes)
CHECKPOINT_PARTS = (".proj_down", ".proj_up", ".qweight", ".smooth_factor", ".wscales")


def parse_spec(spec: str) -> tuple[str, float]:
    """`path[:strength]`; the strength is taken only when what follows the last ':' is a number."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            s = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(s):
            raise MergeError(f"strength in {spec!r} is not a finite number")
        return path, s
    return spec, 1.0


def lora_path(spec: str) -> tuple[str, float]:
    """The LoRA file a `LORA[:STRENGTH]` argument names, and its strength; a missing file is explained."""
    path, strength = parse_spec(spec)
    if os.path.isdir(path):
        return peft_folder_file(path), strength
    if not os.path.isfile(path):
        raise MergeError(_not_found(spec, path))
    return path, strength


def _not_found(spec: str, path: str) -> str:
    """Why `path` names no file: a strength that is not a number after an existing file, or a missing file."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and os.path.exists(head):
        if not tail.strip():
            return f"{spec!r} has nothing after ':'; give a strength (e.g. {head}:0.8) or drop the colon"
        fix = _number_with_comma(tail)
        hint = f"; did you mean {head}:{fix}? (a decimal point, not a comma)" if fix else \
            f"; give a number, e.g. {head}:0.8"
        return f"the strength {tail!r} in {spec!r} is not a number{hint}"
    return f"LoRA file not found: {path}"


def _number_with_comma(text: str) -> str | None:
    """'0,8' -> '0.8' when the comma is a decimal comma; else None."""
    if text.count(",") != 1:
        return None
    fixed = text.replace(",", ".")
    try:
        return fixed if math.isfinite(float(fixed)) else None
    except ValueError:
        return None


def peft_folder_file(folder: str) -> str:
    """A folder stands for its LoRA only when it is PEFT's `save_pretrained` output (adapter_model.safetensors
    beside its adapter_config.json, which holds alpha and r); any other folder is refused with what it holds."""
    weights = os.path.join(folder, PEFT_WEIGHTS)
    if os.path.isfile(weights) and os.path.isfile(os.path.join(folder, PEFT_CONFIG)):
        return weights
    try:
        held = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    except OSError as e:
        raise MergeError(f"{folder} is a folder, not a LoRA file, and cannot be listed: {e.strerror}") from None
    if PEFT_WEIGHTS in held:
        hint = f"it holds {PEFT_WEIGHTS} without the {PEFT_CONFIG} PEFT writes beside it; name the file itself"
    elif held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        hint = f"it holds {shown}: name the file itself"
    else:
        hint = "it holds no .safetensors file"
    raise MergeError(f"{folder} is a folder, not a LoRA file ({hint})")


def is_checkpoint(ckpt: Checkpoint) -> bool:
    """Holds the tensors of a Nunchaku checkpoint's quantized layers."""
    return any(name.endswith(CHECKPOINT_PARTS) for name in ckpt.keys())


def refuse_checkpoint_as_lora(ckpt: Checkpoint, path: str) -> None:
    """A LoRA argument with no LoRA key that is a Nunchaku checkpoint: the arguments are in the wrong place."""
    if is_checkpoint(ckpt):
        raise MergeError(f"{path} is a Nunchaku checkpoint, not a LoRA file; the base checkpoint comes first: "
                         "qwenlora-merge BASE LORA[:STRENGTH]...")

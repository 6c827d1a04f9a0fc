"""`LORA[:STRENGTH]` arguments -> a LoRA file and its strength, with messages that name the real cause: a
strength that is not a number, a folder, a checkpoint given where a LoRA belongs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge: its file (or PEFT `save_pretrained` folder) and its strength.

    Args:
        path: the LoRA's `.safetensors` file, or a PEFT folder holding `adapter_model.safetensors` beside its
            `adapter_config.json`.
        strength: the factor the LoRA's update is scaled by (negative allowed; finite).
        text: the `LORA[:STRENGTH]` text it was parsed from, if any (named in messages; not compared).

    Raises:
        MergeError: a strength that is not a finite number, or a path that is not a string.
    """

    path: str
    strength: float = 1.0
    text: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise MergeError(f"a LoRA path must be a string, not {self.path!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise MergeError(f"the strength of {self.path} is {self.strength!r}, not a number")
        if not math.isfinite(self.strength):
            raise MergeError(f"strength in {self.text or f'{self.path}:{float(self.strength)}'!r} is not a finite "
                             "number")
        object.__setattr__(self, "strength", float(self.strength))  # frozen: set once, here

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """The command line's `LORA[:STRENGTH]`.

        Args:
            text: a path, optionally followed by `:` and a number (`style.safetensors:0.8`); a tail that is no
                number stays part of the path.

        Returns:
            The LoraSpec, remembering `text` for messages.
        """
        path, strength = parse_spec(text)
        return cls(path, strength, text)

    @classmethod
    def of(cls, value: LoraSpec | str | os.PathLike | tuple) -> LoraSpec:
        """Any form the Python API takes for a LoRA.

        Args:
            value: a LoraSpec; a `str` in the `LORA[:STRENGTH]` form; an `os.PathLike` (a path, never parsed);
                or a `(path, strength)` pair.

        Returns:
            The LoraSpec.
        """
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, os.PathLike):
            return cls(os.fspath(value))
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (str, os.PathLike)):
            return cls(os.fspath(value[0]), value[1])
        raise MergeError(f"a LoRA is a path, a (path, strength) pair or a LoraSpec, not {value!r}")


def lora_path(spec: LoraSpec) -> tuple[str, float]:
    """The LoRA file a spec names, and its strength; a missing file is explained."""
    path, strength = spec.path, spec.strength
    if os.path.isdir(path):
        return peft_folder_file(path), strength
    if not os.path.isfile(path):
        raise MergeError(_not_found(spec.text, path) if spec.text else f"LoRA file not found: {path}")
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

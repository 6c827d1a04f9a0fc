"""Batch plan files (JSON or TOML) -> the outputs of one batch, each LoRA a LoraSpec."""

from __future__ import annotations

import json
import os

from .errors import MergeError
from .lorapaths import LoraSpec


def read_batch_file(path: str) -> list[tuple[str | None, list[LoraSpec]]]:
    """JSON or TOML: {"outputs": [{"output": "a.safetensors", "loras": ["x.safetensors:0.8", ...]}, ...]}.
    A LoRA may also be {"path": ..., "strength": ...}. Relative paths are relative to the plan file.

    Args:
        path: the plan file (`.toml` is read as TOML, anything else as JSON).

    Returns:
        (output or None for the default name, its LoRAs) for each output, in order.
    """
    data = _load(path)
    root = os.path.dirname(os.path.abspath(path))
    outputs = data.get("outputs") if isinstance(data, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise MergeError(f"{path}: expected a non-empty 'outputs' list")
    entries = []
    for index, entry in enumerate(outputs):
        if not isinstance(entry, dict) or not isinstance(entry.get("loras"), list) or not entry["loras"]:
            raise MergeError(f"{path}: outputs[{index}] needs a non-empty 'loras' list")
        specs = [_lora_entry(path, index, root, item) for item in entry["loras"]]
        out = entry.get("output")
        if out is not None and not isinstance(out, str):
            raise MergeError(f"{path}: outputs[{index}] has an output {out!r} that is not a path")
        entries.append((_relative_to(root, out) if out else None, specs))
    return entries


def _load(path: str):
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".toml"):
            import tomllib

            return tomllib.loads(raw.decode())
        return json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:
        raise MergeError(f"cannot read batch file {path}: {e}") from None


def _relative_to(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def _lora_entry(plan_path: str, index: int, root: str, item) -> LoraSpec:
    """`"x.safetensors:0.8"` (the command line's form) or `{"path": ..., "strength": ...}`."""
    if isinstance(item, str):
        head, sep, tail = item.rpartition(":")
        text = _relative_to(root, item) if not sep or not _is_number(tail) else f"{_relative_to(root, head)}:{tail}"
        return LoraSpec.parse(text)
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        strength = item.get("strength", 1.0)
        if not _is_number(str(strength)) or isinstance(strength, bool):
            raise MergeError(f"{plan_path}: outputs[{index}] gives {item['path']} the strength {strength!r}, "
                             "not a number")
        return LoraSpec(_relative_to(root, item["path"]), float(strength))
    raise MergeError(f"{plan_path}: outputs[{index}] has a bad LoRA entry {item!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False

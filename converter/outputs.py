"""Where a merge writes: the default output name, the loaders' name convention, and the refusals that protect the
inputs and the other outputs of a run. Pure Python (headers and paths only)."""

from __future__ import annotations

import os
import re

from .errors import MergeError
from .lorapaths import LoraSpec

NAME_RX = re.compile(r"^svdq-(int4|fp4)_r(\d+)-(.+)$")


def _precision_tag(precision: str | None) -> str:
    return "fp4" if precision == "nvfp4" else "int4"


def default_output(base: str, precision: str | None, rank: int, lora_paths: list[str]) -> str:
    """`svdq-<int4|fp4>_r<rank>-<base name>+<LoRA names>.safetensors` next to the base."""
    stem = os.path.basename(base)
    stem = stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem
    match = NAME_RX.match(stem)
    rest = match.group(3) if match else stem
    names = "+".join(os.path.splitext(os.path.basename(path))[0] for path in lora_paths)
    return os.path.join(os.path.dirname(os.path.abspath(base)),
                        f"svdq-{_precision_tag(precision)}_r{rank}-{rest}+{names}.safetensors")


def name_warning(out: str, precision: str | None, rank: int) -> str | None:
    """SGLang reads precision and rank from `svdq-{int4|fp4}_r{N}-` in the file name."""
    match = NAME_RX.match(os.path.basename(out))
    if not match:
        return None
    tag = _precision_tag(precision)
    if match.group(1) != tag or int(match.group(2)) != rank:
        right = f"svdq-{tag}_r{rank}-{match.group(3)}"
        return (f"the output name says {match.group(1)} rank {match.group(2)} but the file is {tag} rank {rank}; "
                f"loaders that read the name (SGLang) will fail. A right name: {right}")
    return None


def same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.abspath(first) == os.path.abspath(second)


def refuse_base_as_lora(base: str, specs: list[LoraSpec]) -> None:
    for spec in specs:
        if same_file(spec.path, base):
            raise MergeError(f"the LoRA {spec.path} is the base checkpoint itself")


def check_output(base: str, plan, output: str | None, specs: list[LoraSpec], *, dry_run: bool, overwrite: bool,
                 taken: list[str]) -> str:
    """The output path of one planned merge (given, or named after base and LoRAs) after every refusal that
    protects the inputs and the run's other outputs (`taken`)."""
    out = output or default_output(base, plan.model.precision, plan.new_rank, [spec.path for spec in specs])
    if same_file(out, base):
        raise MergeError(f"the output {out} is the base checkpoint {base}; refusing to write over an input")
    for spec in specs:
        if os.path.exists(out) and same_file(out, spec.path):
            raise MergeError(f"the output {out} is the LoRA {spec.path}; refusing to write over an input")
    if os.path.abspath(out) in {os.path.abspath(path) for path in taken}:
        raise MergeError(f"two outputs of this run are both {out}")
    if not dry_run:
        if os.path.exists(out) and not overwrite:
            raise MergeError(f"{out} exists; pass --overwrite to replace it")
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise MergeError(f"output folder {folder} does not exist")
    return out

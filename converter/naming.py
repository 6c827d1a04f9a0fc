"""Small helpers on names: patterns for grouped listings, the model's natural order, byte counts."""

from __future__ import annotations

import re


def pattern(name: str) -> str:
    """'transformer_blocks.12.attn.to_q' -> 'transformer_blocks.*.attn.to_q' (block indices folded)."""
    return re.sub(r"(?<=[._])\d+(?=[._]|$)", "*", name)


def natural(s: str) -> tuple:
    """Sort key: 'blocks.10.x' after 'blocks.9.x', the model's own layer order."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s))


def counted(count: int, noun: str) -> str:
    """'1 layer', '3 layers': a count with its noun in the right number (nouns that take an 's')."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)

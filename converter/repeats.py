"""The same LoRA file named more than once in one merge (`a:0.5 a:0.5`, or a copy under another name).

Merged as given, every copy would append its factors again: the rank of each W4A4 layer it touches grows by the
file's rank per copy. Where every update of the file is linear in strength (LoRA, LoKr, LoHa, full diff, bias
delta), two copies at s1 and s2 are exactly one at s1 + s2: the first copy takes the summed strength and the
others are accounted as ignored. DoRA is not linear (it renormalises W + ΔV): its copies stay, with a warning
naming the rank they cost."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .lorafile import LoraFile


@dataclass
class Repeat:
    """Indices (into the merge's LoRA list) of one file named several times; `linear`: all its updates are."""

    members: list[int]
    linear: bool

    def strengths(self, loras: list[LoraFile]) -> str:
        return " + ".join(f"{loras[i].strength:g}" for i in self.members)


def _same_file(a: LoraFile, b: LoraFile) -> bool:
    """The same inode, or the same size and sha256 (hashed only on a size match; the provenance needs the hash
    anyway, and each file is hashed once per process)."""
    if os.path.samefile(a.path, b.path):
        return True
    return os.path.getsize(a.path) == os.path.getsize(b.path) and a.sha256 == b.sha256


def find_repeats(loras: list[LoraFile]) -> list[Repeat]:
    """Groups of the same file among the merge's LoRAs, in the order given."""
    groups: list[list[int]] = []
    for i, lf in enumerate(loras):
        home = next((g for g in groups if _same_file(loras[g[0]], lf)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return [Repeat(g, all(_linear(loras[i]) for i in g)) for g in groups if len(g) > 1]


def _linear(lf: LoraFile) -> bool:
    return all(a.linear for mod in lf.modules.values() for a in mod.adapters)


def fold_repeats(loras: list[LoraFile], repeats: list[Repeat], warnings: list[str]) -> dict[int, str]:
    """Merge each linear repeat once: its first copy's updates take the summed strength. Returns {index of a folded
    copy: the rule its keys are ignored by}."""
    folded: dict[int, str] = {}
    for rep in repeats:
        if not rep.linear:
            continue
        first, total = rep.members[0], sum(loras[i].strength for i in rep.members)
        for mod in loras[first].modules.values():
            for adapter in mod.adapters:
                adapter.set_strength(total)
        cancel = " (the strengths cancel: it changes nothing)" if abs(total) < 1e-8 else ""
        warnings.append(f"{loras[first].name} is given {len(rep.members)} times (strengths {rep.strengths(loras)}): "
                        f"merged once at the summed strength {total:g}, which is exact for its updates{cancel}")
        for i in rep.members[1:]:
            folded[i] = f"the same file as LoRA {first + 1}: merged once with it, at the summed strength {total:g}"
    return folded

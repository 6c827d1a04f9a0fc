"""The merge report: a dict (for --json) and its human rendering."""

from __future__ import annotations

import re
import statistics
from collections import Counter

from . import __version__
from .planner import Plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def pattern(name: str) -> str:
    return re.sub(r"(?<=[._])\d+(?=[._]|$)", "*", name)


_PART = re.compile(r"\.(lora_[AB](\.[^.]+)?\.weight|lora_(down|up)(\.[^.]+)?\.weight|lora\.(down|up)\.weight|alpha|"
                   r"lora_alpha|diff|diff_b)$")


def module_pattern(key: str) -> str:
    """Key pattern without its LoRA part suffix: one line per module pattern in listings."""
    return pattern(_PART.sub(".*", key))


def lowrank_bytes_per_rank(plan: Plan) -> int:
    item = 2
    return sum((l.in_features + l.out_features) * item for p, l in plan.model.layers.items() if l.layout.is_svdq)


def plan_report(plan: Plan, base_path: str, base_bytes: int) -> dict:
    m = plan.model
    added = (plan.new_rank - m.rank) * lowrank_bytes_per_rank(plan)
    loras = []
    for lf, acc in zip(plan.loras, plan.accounts):
        loras.append({
            "path": lf.path, "format": lf.format, "strength": lf.strength,
            "keys": {"total": len(lf.ckpt.keys()), "applied": len(acc.applied), "ignored": len(acc.ignored),
                     "unmapped": len(acc.unmapped)},
            "ignored": [{"key": k, "rule": r} for k, r in acc.ignored],
            "unmapped": [{"key": k, "reason": r} for k, r in acc.unmapped],
        })
    targets = []
    for p, op in sorted(plan.ops.items()):
        targets.append({
            "layer": p, "layout": op.layer.layout.value, "method": op.method,
            "from": sorted({f"{plan.loras[c.lora].name}:{c.module}" for c in op.contributions}),
            "rank_added": op.added_rank if op.method == "lowrank_append" else 0,
        })
    return {
        "tool": f"qwenlora-merge {__version__}",
        "base": {"path": base_path, "family": m.family, "title": m.family_title, "precision": m.precision,
                 "rank": m.rank, "bytes": base_bytes, "layers": len(m.layers)},
        "rank": {"from": m.rank, "to": plan.new_rank, "added_bytes": added,
                 "max_added_by_layer": max((t["rank_added"] for t in targets), default=0)},
        "expected_output_bytes": base_bytes + added,
        "modulation_mode": plan.modulation_mode,
        "loras": loras,
        "targets": targets,
        "warnings": list(plan.warnings),
    }


def summarize_layers(records: list[dict]) -> dict:
    out: dict = {}
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    for meth, rs in by_method.items():
        if meth == "modulation":
            e = [r["e_mod"] for r in rs if r.get("e_mod") is not None]
            out[meth] = {"layers": len(rs), "actions": dict(Counter(r["action"] for r in rs)),
                         "e_mod_median": statistics.median(e) if e else None, "e_mod_max": max(e) if e else None}
            for k in ("e_biasfold", "e_plain"):
                v = [r[k] for r in rs if r.get(k) is not None]
                if v:
                    out[meth][k + "_median"] = statistics.median(v)
        else:
            e = [r["rel_error"] for r in rs if "rel_error" in r]
            out[meth] = {"layers": len(rs), "rel_error_max": max(e) if e else None,
                         "rel_error_median": statistics.median(e) if e else None}
            fl = [r["rel_error"] / r["rounding_floor"] for r in rs if r.get("rounding_floor")]
            if fl:
                out[meth]["max_over_rounding_floor"] = max(fl)
            fr = [r["applied_fraction"] for r in rs if "applied_fraction" in r]
            if fr:
                out[meth]["applied_fraction_min"] = min(fr)
                out[meth]["applied_fraction_max"] = max(fr)
    return out


def render(rep: dict, verbose: bool = False) -> str:
    b = rep["base"]
    lines = [f"base     {b['path']}  [{b['title']}, {b['precision'] or 'no SVDQ'}, rank {b['rank']}, "
             f"{human_bytes(b['bytes'])}]"]
    for i, l in enumerate(rep["loras"], 1):
        k = l["keys"]
        lines.append(f"lora {i}   {l['path']}  strength {l['strength']:g}  format: {l['format']}")
        lines.append(f"         keys {k['total']}: applied {k['applied']}, ignored {k['ignored']}, unmapped {k['unmapped']}")
        for what, rows, field in (("ignored", l["ignored"], "rule"), ("unmapped", l["unmapped"], "reason")):
            if rows:
                c = Counter(f"{module_pattern(r['key'])}  ({r[field]})" for r in rows)
                shown = c.most_common(None if verbose else 6)
                for p, n in shown:
                    lines.append(f"         {what}: {p}  {n} keys")
                if len(c) > len(shown):
                    lines.append(f"         ... {len(c) - len(shown)} more {what} patterns (-v or --json lists all)")
    r = rep["rank"]
    if r["to"] != r["from"]:
        lines.append(f"rank     {r['from']} -> {r['to']} for every SVDQ layer (largest LoRA rank on one layer "
                     f"{r['max_added_by_layer']}); low-rank branch +{human_bytes(r['added_bytes'])}")
    else:
        lines.append(f"rank     {r['from']} (unchanged)")
    tcount = Counter(t["method"] for t in rep["targets"])
    lines.append("targets  " + (", ".join(f"{n} {m}" for m, n in sorted(tcount.items())) or "none"))
    if verbose:
        for t in rep["targets"]:
            lines.append(f"         {t['layer']}  {t['method']}  +r{t['rank_added']}  <- {', '.join(t['from'])}")
    s = rep.get("layers_summary")
    if s:
        for meth, d in s.items():
            if meth == "modulation":
                acts = ", ".join(f"{k} {v}" for k, v in sorted(d["actions"].items()))
                extra = ""
                if d.get("e_biasfold_median") is not None:
                    extra += f"; bias-fold would give {d['e_biasfold_median']:.3f}"
                if d.get("e_plain_median") is not None:
                    extra += f", plain requant {d['e_plain_median']:.3f}"
                em = d["e_mod_median"]
                lines.append(f"fidelity modulation x{d['layers']} ({acts}): e_mod median "
                             f"{em:.3f} max {d['e_mod_max']:.3f}{extra}  (1.0 = LoRA effect lost)"
                             if em is not None else f"fidelity modulation x{d['layers']} ({acts})")
            elif d.get("rel_error_max") is not None:
                extra = ""
                if "max_over_rounding_floor" in d:
                    extra += f" ({d['max_over_rounding_floor']:.2f}x the 16-bit rounding floor)"
                if "applied_fraction_min" in d:
                    extra += f", applied fraction {d['applied_fraction_min']:.4f}..{d['applied_fraction_max']:.4f}"
                lines.append(f"fidelity {meth} x{d['layers']}: rel. error max {d['rel_error_max']:.2e}{extra}")
    for w in rep.get("warnings", []):
        lines.append(f"warning  {w}")
    if rep.get("dry_run"):
        lines.append(f"dry run  nothing written; output would be about {human_bytes(rep['expected_output_bytes'])}")
    elif rep.get("output"):
        how = {"direct": ", direct I/O", "buffered": ""}.get(rep.get("write_mode", ""), "")
        lines.append(f"wrote    {rep['output']} ({human_bytes(rep['output_bytes'])}) in {rep['seconds']:.1f} s{how}")
    return "\n".join(lines)

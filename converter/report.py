"""The merge report: a dict (for --json) and its human rendering. Per-kind figures come from the layer kinds."""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING

from . import __version__
from .adapters import key_patterns
from .layers import by_name, count_layers
from .naming import human_bytes, pattern
from .planner import Plan

if TYPE_CHECKING:
    from .st_reader import Checkpoint


def module_pattern(key: str) -> str:
    """Key pattern without its adapter part suffix (`….lora_A.weight` -> `….*`): one line per module pattern."""
    for pat, _ in key_patterns():
        m = pat.match(key)
        if m:
            return pattern(m[0]) + ".*"
    return pattern(key)


def _lora_entry(lf, acc) -> dict:
    return {
        "path": lf.path, "format": lf.format, "strength": lf.strength,
        "keys": {"total": len(lf.ckpt.keys()), "applied": len(acc.applied), "ignored": len(acc.ignored),
                 "unmapped": len(acc.unmapped)},
        "ignored": [{"key": k, "rule": r} for k, r in acc.ignored],
        "unmapped": [{"key": k, "reason": r} for k, r in acc.unmapped],
    }


def plan_report(plan: Plan, base: Checkpoint) -> dict:
    m = plan.model
    base_path, base_bytes = base.path, os.path.getsize(base.path)
    added = plan.added_bytes(base.tensors)
    targets = [{"layer": p, "layout": op.layer.layout.value, "method": op.kind.name,
                "from": sorted({f"{plan.loras[c.lora].name}:{c.module}" for c in op.contributions}),
                "adapters": sorted({c.adapter.name for c in op.contributions}), "rank_added": plan.rank_needed(op)}
               for p, op in sorted(plan.ops.items())]
    return {
        "tool": f"qwenlora-merge {__version__}",
        "base": {"path": base_path, "family": m.family.name, "title": m.family.title, "precision": m.precision,
                 "rank": m.rank, "bytes": base_bytes, "layers": len(m.layers)},
        "rank": {"from": m.rank, "to": plan.new_rank, "added_bytes": added,
                 "max_added_by_layer": max((t["rank_added"] for t in targets), default=0)},
        "expected_output_bytes": base_bytes + added,
        "modulation_mode": plan.modulation_mode,
        "loras": [_lora_entry(lf, acc) for lf, acc in zip(plan.loras, plan.accounts)],
        "targets": targets,
        "warnings": list(plan.warnings),
    }


def account_written(rep: dict, plan: Plan, records: list[dict]) -> None:
    """After the merge: the applied keys of a layer that was written unchanged (a modulation layer whose base
    scored best) are not applied; they move to their own outcome, "unchanged", listed with the reason, and a
    warning says so."""
    kept = [rec for rec in records if rec.get("written_unchanged")]
    for rec in kept:
        for contrib in plan.ops[rec["layer"]].contributions:
            lora_file, entry = plan.loras[contrib.lora], rep["loras"][contrib.lora]
            keys = [key for mod in lora_file.modules.values() if mod.name == contrib.module
                    for key in mod.keys.values()]
            applied = set(plan.accounts[contrib.lora].applied)
            listed = {row["key"] for row in entry.setdefault("unchanged", [])}
            moved = [key for key in keys if key in applied and key not in listed]
            reason = f"layer written unchanged: {rec.get('why', 'base kept')}"
            entry["unchanged"] += [{"key": key, "reason": reason} for key in moved]
            entry["keys"]["applied"] -= len(moved)
            entry["keys"]["unchanged"] = len(entry["unchanged"])
    if kept:
        count = sum(entry["keys"].get("unchanged", 0) for entry in rep["loras"])
        rep["warnings"].append(f"{len(kept)} targeted layers were written unchanged (the base scored best on held-out "
                               f"timesteps): their {count} keys are listed as unchanged, not applied")


def summarize_layers(records: list[dict]) -> dict:
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["method"], []).append(r)
    return {kind: by_name(kind).summarize(rs) for kind, rs in by_kind.items()}


def _render_keys(i: int, l: dict, verbose: bool) -> list[str]:
    k = l["keys"]
    unchanged = f", unchanged {k['unchanged']}" if k.get("unchanged") else ""
    lines = [f"lora {i}   {l['path']}  strength {l['strength']:g}  format: {l['format']}",
             f"         keys {k['total']}: applied {k['applied']}{unchanged}, ignored {k['ignored']}, "
             f"unmapped {k['unmapped']}"]
    for what, rows, field in (("unchanged", l.get("unchanged", []), "reason"), ("ignored", l["ignored"], "rule"),
                              ("unmapped", l["unmapped"], "reason")):
        if rows:
            c = Counter(f"{module_pattern(r['key'])}  ({r[field]})" for r in rows)
            shown = c.most_common(None if verbose else 6)
            lines += [f"         {what}: {p}  {n} keys" for p, n in shown]
            if len(c) > len(shown):
                lines.append(f"         ... {len(c) - len(shown)} more {what} patterns (-v or --json lists all)")
    return lines


def _render_plan(rep: dict, verbose: bool) -> list[str]:
    r = rep["rank"]
    if r["to"] != r["from"]:
        lines = [f"rank     {r['from']} -> {r['to']} for every SVDQ layer (largest LoRA rank on one layer "
                 f"{r['max_added_by_layer']}); low-rank branch +{human_bytes(r['added_bytes'])}"]
    else:
        lines = [f"rank     {r['from']} (unchanged)"]
    tcount = Counter(t["method"] for t in rep["targets"])
    lines.append("targets  " + (", ".join(f"{n} {m}" for m, n in sorted(tcount.items())) or "none"))
    if verbose:  # after the merge, each layer's own figures (the truncation by a rank cap among them)
        records = {rec["layer"]: rec for rec in rep.get("layers") or []}
        for target in rep["targets"]:
            name, kind = target["layer"], by_name(target["method"])
            note = kind.render_layer(records[name]) + "  " if name in records else ""
            lines.append(f"         {name}  {kind.name}  +r{target['rank_added']}  {note}"
                         f"<- {', '.join(target['from'])}")
    for kind, d in (rep.get("layers_summary") or {}).items():
        line = by_name(kind).render_summary(d)
        if line:
            lines.append(line)
    return lines


def render(rep: dict, verbose: bool = False) -> str:
    b = rep["base"]
    lines = [f"base     {b['path']}  [{b['title']}, {b['precision'] or 'no SVDQ'}, rank {b['rank']}, "
             f"{human_bytes(b['bytes'])}]"]
    for i, l in enumerate(rep["loras"], 1):
        lines += _render_keys(i, l, verbose)
    lines += _render_plan(rep, verbose)
    lines += [f"warning  {w}" for w in rep.get("warnings", [])]
    if rep.get("dry_run"):
        size = rep["expected_output_bytes"]
        lines.append(f"dry run  nothing written; the output would be {human_bytes(size)} ({size} bytes)")
    elif rep.get("output"):
        how = {"direct": ", direct I/O", "buffered": ""}.get(rep.get("write_mode", ""), "")
        lines.append(f"wrote    {rep['output']} ({human_bytes(rep['output_bytes'])}) in {rep['seconds']:.1f} s{how}")
        if rep.get("device"):
            lines.append(f"device   {rep['device']} ({rep['device_reason']})")
    return "\n".join(lines)


# -- verify -------------------------------------------------------------------------------------------------------
def verify_report(res) -> dict:
    """`verify --json`: the verdict, the settings and LoRAs judged against, per-kind summaries of the layers the
    plan targets (as the merge report summarizes them), the count of untargeted layers, every layer's record."""
    targeted = [rec for rec in res.layers if rec.get("targeted")]
    return {"ok": res.ok, "contract": res.contract, "settings": res.settings, "loras": res.loras,
            "layers_summary": summarize_layers([rec | {"method": rec["kind"]} for rec in targeted]),
            "untargeted": dict(Counter(rec["kind"] for rec in res.layers if not rec.get("targeted"))),
            "layers": res.layers}


def _render_settings(settings: dict | None) -> str:
    if settings is None:
        return ("settings none recorded in the merged file (made by an older version): judged as an exact merge "
                "(no rank cap) with --mod calibrated")
    cap = f"rank cap {settings['max_rank']}" if settings["max_rank"] is not None else "no rank cap"
    return (f"settings as recorded by the merge: {cap}, SVD rank {settings['svd_rank']}, "
            f"modulation {settings['modulation']}")


def _render_verify_loras(loras: list[dict]) -> list[str]:
    lines = []
    for number, lora in enumerate(loras, 1):
        how = "" if lora["found"] == "given" else (f"  (named by the merged file's provenance; found {lora['found']}, "
                                                    f"sha256 matches)")
        lines.append(f"lora {number}   {lora['path']}  strength {lora['strength']:g}{how}")
    return lines


def render_verify(rep: dict, verbose: bool = False) -> str:
    """Verdict first, then what it was judged against, each kind's targeted layers in the merge report's words,
    the untargeted layers; with -v every targeted layer's figures; the failing layers and contract problems."""
    layers = rep["layers"]
    failed = [rec for rec in layers if not rec["ok"]]
    n_target = sum(bool(rec.get("targeted")) for rec in layers)
    untargeted = rep["untargeted"]
    if rep["ok"]:
        head = f"verdict  within tolerance: {count_layers(n_target)} changed as planned"
    else:
        head = (f"verdict  OUT OF TOLERANCE: {count_layers(len(failed))} failing, "
                f"{len(rep['contract'])} loader-contract problems")
    lines = [head, _render_settings(rep["settings"])] + _render_verify_loras(rep["loras"])
    for kind, d in rep["layers_summary"].items():
        line = by_name(kind).render_summary(d)
        lines.append(line or f"fidelity {kind} {count_layers(d['layers'])}")
        if verbose:
            lines += [f"         {rec['layer']}  {by_name(kind).render_layer(rec)}" for rec in layers
                      if rec.get("targeted") and rec["kind"] == kind]
    if untargeted:
        lines.append(f"others   {count_layers(sum(untargeted.values()))} no LoRA targets, checked unchanged ("
                     + ", ".join(f"{kind} {count}" for kind, count in sorted(untargeted.items())) + ")")
    lines += [f"contract  {problem}" for problem in rep["contract"]]
    lines += [f"FAIL      {rec['layer']}: {'; '.join(rec['problems'])}" for rec in failed[:20]]
    if len(failed) > 20:
        lines.append(f"... {len(failed) - 20} more failing layers (--json lists all)")
    return "\n".join(lines)

#!/usr/bin/env python
"""Fidelity of every adapter type on every layer kind, as the merge reports it (the README's table).

    python scripts/adapter_fidelity.py [--svd-rank 64]

Builds the built-in demo checkpoint (converter.demo: 2 blocks, hidden 256, int4, rank 32), writes one LyCORIS
file per adapter type (LoRA, LoKr, LoHa, DoRA, full diff) on a W4A4 layer (attn.to_q, rows of to_qkv), a
16-bit layer (img_in) and a modulation layer (img_mod.1), merges each, and prints a Markdown table of the
figures of the report: W4A4 relative error of the appended branch (exact adapters) or the captured fraction
‖ΔW_k‖/‖ΔW‖ (truncated SVD), the 16-bit layer's error over its bf16 rounding floor, the modulation layer's
e_mod. The tests check these figures against LyCORIS's and PEFT's own ΔW; this script only shows them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from converter.demo import build_base  # noqa: E402

D = 256
MODULES = {"transformer_blocks_0_attn_to_q": (D, D), "img_in": (D, 64), "transformer_blocks_0_img_mod_1": (6 * D, D)}


def _n(g, *shape, std):
    return torch.randn(*shape, generator=g) * std


def adapter(kind: str, o: int, i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Parts of one LyCORIS module with ‖ΔW‖_rms ~ 0.02 (a LoRA-sized update)."""
    r = 8
    if kind == "LoRA":
        return {"lora_down.weight": _n(g, r, i, std=i ** -0.5), "lora_up.weight": _n(g, o, r, std=0.02 / r ** 0.5)}
    if kind == "LoKr":  # w1 4x4 full, w2 rank 8: exact rank 32
        return {"lokr_w1": _n(g, 4, 4, std=1.0), "lokr_w2_a": _n(g, o // 4, r, std=0.02 / r ** 0.5),
                "lokr_w2_b": _n(g, r, i // 4, std=(i // 4) ** -0.5)}
    if kind == "LoHa":  # rank 4 x 4: exact rank 16
        return {"hada_w1_a": _n(g, o, 4, std=0.15), "hada_w1_b": _n(g, 4, i, std=i ** -0.5),
                "hada_w2_a": _n(g, o, 4, std=0.15), "hada_w2_b": _n(g, 4, i, std=i ** -0.5)}
    if kind == "DoRA":  # LoRA + row magnitudes 5 % off the rows' norms (the base's norms are ~1)
        return adapter("LoRA", o, i, g) | {"dora_scale": 1 + _n(g, o, 1, std=0.05)}
    if kind == "full diff":
        return {"diff": _n(g, o, i, std=0.02)}
    raise ValueError(kind)


def figures(rep: dict) -> dict[str, str]:
    out = {}
    for l in rep["layers"]:
        if l["method"] == "lowrank_append" and "rel_error" in l:
            out["w4a4"] = (f"SVD rank {l['rank_added']}: captured {l['captured']:.3f}" if l.get("svd")
                           else f"exact, rank +{l['rank_added']}: rel. error {l['rel_error']:.1e}")
        elif l["method"] == "dense_add":
            out["dense"] = f"{l['rel_error'] / l['rounding_floor']:.2f}x floor, applied {l['applied_fraction']:.4f}"
        elif l["method"] == "modulation":
            out["mod"] = f"e_mod {l['e_mod']:.3f} ({l['action']})"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--svd-rank", default="64")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "svdq-int4_r32-demo.safetensors"
        build_base(str(base))
        for kind in ("LoRA", "LoKr", "LoHa", "DoRA", "full diff"):
            g = torch.Generator().manual_seed(0)
            sd = {f"lycoris_{m}.{k}": v.contiguous().to(torch.bfloat16)
                  for m, (o, i) in MODULES.items() for k, v in adapter(kind, o, i, g).items()}
            lp = Path(tmp) / "a.safetensors"
            save_file(sd, str(lp))
            res = subprocess.run([sys.executable, "-m", "converter.cli", str(base), str(lp), "-o",
                                  str(Path(tmp) / "o.safetensors"), "--overwrite", "--json", "--svd-rank", a.svd_rank],
                                 capture_output=True, text=True, cwd=REPO)
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                return 1
            f = figures(json.loads(res.stdout))
            rows.append(f"| {kind} | {f.get('w4a4', '')} | {f.get('dense', '')} | {f.get('mod', '')} |")
    print("| adapter | W4A4 layer (attn.to_q) | bf16 layer (img_in) | modulation (img_mod.1) |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

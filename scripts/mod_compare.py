#!/usr/bin/env python
"""Compare ways to merge a LoRA into Qwen-Image's AWQ modulation layers, on synthetic layers.

For each case (timestep MLP x layer size) it builds a few synthetic `img_mod.1`-like layers and prints, per
method, the held-out error figure e_mod = ||Y_new - Y_ideal|| / ||Y_ideal - Y_base|| (median / max over the
layers) and the time per layer:

  skip          keep the base layer (1.0 by definition)
  plain         dequant(base) + dW, fresh min/max grid per group, round to nearest (bias + db in bf16)
  biasfold      keep every code, fold the calibration mean of dW x into the bf16 bias (as written)
  biasfold*     the issue's formula ||dY - mean(dY)|| / ||dY|| (mean over the held-out sigmas, no rounding)
  ours          converter.modulation "calibrated" (what `merge_modulation` writes: best of ours/biasfold/skip)

Synthetic model:
  timestep MLP  linear_1 (D x 256), linear_2 (D x D), weights N(0, 1/fan_in), biases N(0, 0.02^2), all bf16.
                "const": linear_2's bias N(0, 1) so that SiLU(temb) has a strong constant part (real models do).
  layer         W (6D x D) ~ N(0, 0.02^2) bf16, quantized with deepcompressor's symmetric scheme (per group of
                64: scale = bf16(max|w| / 7), zero = -7 * scale, codes = clamp(round(w / scale) + 7, 0, 15));
                bias N(0, 0.05^2) with +1 on the scale rows (interleaved rows 6d+1, 6d+4), bf16.
  LoRA          rank cycling over 16 / 32 / 64, ||dW|| / ||W|| cycling over 1 / 2 / 3 %, passed as factors
                (up, down) unless --dense.

Usage:
  python scripts/mod_compare.py                 # small (D=256, 256 -> 1536)
  python scripts/mod_compare.py --full          # also full size (D=3072, 3072 -> 18432)
  python scripts/mod_compare.py --full --only-full --layers 4 --device cuda
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.modulation import (  # noqa: E402
    ModulationCalibration,
    calibration_sigmas,
    evaluation_sigmas,
    merge_modulation,
    modulation_inputs,
)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def timestep_mlp(dim: int, const: bool, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    l1w = torch.randn(dim, 256, generator=g) / math.sqrt(256)
    l1b = torch.randn(dim, generator=g) * 0.02
    l2w = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    l2b = torch.randn(dim, generator=g) * (1.0 if const else 0.02)
    return tuple(t.to(torch.bfloat16) for t in (l1w, l1b, l2w, l2b))


def synthetic_layer(dim: int, rank: int, rel: float, seed: int, group: int = 64):
    """Base AWQ layer (codes, scales, zeros, bias) of shape (6*dim, dim) and a LoRA (up, down)."""
    g = torch.Generator().manual_seed(seed)
    o, i = 6 * dim, dim
    w = bf16(torch.randn(o, i, generator=g) * 0.02)
    wg = w.view(o, i // group, group)
    scales = bf16(wg.abs().amax(-1) / 7).clamp_min(2.0**-30)
    zeros = bf16(-7 * scales)
    codes = (wg / scales[..., None]).round_().add_(7).clamp_(0, 15).to(torch.uint8).view(o, i)
    bias = torch.randn(o, generator=g) * 0.05
    bias[1::6] += 1.0
    bias[4::6] += 1.0
    bias = bf16(bias)
    down = torch.randn(rank, i, generator=g) / math.sqrt(i)
    up = torch.randn(o, rank, generator=g)
    norm_dw = torch.linalg.matrix_norm(up @ down) if o * i <= 4096 * 4096 else _lowrank_norm(up, down)
    up *= rel * float(torch.linalg.matrix_norm(w)) / float(norm_dw)
    return codes, scales, zeros, bias, (up, down)


def _lowrank_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    # ||up @ down||_F^2 = trace((up^T up)(down down^T))
    return math.sqrt(float(((up.T @ up) * (down @ down.T)).sum()))


def run_case(name: str, dim: int, const: bool, args) -> dict:
    dev = torch.device(args.device)
    mlp = timestep_mlp(dim, const, seed=args.seed)
    xc = modulation_inputs(*mlp, calibration_sigmas(args.calib), device=dev)
    xe = modulation_inputs(*mlp, evaluation_sigmas(args.eval, args.calib), device=dev)
    t0 = time.perf_counter()
    cal = ModulationCalibration.build(xc, tail=args.tail, damp=args.damp, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_build = time.perf_counter() - t0
    rows = {k: [] for k in ("plain", "biasfold", "biasfold*", "ours", "written")}
    t_ours, t_plain, changed, actions = [], [], [], []
    cal_cpu = None
    for li in range(args.layers):
        rank = (16, 32, 64)[li % 3]
        rel = (0.01, 0.02, 0.03)[li % 3]
        codes, scales, zeros, bias, lora = synthetic_layer(dim, rank, rel, seed=1000 + 17 * li + args.seed)
        delta = (lora[0] @ lora[1]) if args.dense else lora
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res = merge_modulation(codes, scales, zeros, bias, delta, None, cal, xe, device=dev)
        t_ours.append(res.seconds)
        rows["biasfold"].append(res.e_biasfold)
        rows["biasfold*"].append(res.e_biasfold_ideal)
        rows["ours"].append(res.e_asked)
        rows["written"].append(res.e_mod)
        changed.append(res.codes_changed)
        actions.append(res.action)
        if not args.no_plain:
            rp = merge_modulation(codes, scales, zeros, bias, delta, None, cal, xe, mode="requant", device=dev)
            rows["plain"].append(rp.e_asked)
            t_plain.append(rp.seconds)
        if args.verbose:
            print(f"  layer {li}: rank {rank} |dW|/|W| {rel:.0%}: {res.summary()}")
        if args.compare_devices:
            if cal_cpu is None:
                cal_cpu = ModulationCalibration.build(xc.cpu(), tail=args.tail, damp=args.damp)
            rc = merge_modulation(codes, scales, zeros, bias, delta, None, cal_cpu, xe.cpu())
            diff = float((rc.codes != res.codes).float().mean())
            zdiff = float((rc.zeros != res.zeros).float().mean())
            print(f"  layer {li}: e_mod {dev.type} {res.e_asked:.4f} vs cpu {rc.e_asked:.4f} "
                  f"(|diff| {abs(res.e_asked - rc.e_asked):.4f}); codes differing {100 * diff:.3f}%, "
                  f"zeros differing {100 * zdiff:.3f}%; cpu {rc.seconds:.2f}s, {dev.type} {res.seconds:.2f}s")
    o = 6 * dim
    print(f"\n== {name}: {dim} -> {o}, timestep MLP {'const' if const else 'random'}, {args.layers} layers, "
          f"calib {args.calib} / eval {args.eval} sigmas, device {dev}, tail {args.tail}")
    print(f"   calibration build (once for all layers): {t_build:.2f} s")
    print(f"   {'method':<12}{'e median':>10}{'e max':>9}{'s/layer':>10}")
    print(f"   {'skip':<12}{1.0:>10.3f}{1.0:>9.3f}{0.0:>10.2f}")
    for k in ("plain", "biasfold", "biasfold*", "ours", "written"):
        v = rows[k]
        if not v:
            continue
        t = ""
        if k == "plain":
            t = f"{statistics.median(t_plain):>10.2f}"
        elif k == "ours":
            t = f"{statistics.median(t_ours):>10.2f}"
        print(f"   {k:<12}{statistics.median(v):>10.3f}{max(v):>9.3f}{t}")
    ratio = [a / b for a, b in zip(rows["written"], rows["biasfold*"])]
    bar = statistics.median(ratio) <= 0.9 and max(rows["written"]) <= 1.0
    print(f"   written / biasfold* per layer: median {statistics.median(ratio):.3f}, max {max(ratio):.3f} "
          f"(bar: median <= 0.9 and every layer <= 1.0: {'met' if bar else 'NOT met'})")
    print(f"   codes changed {100 * statistics.median(changed):.1f}% (median); written: {', '.join(actions)}")
    print(f"   120 such layers: about {120 * statistics.median(t_ours) + t_build:.0f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also run the full-size case (3072 -> 18432)")
    ap.add_argument("--only-full", action="store_true", help="skip the small case")
    ap.add_argument("--layers", type=int, default=6, help="layers per case (LoRA rank 16/32/64 and 1/2/3 %% in turn)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib", type=int, default=1025, help="calibration sigmas")
    ap.add_argument("--eval", type=int, default=256, help="held-out sigmas (>= 200)")
    ap.add_argument("--tail", type=int, default=512, help="code columns that may change")
    ap.add_argument("--damp", type=float, default=3e-3)
    ap.add_argument("--mlp", choices=("random", "const", "both"), default="both")
    ap.add_argument("--dense", action="store_true", help="pass dW dense instead of as LoRA factors")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-requantization figure")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--compare-devices", action="store_true",
                    help="with --device cuda: also run each layer on the CPU and compare the results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    mlps = ("random", "const") if args.mlp == "both" else (args.mlp,)
    sizes = []
    if not args.only_full:
        sizes.append(("small", 256))
    if args.full or args.only_full:
        sizes.append(("full", 3072))
    for name, dim in sizes:
        for m in mlps:
            run_case(name, dim, m == "const", args)


if __name__ == "__main__":
    main()

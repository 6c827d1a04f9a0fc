"""Numeric checks of merged checkpoints, independent of the converter's own bookkeeping.

Expected deltas are computed here from the LoRA specs (γ = strength·alpha/rank per original module) and the
builders' target map; the merged layers are evaluated with the CPU reference forward built from the packed
tensors (tests/reference.py, whose codecs are tested bit-exact against deepcompressor).
"""

from __future__ import annotations

import json

import torch

from converter.factors import dense_record
from reference import layer_tensors, svdq_forward
from converter.st_reader import Checkpoint

W4A4_TOL = 1e-2


def gamma(alpha, rank: int, strength: float) -> float:
    return strength * (1.0 if alpha is None else float(alpha) / rank)


def expected_deltas(loras: list[tuple[dict, float]], target_map: dict) -> dict[str, torch.Tensor]:
    """{checkpoint module: ΔW (O, I) fp32 in logical (diffusers) row order}."""
    out: dict[str, torch.Tensor] = {}
    for modules, strength in loras:
        for name, (a, b, alpha) in modules.items():
            target, r0, r1 = target_map[name]
            d = gamma(alpha, a.shape[0], strength) * (b.float() @ a.float())
            if target not in out:
                rows = max(s1 for tt, s0, s1 in target_map.values() if tt == target)
                out[target] = torch.zeros(rows, a.shape[1])
            out[target][r0:r1] += d
    return out


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def check_merged(base_path, out_path, truth: dict, deltas: dict[str, torch.Tensor], *, seed: int = 0,
                 skip_awq: bool = True) -> dict[str, float]:
    """Every layer of `out_path` against `base_path` + `deltas`. Returns {layer: relative error}."""
    g = torch.Generator().manual_seed(seed)
    errs: dict[str, float] = {}
    with Checkpoint(base_path) as base, Checkpoint(out_path) as out:
        assert set(base.keys()) == set(out.keys()), "key sets differ"
        for k in base.keys():
            assert base.tensors[k].dtype == out.tensors[k].dtype, f"dtype of {k} changed"
        touched: set[str] = set()
        for p in truth["svdq"]:
            bt, mt = layer_tensors(base, p), layer_tensors(out, p)
            for part in ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "wcscales", "wtscale"):
                if part in bt:
                    assert _bytes_equal(bt[part], mt[part]), f"{p}.{part} changed"
            touched |= {f"{p}.{x}" for x in mt}
            i = mt["proj_down"].shape[0]
            x = torch.randn(32, i, generator=g)
            dy = svdq_forward(mt, x, act_quant=True) - svdq_forward(bt, x, act_quant=True)
            dw = deltas.get(p)
            if dw is None:
                assert dy.abs().max() <= 1e-4 * (1 + svdq_forward(bt, x).abs().max()), f"{p} changed without a LoRA"
                continue
            want = x @ dw.T
            errs[p] = float((dy - want).norm() / want.norm())
            assert errs[p] < W4A4_TOL, f"{p}: relative error {errs[p]:.3g}"
        for p in truth.get("awq", {}):
            touched |= {f"{p}.{x}" for x in ("qweight", "wscales", "wzeros", "bias")}
        for key in base.keys():
            if key in touched:
                continue
            prefix, _, part = key.rpartition(".")
            dw = deltas.get(prefix)
            a, b = base.get(key), out.get(key)
            if dw is None or part != "weight":
                if part == "bias" and dw is not None:
                    assert _bytes_equal(a, b), f"{key} changed"  # LoRA weight deltas never move a bias
                    continue
                assert _bytes_equal(a, b), f"{key} changed but no LoRA targets it"
                continue
            errs[prefix] = dense_error(a, b, dw, prefix)
    return errs


def dense_error(w_old: torch.Tensor, w_new: torch.Tensor, dw: torch.Tensor, name: str = "") -> float:
    """bf16 W + ΔW: the error must stay within 1.5x the rounding floor and the applied fraction 1 ± 1e-2
    (figures from converter.factors.dense_record, itself checked against a hand computation in test_codecs)."""
    rec = dense_record(w_old, w_new, dw)
    err, floor, frac = rec["rel_error"], rec["rounding_floor"], rec["applied_fraction"]
    assert err <= 1.5 * floor + 1e-7, f"{name}: error {err:.4g} above 1.5x rounding floor {floor:.4g}"
    assert abs(frac - 1) < 1e-2, f"{name}: applied fraction {frac:.4f}"
    return err


def stored_delta(base, out, module) -> tuple[torch.Tensor, torch.Tensor]:
    """The change of a W4A4 layer's map on its runtime input, from the reference forward on the identity:
    (ΔW as stored (O, I), Δbias (O,))."""
    with Checkpoint(base) as b, Checkpoint(out) as m:
        tb, tm = layer_tensors(b, module), layer_tensors(m, module)
    eye = torch.eye(tb["proj_down"].shape[0])
    zero = torch.zeros(1, eye.shape[0])
    db = svdq_forward(tm, zero) - svdq_forward(tb, zero)
    return (svdq_forward(tm, eye) - svdq_forward(tb, eye) - db).T, db[0]


def metadata(path) -> dict[str, str]:
    with Checkpoint(path) as c:
        return c.metadata


def quant_rank(path) -> int:
    return json.loads(metadata(path)["quantization_config"])["rank"]


def run(*args, ok: bool = True):
    """Invoke the CLI in-process with str()-ed arguments; with ok, require exit status 0."""
    from click.testing import CliRunner

    from converter.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res

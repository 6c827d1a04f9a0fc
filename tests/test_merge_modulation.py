"""Modulation layers end to end: interleave, calibrated requantization through the CLI, the report."""

from __future__ import annotations

import json
import platform
import sys

import pytest
import torch

from builders import build_qwen_checkpoint
from checks import check_merged, expected_deltas, run
from loader_emulation import check_loadable
from lora_builders import random_lora_modules, write_lora

from converter.modulation import evaluation_sigmas, modulation_inputs
from reference import awq_forward, layer_tensors
from converter.st_reader import Checkpoint

D = 256
MODS = ("transformer_blocks.0.img_mod.1", "transformer_blocks.0.txt_mod.1", "transformer_blocks.1.img_mod.1")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    p = tmp_path_factory.mktemp("qm") / "base.safetensors"
    return str(p), build_qwen_checkpoint(p, blocks=2, dim=D, rank=32)



def held_out_inputs(path) -> torch.Tensor:
    """x(σ) on held-out σ, computed from the checkpoint's timestep embedder."""
    with Checkpoint(path) as c:
        t = [c.get(f"time_text_embed.timestep_embedder.linear_{i}.{p}") for i in (1, 2) for p in ("weight", "bias")]
    return modulation_inputs(*t, evaluation_sigmas())


def effect_error(base, out, module, dw_diffusers, x) -> float:
    """||ΔY_merged − x·ΔWᵀ|| / ||x·ΔWᵀ|| with the layers' outputs de-interleaved into diffusers order, the way
    Nunchaku's Qwen block reads them: independent of the converter's own permutation."""
    with Checkpoint(base) as b, Checkpoint(out) as m:
        yb = awq_forward(layer_tensors(b, module), x, splits=6)
        ym = awq_forward(layer_tensors(m, module), x, splits=6)
    want = x @ dw_diffusers.T
    return float((ym - yb - want).norm() / want.norm())


@pytest.fixture(scope="module")
def merged(qwen, tmp_path_factory):
    base, truth = qwen
    d = tmp_path_factory.mktemp("qmm")
    mods = random_lora_modules({m: (6 * D, D) for m in MODS}, rank=16, seed=7, scale=0.08)
    mods |= random_lora_modules({"transformer_blocks.0.attn.to_q": (D, D)}, rank=8, seed=8)
    lp = d / "mod.safetensors"
    write_lora(lp, mods, "comfy")
    out = d / "out.safetensors"
    rep = json.loads(run(base, lp, "-o", out, "--json").stdout)
    return base, truth, mods, lp, out, rep


def test_modulation_rows_are_interleaved(merged):
    """The LoRA's effect is visible in diffusers order after Nunchaku's de-interleave; a dropped permutation
    would scramble shift/scale/gate and give an error above 1."""
    base, truth, mods, lp, out, rep = merged
    x = held_out_inputs(base)
    dws = expected_deltas([(mods, 1.0)], truth["target_map"])
    errs = [effect_error(base, out, m, dws[m], x) for m in MODS]
    assert max(errs) < 0.95, errs
    # the same layer read without the de-interleave is not the LoRA's effect
    with Checkpoint(base) as b, Checkpoint(out) as m:
        t0, t1 = layer_tensors(b, MODS[0]), layer_tensors(m, MODS[0])
        dy = awq_forward(t1, x) - awq_forward(t0, x)
    want = x @ dws[MODS[0]].T
    assert float((dy - want).norm() / want.norm()) > 1.0


def test_report_figures_match_independent_check(merged):
    base, truth, mods, lp, out, rep = merged
    layers = {l["layer"]: l for l in rep["layers"] if l["method"] == "modulation"}
    assert set(layers) == set(MODS)
    x = held_out_inputs(base)
    dws = expected_deltas([(mods, 1.0)], truth["target_map"])
    for m, l in layers.items():
        assert l["action"] in ("calibrated", "biasfold", "skip")
        assert l["e_mod"] <= 1.0 and l["e_mod"] <= l["e_biasfold"] + 1e-9
        assert abs(effect_error(base, out, m, dws[m], x) - l["e_mod"]) < 2e-2
    s = rep["layers_summary"]["modulation"]
    assert s["layers"] == 3 and s["e_mod_max"] <= 1.0
    check_merged(base, out, truth, {k: v for k, v in dws.items() if "_mod." not in k})
    check_loadable(out)


def test_calibrated_beats_plain_requant(merged, tmp_path):
    base, truth, mods, lp, out, rep = merged
    x = held_out_inputs(base)
    dws = expected_deltas([(mods, 1.0)], truth["target_map"])
    plain = tmp_path / "plain.safetensors"
    rp = json.loads(run(base, lp, "-o", plain, "--json", "--mod", "requant").stdout)
    for l in rp["layers"]:
        if l["method"] == "modulation":  # plain RTN would be worse than nothing: the bias fold is written instead
            assert l["e_requant"] > 1.0 and l["action"] == "biasfold" and l["e_mod"] == l["e_biasfold"] < 1.0
    cal = sorted(effect_error(base, out, m, dws[m], x) for m in MODS)
    pl = sorted(effect_error(base, plain, m, dws[m], x) for m in MODS)
    assert cal[-1] < pl[0] and pl[-1] < 1.0


def test_skip_and_biasfold_modes(merged, tmp_path):
    base, truth, mods, lp, out, rep = merged
    skip = tmp_path / "skip.safetensors"
    rs = json.loads(run(base, lp, "-o", skip, "--json", "--mod", "skip").stdout)
    assert not [l for l in rs["layers"] if l["method"] == "modulation"]
    assert rs["loras"][0]["keys"]["ignored"] == 2 * len(MODS)
    with Checkpoint(base) as b, Checkpoint(skip) as s:
        for m in MODS:
            for part in ("qweight", "wscales", "wzeros", "bias"):
                assert torch.equal(b.get(f"{m}.{part}").view(torch.uint8), s.get(f"{m}.{part}").view(torch.uint8))
    bf = tmp_path / "bf.safetensors"
    rb = json.loads(run(base, lp, "-o", bf, "--json", "--mod", "biasfold").stdout)
    for l in rb["layers"]:
        if l["method"] == "modulation":
            assert l["action"] in ("biasfold", "skip") and l["codes_changed"] == 0


def test_verify_catches_non_interleaved_modulation(merged, tmp_path):
    """A merge that added the LoRA in diffusers row order (the runtime loader's bug) fails verify."""
    base, truth, mods, lp, out, rep = merged
    run("verify", base, out, lp, "-q")
    from mappings.qwen_image import ModulationInterleave

    orig = ModulationInterleave.to_checkpoint
    try:
        ModulationInterleave.to_checkpoint = lambda self, t: t  # simulate the bug
        bad = tmp_path / "bad.safetensors"
        run(base, lp, "-o", bad, "-q", "--mod", "biasfold")
    finally:
        ModulationInterleave.to_checkpoint = orig
    res = run("verify", base, bad, lp, ok=False)
    assert res.exit_code == 4 and "e_mod" in res.stdout and "img_mod" in res.stdout


def test_modulation_accounting_is_honest(tmp_path):
    """Each modulation layer is computed and reported once; the best scored candidate is written (never the base
    when the bias fold beats it); what was written, and why, is in the text, --json and verify; keys of a layer
    written unchanged are not "applied" but listed as unchanged, with a warning."""
    from converter.demo import build_base, build_lora

    base, lora = tmp_path / "base.safetensors", tmp_path / "lora.safetensors"
    build_base(str(base))
    build_lora(str(lora))
    out = tmp_path / "requant.safetensors"
    rep = json.loads(run(base, f"{lora}:0.8", "-o", out, "--json", "--mod", "requant").stdout)
    mods = [l for l in rep["layers"] if l["method"] == "modulation"]
    targets = [t["layer"] for t in rep["targets"] if t["method"] == "modulation"]
    assert sorted(l["layer"] for l in mods) == sorted(targets) and len(targets) == 4  # once each
    for l in mods:
        assert l["e_requant"] > 1.0 > l["e_biasfold"]
        assert l["action"] == "biasfold" and l["e_mod"] == l["e_biasfold"] and not l["written_unchanged"]
        assert l["why"].startswith("bias fold") and "requant" in l["why"]
    assert rep["layers_summary"]["modulation"]["actions"] == {"biasfold": 4}
    assert rep["loras"][0]["keys"]["applied"] == 51 and "unchanged" not in rep["loras"][0]["keys"]
    text = run(base, f"{lora}:0.8", "-o", tmp_path / "t.safetensors", "--mod", "requant").stdout
    assert "fidelity modulation 4 layers (asked requant; wrote bias fold 4)" in text
    ver = run("verify", base, out, f"{lora}:0.8", "--json")
    assert {l["action"] for l in json.loads(ver.stdout)["layers"] if l["kind"] == "modulation"} == {"biasfold"}
    assert "fidelity modulation 4 layers (asked requant; wrote bias fold 4)" in run("verify", base, out,
                                                                                     f"{lora}:0.8").stdout

    tiny = tmp_path / "tiny.safetensors"  # a LoRA too weak to move anything: some layers keep the base
    rep = json.loads(run(base, f"{lora}:0.000001", "-o", tiny, "--json").stdout)
    kept = [l["layer"] for l in rep["layers"] if l["method"] == "modulation" and l["action"] == "skip"]
    assert kept and all(l["written_unchanged"] == (l["layer"] in kept) for l in rep["layers"] if "action" in l)
    entry = rep["loras"][0]
    assert entry["keys"]["unchanged"] == 3 * len(kept) == len(entry["unchanged"])  # lora_down, lora_up, alpha
    assert entry["keys"]["applied"] == 51 - 3 * len(kept)
    assert all("layer written unchanged: base kept" in u["reason"] for u in entry["unchanged"])
    assert any(f"{len(kept)} targeted layers were written unchanged" in w for w in rep["warnings"])
    with Checkpoint(base) as b, Checkpoint(tiny) as m:
        for layer in kept:
            for part in ("qweight", "wscales", "wzeros", "bias"):
                assert torch.equal(b.get(f"{layer}.{part}").view(torch.uint8), m.get(f"{layer}.{part}").view(torch.uint8))


@pytest.mark.parametrize("part, bad", [("zeros", float("nan")), ("bias", float("inf")), ("scales", -float("inf"))])
def test_non_finite_results_are_refused(qwen, tmp_path, monkeypatch, part, bad):
    """A modulation result that is not finite (NaN, ±inf) ends the merge with a MergeError naming the tensor and
    no output, never a written file."""
    from converter import api
    from converter import modulation
    from converter.errors import MergeError

    base, _ = qwen
    mods = random_lora_modules({MODS[0]: (6 * D, D)}, rank=8, seed=9, scale=0.08)
    lp = tmp_path / "mod.safetensors"
    write_lora(lp, mods, "comfy")
    real = modulation.merge_modulation

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        getattr(res, part).view(-1)[3] = bad
        return res

    monkeypatch.setattr(modulation, "merge_modulation", broken)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match=f"non-finite values in {MODS[0]}"):
        api.merge(base, [str(lp)], out)
    assert not out.exists()


def test_a_failed_rounding_factorization_is_refused(qwen, tmp_path, monkeypatch):
    """The rounding plan's factorization is not checked where it is made (on a GPU that would wait for the
    device): should it fail, the merge still ends with a MergeError and no output, never NaN codes on disk."""
    from converter import api
    from converter.errors import MergeError

    base, _ = qwen
    lp = tmp_path / "mod.safetensors"
    write_lora(lp, random_lora_modules({MODS[0]: (6 * D, D)}, rank=8, seed=9, scale=0.08), "comfy")
    real = torch.linalg.cholesky_ex

    def failing(a, **kwargs):
        lr, info = real(a, **kwargs)
        return lr, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match="calibrated rounding of a modulation layer failed"):
        api.merge(base, [str(lp)], out)
    assert not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_settings_are_accepted():
    """glibc takes the heap settings the merge relies on for its memory (mallopt answers 0 for a parameter or
    value it refuses): freed memory kept for the next layer, one heap for all threads."""
    from converter.layers.base import keep_freed_memory, one_heap

    assert one_heap() and keep_freed_memory()

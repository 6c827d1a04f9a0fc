"""LoKr, LoHa, DoRA and full diffs, per layer kind (W4A4 int4 / nvfp4, bf16, modulation) and key school.

The expected ΔW always comes from LyCORIS's or PEFT's own reconstruction (tests/adapter_oracles.py), never
from our parser; the merged layers are read back with the CPU reference forward.
"""

from __future__ import annotations

import json

import pytest
import torch

import adapter_oracles as O
from builders import build_qwen_checkpoint, build_zimage_checkpoint
from checks import dense_error, run, stored_delta
from converter.st_reader import Checkpoint
from lora_builders import random_lora_modules, write_lora

D = 256
W4A4 = {"transformer_blocks.0.attn.to_q": (D, D), "transformer_blocks.0.img_mlp.net.0.proj": (4 * D, D),
        "transformer_blocks.0.img_mlp.net.2": (D, 4 * D)}
DENSE = {"img_in": (D, 64), "txt_in": (D, D), "proj_out": (64, D)}
MOD = "transformer_blocks.0.img_mod.1"


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def qwen(request, tmp_path_factory):
    p = tmp_path_factory.mktemp("adapters") / f"svdq-{request.param}_r32-qwen.safetensors"
    return str(p), build_qwen_checkpoint(p, blocks=1, dim=D, rank=32, precision=request.param, seed=6)


def expected(*args, **kw) -> torch.Tensor:
    """The reference library's ΔW (float64), detached from its autograd graph."""
    return O.expected_delta(*args, **kw).detach()


def rows_of(module: str, truth) -> tuple[str, slice]:
    target, r0, r1 = truth["target_map"][module]
    return target, slice(r0, r1)


def base_weight(truth, module: str) -> torch.Tensor:
    """The weight the tool sees as the layer's base (DoRA normalises it): bf16 weight, or the W4A4 layer's
    effective map on its input (builder truth), in the module's own rows."""
    target, rows = rows_of(module, truth)
    if target in truth["svdq"]:
        return truth["svdq"][target]["w_eff"][rows].double()
    return truth["dense"][f"{module}.weight"].double()


def w4a4_error(base, out, truth, module, dw) -> float:
    target, rows = rows_of(module, truth)
    got, _ = stored_delta(base, out, target)
    return float((got[rows].double() - dw).norm() / dw.norm())


def merge_json(base, lp, out, *extra) -> dict:
    return json.loads(run(base, lp, "-o", out, "--json", "--overwrite", *extra).stdout)


# -------------------------------------------------------------------------------------- exact on W4A4
@pytest.mark.parametrize("school", ["lycoris-kohya", "lycoris-prefix", "comfy", "diffusers", "peft"])
def test_lokr_and_loha_are_exact_on_w4a4(qwen, tmp_path, school):
    base, truth = qwen
    # one PEFT config covers a file: one layout (decompose_both) for all its modules
    layouts = ["both_lowrank"] * 3 if school == "peft" else ["w1_full+w2_lowrank", "both_lowrank", "w1_full+w2_lowrank"]
    specs = {m: O.random_lokr(*shape, layout=lay, rank=4, seed=i, alpha=2.0 if school != "peft" else None)
             for i, ((m, shape), lay) in enumerate(zip(W4A4.items(), layouts))}
    loha = {"transformer_blocks.0.attn.to_k": O.random_loha(D, D, rank=4, seed=9)}
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]  # PEFT: one adapter type a file
    O.write_adapter_file(files[0], specs, school)
    O.write_adapter_file(files[1], loha, school)
    specs |= loha
    out = tmp_path / "o.safetensors"
    rep = json.loads(run(base, *files, "-o", out, "--json").stdout)
    for lr in rep["outputs"][0]["loras"] if "outputs" in rep else rep["loras"]:
        assert lr["keys"]["unmapped"] == 0 and lr["keys"]["ignored"] == 0
    assert all(not t.get("svd") for t in rep["layers"])
    for m, spec in specs.items():
        err = w4a4_error(base, out, truth, m, expected(spec))
        assert err <= 1e-2, (m, err)
    if school == "peft":  # the PEFT files as PEFT itself reads them back
        for f, group in zip(files, (dict(specs), loha)):
            group = {m: sp for m, sp in group.items() if m not in loha or f == files[1]}
            for m, dw in O.peft_deltas_from_file(f, {m: sp.shape for m, sp in group.items()}, {}).items():
                assert w4a4_error(base, out, truth, m, dw) <= 1e-2
    run("verify", base, out, *files, "-q")


def test_loha_rank_is_the_product_and_lokr_kron_rank(qwen, tmp_path):
    base, truth = qwen
    specs = {"transformer_blocks.0.attn.to_v": O.random_loha(D, D, rank=4, seed=1),
             "transformer_blocks.0.img_mlp.net.2": O.random_lokr(D, 4 * D, rank=4, seed=2)}
    lp = tmp_path / "a.safetensors"
    O.write_adapter_file(lp, specs, "lycoris-kohya")
    rep = merge_json(base, lp, tmp_path / "o.safetensors", "--dry-run")
    added = {t["layer"]: t["rank_added"] for t in rep["targets"]}
    w1 = specs["transformer_blocks.0.img_mlp.net.2"].w1_shape
    assert added["transformer_blocks.0.attn.to_qkv"] == 16  # r1·r2
    assert added["transformer_blocks.0.img_mlp.net.2"] == min(w1) * 4  # rank(w1 full)·rank(w2)


# ------------------------------------------------------------------------------------- dense layers
@pytest.mark.parametrize("kind", ["lycoris-dora-row", "lycoris-dora-col", "peft-dora", "lokr-dora", "loha", "lokr"])
def test_every_adapter_is_exact_on_bf16_layers(qwen, tmp_path, kind):
    base, truth = qwen
    specs = {}
    for i, (m, (o, n)) in enumerate(DENSE.items()):
        w0 = base_weight(truth, m)
        specs[m] = {
            "lycoris-dora-row": lambda: O.random_lora_dora(o, n, rank=4, base_weight=w0, seed=i),
            "lycoris-dora-col": lambda: O.random_lora_dora(o, n, rank=4, base_weight=w0, wd_on_out=False, seed=i),
            "peft-dora": lambda: O.random_peft_dora(o, n, rank=4, base_weight=w0, seed=i),
            "lokr-dora": lambda: O.random_lokr(o, n, rank=2, seed=i, dora_base_weight=w0.float()),
            "loha": lambda: O.random_loha(o, n, rank=4, seed=i),
            "lokr": lambda: O.random_lokr(o, n, layout="both_lowrank", rank=2, seed=i),
        }[kind]()
    lp = tmp_path / "a.safetensors"
    O.write_adapter_file(lp, specs, "peft" if kind == "peft-dora" else "lycoris-prefix")
    out = tmp_path / "o.safetensors"
    run(base, f"{lp}:0.7", "-o", out, "-q")
    with Checkpoint(base) as b, Checkpoint(out) as m_:
        for m, spec in specs.items():
            lib = "peft" if kind == "peft-dora" else "auto"
            dw = expected(spec, base_weight(truth, m), library=lib, multiplier=0.7)
            dense_error(b.get(f"{m}.weight"), m_.get(f"{m}.weight"), dw.float(), m)
    run("verify", base, out, f"{lp}:0.7", "-q")


# --------------------------------------------------------------------------- not low-rank on W4A4 layers
def test_full_diff_on_w4a4_reports_the_captured_fraction(qwen, tmp_path):
    """A full diff goes in by truncated SVD: the captured fraction the report gives equals the one measured
    from the merged file (±1e-3) and the best any rank-k approximation captures (numpy's SVD)."""
    import numpy as np

    base, truth = qwen
    specs = {m: O.random_full_diff(*shape, bias=False, seed=i) for i, (m, shape) in enumerate(W4A4.items())}
    lp = tmp_path / "d.safetensors"
    O.write_adapter_file(lp, specs, "comfy")
    out = tmp_path / "o.safetensors"
    rep = merge_json(base, lp, out, "--svd-rank", "48")
    layers = {l["layer"]: l for l in rep["layers"] if l.get("svd")}
    assert rep["rank"]["to"] == 32 + 48 and len(layers) == 3
    for m, spec in specs.items():
        target, rows = rows_of(m, truth)
        dw = expected(spec)
        full = torch.zeros(truth["svdq"][target]["w_eff"].shape, dtype=torch.float64)
        full[rows] = dw
        got, _ = stored_delta(base, out, target)
        measured = float(got.double().norm() / full.norm())
        sv = np.linalg.svd(full.numpy(), compute_uv=False)
        best = float(np.sqrt((sv[:48] ** 2).sum() / (sv ** 2).sum()))
        assert abs(layers[target]["captured"] - measured) <= 1e-3, (m, layers[target]["captured"], measured)
        assert abs(layers[target]["captured"] - best) <= 1e-3
    out_v = json.loads(run("verify", base, out, lp, "--json").stdout)
    assert out_v["ok"] and all(abs(l["captured"] - layers[l["layer"]]["captured"]) <= 1e-3
                               for l in out_v["layers"] if l.get("svd"))


def test_dora_on_w4a4_goes_in_by_svd_against_the_dequantized_base(qwen, tmp_path):
    base, truth = qwen
    m = "transformer_blocks.0.img_mlp.net.2"
    spec = O.random_peft_dora(D, 4 * D, rank=4, base_weight=base_weight(truth, m), seed=3)
    lp = tmp_path / "d.safetensors"
    O.write_adapter_file(lp, {m: spec}, "peft")
    out = tmp_path / "o.safetensors"
    rep = merge_json(base, lp, out, "--svd-rank", "128")
    layer = next(l for l in rep["layers"] if l["layer"] == m)
    dw = expected(spec, base_weight(truth, m), library="peft")
    got, _ = stored_delta(base, out, m)
    measured = float(got.double().norm() / dw.norm())
    assert layer["svd"] and abs(layer["captured"] - measured) <= 1e-3
    assert abs(1 - float((got.double() * dw).sum() / (dw * dw).sum()) / measured ** 2) < 0.05


def test_over_large_lokr_goes_in_by_svd(tmp_path):
    """ai-toolkit's Z-Image LoKr: both factors full, alpha 9999999999 (ignored), exact rank above half the
    layer: stored by truncated SVD with its captured fraction."""
    p = tmp_path / "svdq-int4_r32-z.safetensors"
    build_zimage_checkpoint(p, layers=1, dim=384, rank=32, seed=2)
    specs = {"layers.0.attention.to_q": O.random_lokr(384, 384, layout="both_full", seed=1),
             "layers.0.feed_forward.w2": O.random_lokr(384, 1024, layout="w1_full+w2_lowrank", rank=4, alpha=4.0,
                                                         seed=2)}
    lp = tmp_path / "ai.safetensors"
    O.write_adapter_file(lp, specs, "ai-toolkit-zimage-lokr")
    rep = merge_json(p, lp, tmp_path / "o.safetensors")
    by = {l["layer"]: l for l in rep["layers"]}
    assert by["layers.0.attention.to_qkv"].get("svd") and not by["layers.0.feed_forward.net.2"].get("svd")
    dw = expected(specs["layers.0.feed_forward.w2"])
    got, _ = stored_delta(p, tmp_path / "o.safetensors", "layers.0.feed_forward.net.2")
    assert float((got.double() - dw).norm() / dw.norm()) <= 1e-2
    assert "LoKr" in rep["loras"][0]["format"]
    run("verify", p, tmp_path / "o.safetensors", lp, "-q")


# -------------------------------------------------------------------------------------- modulation
def test_modulation_takes_lokr_and_dora(qwen, tmp_path):
    """The modulation layer takes any adapter as ΔW (rows interleaved), requantized; never worse than skip."""
    from test_merge_modulation import effect_error, held_out_inputs

    base, truth = qwen
    w0 = truth["awq"][MOD]["w_deq"].double()
    for spec in (O.random_lokr(6 * D, D, rank=4, seed=4, target_rms=0.05),
                 O.random_lora_dora(6 * D, D, rank=8, base_weight=w0, seed=5, target_rms=0.05)):
        lp = tmp_path / "m.safetensors"
        O.write_adapter_file(lp, {MOD: spec}, "lycoris-kohya")
        out = tmp_path / "o.safetensors"
        rep = merge_json(base, lp, out)
        rec = next(l for l in rep["layers"] if l["layer"] == MOD)
        dw = expected(spec, w0).float()
        err = effect_error(base, out, MOD, dw, held_out_inputs(base))
        assert rec["e_mod"] <= 1.0 and abs(err - rec["e_mod"]) < 2e-2, (err, rec)


# ------------------------------------------------------------------------------ formats and accounting
def test_a_file_mixing_lora_and_lokr_merges_both(qwen, tmp_path):
    base, truth = qwen
    lokr = O.random_lokr(D, D, rank=4, seed=1)
    lp = tmp_path / "mix.safetensors"
    sd = O.write_adapter_file(tmp_path / "k.safetensors", {"transformer_blocks.0.attn.to_q": lokr}, "lycoris-kohya")
    mods = random_lora_modules({"transformer_blocks.0.attn.to_k": (D, D)}, rank=4, seed=2, alpha=2.0)
    write_lora(lp, mods, "kohya", extra=sd | {"lora_te1_encoder_x.lora_down.weight": torch.zeros(4, 8)})
    rep = merge_json(base, lp, tmp_path / "o.safetensors")
    k = rep["loras"][0]["keys"]
    assert k == {"total": len(sd) + 4, "applied": len(sd) + 3, "ignored": 1, "unmapped": 0}
    assert sorted(rep["targets"][0]["adapters"]) == ["lokr", "lora"]
    got, _ = stored_delta(base, tmp_path / "o.safetensors", "transformer_blocks.0.attn.to_qkv")
    a, b, alpha = mods["transformer_blocks.0.attn.to_k"]
    want_k = (alpha / 4) * (b.double() @ a.double())
    assert float((got[D:2 * D].double() - want_k).norm() / want_k.norm()) <= 1e-2
    assert float((got[:D].double() - expected(lokr)).norm() / expected(lokr).norm()) <= 1e-2


def test_dot_format_and_qwen3_text_encoder_keys(tmp_path):
    """`….lora.down.weight` with dotted module names (`attn.to.q`), and Z-Image's `lora_qwen3-…` text-encoder
    keys (ignored by rule, listed)."""
    p = tmp_path / "z.safetensors"
    build_zimage_checkpoint(p, layers=1, dim=384, rank=32, seed=1)
    g = torch.Generator().manual_seed(0)
    t = {"layers.0.attention.to.q.lora.down.weight": torch.randn(4, 384, generator=g) * 0.02,
         "layers.0.attention.to.q.lora.up.weight": torch.randn(384, 4, generator=g) * 0.02,
         "lora_qwen3-model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(4, 8)}
    lp = tmp_path / "dot.safetensors"
    from safetensors.torch import save_file

    save_file(t, str(lp))
    rep = merge_json(p, lp, tmp_path / "o.safetensors")
    assert rep["loras"][0]["keys"] == {"total": 3, "applied": 2, "ignored": 1, "unmapped": 0}
    assert "text-encoder" in rep["loras"][0]["ignored"][0]["rule"]
    got, _ = stored_delta(p, tmp_path / "o.safetensors", "layers.0.attention.to_qkv")
    want = t["layers.0.attention.to.q.lora.up.weight"].double() @ t["layers.0.attention.to.q.lora.down.weight"].double()
    assert float((got[:384].double() - want).norm() / want.norm()) <= 1e-2


@pytest.mark.parametrize("case, message", [
    ("lokr_shapes", "inconsistent factor shapes"),
    ("lokr_missing", "needs lokr_w2"),
    ("dora_length", "DoRA magnitude of shape"),
    ("lokr_tucker", "Tucker core (lokr_t2)"),
    ("loha_tucker", "Tucker core (hada_t1)"),
    ("dora_alone", "no weight updates"),
])
def test_bad_adapters_get_one_clear_line(qwen, tmp_path, case, message):
    base, truth = qwen
    m = "lycoris_transformer_blocks_0_attn_to_q"
    bad = {
        "lokr_shapes": {f"{m}.lokr_w1": torch.ones(4, 4), f"{m}.lokr_w2_a": torch.ones(64, 4),
                        f"{m}.lokr_w2_b": torch.ones(8, 64)},
        "lokr_missing": {f"{m}.lokr_w1": torch.ones(4, 4)},
        "dora_length": {f"{m}.lora_down.weight": torch.ones(4, D), f"{m}.lora_up.weight": torch.ones(D, 4),
                        f"{m}.dora_scale": torch.ones(D + 1, 1)},
        "lokr_tucker": {f"{m}.lokr_w1": torch.ones(4, 4), f"{m}.lokr_w2_a": torch.ones(4, 64),
                        f"{m}.lokr_w2_b": torch.ones(4, 64), f"{m}.lokr_t2": torch.ones(4, 4, 3, 3)},
        "loha_tucker": {f"{m}.hada_w1_a": torch.ones(4, 4), f"{m}.hada_w1_b": torch.ones(4, D),
                        f"{m}.hada_w2_a": torch.ones(4, 4), f"{m}.hada_w2_b": torch.ones(4, D),
                        f"{m}.hada_t1": torch.ones(4, 4, 3, 3)},
        "dora_alone": {f"{m}.dora_scale": torch.ones(D, 1)},
    }[case]
    from safetensors.torch import save_file

    lp = tmp_path / "bad.safetensors"
    save_file(bad, str(lp))
    res = run(base, lp, "-o", tmp_path / "o.safetensors", ok=False)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: bad.safetensors"), res.stderr
    assert message in lines[0] and not (tmp_path / "o.safetensors").exists()


def test_absurd_rank_is_refused_before_writing(qwen, tmp_path):
    """LoHa rank 11 on q/k/v: exact rank 121 a module, 363 on the fused layer; three such files stacked ask for
    32 + 1089, above the kernel's 1024: the dry run already refuses, pointing at --max-rank, which then truncates
    (reported per layer). (Three different files: one file named three times is merged once.)"""
    base, truth = qwen
    paths = []
    for n in range(3):
        specs = {f"transformer_blocks.0.attn.{m}": O.random_loha(D, D, rank=11, seed=3 * n + i)
                 for i, m in enumerate(("to_q", "to_k", "to_v"))}
        paths.append(tmp_path / f"big{n}.safetensors")
        O.write_adapter_file(paths[-1], specs, "lycoris-prefix")
    lp = paths[0]
    rep = merge_json(base, lp, tmp_path / "o.safetensors", "--dry-run")
    assert rep["rank"]["to"] == 32 + 368 and rep["rank"]["added_bytes"] > 0  # the cost, before anything is written
    for args in ((*paths, "--dry-run"), paths):
        res = run(base, *args, "-o", tmp_path / "o.safetensors", ok=False)
        assert res.exit_code == 2 and "--max-rank" in res.stderr and "1024" in res.stderr
        assert not (tmp_path / "o.safetensors").exists()
    rep = json.loads(run(base, *paths, "-o", tmp_path / "o.safetensors", "--max-rank", "256", "--json").stdout)
    assert rep["rank"]["to"] == 256
    qkv = next(l for l in rep["layers"] if l["layer"] == "transformer_blocks.0.attn.to_qkv")
    assert qkv["rank_kept"] == 256 - 32 and 0 < qkv["truncation_error"] < 1


def test_peft_folder_without_metadata_takes_alpha_from_adapter_config(qwen, tmp_path):
    """PEFT's save_pretrained: adapter_model.safetensors without alpha, adapter_config.json beside it."""
    base, truth = qwen
    specs = {m: O.random_lokr(*shape, layout="both_lowrank", rank=4, alpha=3.0, seed=i)
             for i, (m, shape) in enumerate(list(W4A4.items())[:2])}
    folder = tmp_path / "peft"
    folder.mkdir()
    lp = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    O.write_adapter_file(lp, specs, "peft")
    save_file(load_file(str(lp)), str(lp))  # the same tensors, without the lora_adapter_metadata key
    out = tmp_path / "o.safetensors"
    run(base, lp, "-o", out, "-q")  # without the config: scale 1 (alpha = r), not what PEFT applies
    m0 = next(iter(specs))
    assert w4a4_error(base, out, truth, m0, expected(specs[m0])) > 0.1
    O.write_peft_config(folder, specs)
    run(base, lp, "-o", out, "-q", "--overwrite")
    for m, spec in specs.items():
        assert w4a4_error(base, out, truth, m, expected(spec)) <= 1e-2

"""End-to-end merges into small Qwen-Image checkpoints built with deepcompressor's packers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from builders import build_qwen_checkpoint
from checks import check_merged, expected_deltas, metadata, quant_rank, run, stored_delta
from loader_emulation import check_loadable
from lora_builders import FORMATS, random_lora_modules, write_lora


D = 256


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    p = tmp_path_factory.mktemp("qwen") / "svdq-int4_r32-qwen-image-tiny.safetensors"
    return str(p), build_qwen_checkpoint(p, blocks=2, dim=D, rank=32)


@pytest.fixture(scope="module")
def qwen_fp4(tmp_path_factory):
    p = tmp_path_factory.mktemp("qwenfp4") / "svdq-fp4_r32-qwen-image-tiny.safetensors"
    return str(p), build_qwen_checkpoint(p, blocks=1, dim=D, rank=32, precision="nvfp4")



def report(res) -> dict:
    return json.loads(res.stdout)


def non_mod_targets(truth) -> dict:
    return {k: v for k, v in truth["lora_targets"].items() if "_mod." not in k}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_merges_exactly(qwen, tmp_path, fmt):
    base, truth = qwen
    alpha = 8.0 if fmt in ("lightx2v", "kohya", "lycoris") else None
    mods = random_lora_modules(non_mod_targets(truth), rank=16, seed=1, alpha=alpha)
    lp = tmp_path / f"{fmt}.safetensors"
    write_lora(lp, mods, fmt)
    out = tmp_path / "out.safetensors"
    rep = report(run(base, f"{lp}:0.8", "-o", out, "--json"))
    acc = rep["loras"][0]["keys"]
    assert acc["unmapped"] == 0 and acc["applied"] == acc["total"], acc
    errs = check_merged(base, out, truth, expected_deltas([(mods, 0.8)], truth["target_map"]))
    # the report measures against the exact (fp32) LoRA: scaling by 0.8 must show as bf16 rounding, not 0
    low = [l["rel_error"] for l in rep["layers"] if l["method"] == "lowrank_append"]
    assert low and all(1e-5 < e < 1e-2 for e in low), low
    assert len(errs) == len({t for t, _, _ in (truth["target_map"][m] for m in mods)})
    check_loadable(out)
    assert quant_rank(out) == rep["rank"]["to"] == 32 + 48  # separate q/k/v A's: 3 x 16 on to_qkv


def test_detected_formats(qwen, tmp_path):
    base, truth = qwen
    mods = random_lora_modules({"img_in": (D, 64)}, rank=4, seed=0)
    seen = {}
    for fmt in FORMATS:
        lp = tmp_path / f"{fmt}.safetensors"
        write_lora(lp, mods, fmt)
        seen[fmt] = report(run(base, lp, "--dry-run", "--json"))["loras"][0]["format"]
    assert "kohya" in seen["kohya"] and "LyCORIS" in seen["lycoris"] and "ComfyUI" in seen["comfy"]
    assert "PEFT" in seen["peft_raw"] and "default" in seen["peft_adapter"] and "lightx2v" in seen["lightx2v"]
    assert "transformer." in seen["transformer"] and "diffusers" in seen["diffusers"]


def test_multiple_loras_with_strengths_stack(qwen, tmp_path):
    base, truth = qwen
    t = non_mod_targets(truth)
    m1 = random_lora_modules(t, rank=16, seed=2, alpha=4.0)
    m2 = random_lora_modules({k: v for k, v in t.items() if "blocks.1" in k}, rank=32, seed=3)
    write_lora(tmp_path / "a.safetensors", m1, "kohya")
    write_lora(tmp_path / "b.safetensors", m2, "diffusers")
    out = tmp_path / "out.safetensors"
    rep = report(run(base, f"{tmp_path / 'a.safetensors'}:0.7", f"{tmp_path / 'b.safetensors'}:-1.25", "-o", out, "--json"))
    check_merged(base, out, truth, expected_deltas([(m1, 0.7), (m2, -1.25)], truth["target_map"]))
    assert rep["rank"]["to"] == 32 + 48 + 96
    check_loadable(out)
    prov = json.loads(metadata(out)["qwenlora_merge"])
    assert [l["strength"] for l in prov["loras"]] == [0.7, -1.25]
    assert all(len(l["sha256"]) == 64 for l in prov["loras"])


def test_qkv_different_alphas_missing_k_and_shared_a(qwen, tmp_path):
    base, truth = qwen
    g = torch.Generator().manual_seed(5)
    A = lambda r: (torch.randn(r, D, generator=g) * 0.05).bfloat16()
    B = lambda r: (torch.randn(D, r, generator=g) * 0.05).bfloat16()
    shared = A(16)
    mods = {
        # block 0: q and v only (k missing), different ranks and alphas -> alpha/rank per original module
        "transformer_blocks.0.attn.to_q": (A(8), B(8), 4.0),
        "transformer_blocks.0.attn.to_v": (A(16), B(16), 32.0),
        # block 1: one A shared by q/k/v (appended once: rank 16, not 48)
        "transformer_blocks.1.attn.add_q_proj": (shared, B(16), None),
        "transformer_blocks.1.attn.add_k_proj": (shared.clone(), B(16), None),
        "transformer_blocks.1.attn.add_v_proj": (shared.clone(), B(16), None),
    }
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "lightx2v")
    out = tmp_path / "out.safetensors"
    rep = report(run(base, lp, "-o", out, "--json"))
    check_merged(base, out, truth, expected_deltas([(mods, 1.0)], truth["target_map"]))
    added = {t["layer"]: t["rank_added"] for t in rep["targets"]}
    assert added["transformer_blocks.0.attn.to_qkv"] == 24
    assert added["transformer_blocks.1.attn.add_qkv_proj"] == 16
    assert rep["rank"]["to"] == 32 + 32  # 24 rounded up to a multiple of 16
    check_loadable(out)


def test_bias_and_norm_deltas(qwen, tmp_path):
    base, truth = qwen
    g = torch.Generator().manual_seed(9)
    extra = {
        "transformer_blocks.0.attn.to_k.diff_b": torch.randn(D, generator=g) * 0.05,
        "transformer_blocks.0.attn.to_out.0.diff_b": torch.randn(D, generator=g) * 0.05,
        "proj_out.diff_b": torch.randn(64, generator=g) * 0.05,
        "transformer_blocks.1.attn.norm_q.diff": torch.randn(128, generator=g) * 0.05,
        "img_in.diff": torch.randn(D, 64, generator=g) * 0.01,
    }
    lp = tmp_path / "l.safetensors"
    write_lora(lp, {}, "diffusers", extra=extra)
    out = tmp_path / "out.safetensors"
    rep = report(run(base, f"{lp}:0.5", "-o", out, "--json"))
    assert rep["loras"][0]["keys"]["applied"] == len(extra)
    from converter.codecs.svdq_scales import PackedVector
    from converter.st_reader import Checkpoint

    with Checkpoint(base) as b, Checkpoint(out) as m:
        for key, delta in extra.items():
            mod, part = key.rsplit(".", 1)
            if mod.endswith("to_k"):
                tgt, rows = "transformer_blocks.0.attn.to_qkv.bias", slice(D, 2 * D)
            else:
                tgt, rows = mod + (".bias" if part == "diff_b" else ".weight"), slice(None)
            old, new = b.get(tgt), m.get(tgt)
            if tgt.endswith("to_qkv.bias") or tgt.endswith("to_out.0.bias"):
                old, new = PackedVector.unpack(old), PackedVector.unpack(new)  # SVDQ bias is pack_scale ordered
                full = torch.zeros_like(old, dtype=torch.float32)
                full[rows] = 0.5 * delta
                torch.testing.assert_close(new.float(), (old.float() + full).bfloat16().float())
            else:
                torch.testing.assert_close(new.float(), (old.float() + 0.5 * delta).to(old.dtype).float())
    assert rep["rank"]["to"] == 32  # no low-rank change: rank stays
    check_loadable(out)


def test_nvfp4_merges_exactly(qwen_fp4, tmp_path):
    base, truth = qwen_fp4
    mods = random_lora_modules(non_mod_targets(truth), rank=16, seed=4)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "comfy")
    out = tmp_path / "svdq-fp4_r80-x.safetensors"
    rep = report(run(base, lp, "-o", out, "--json"))
    assert rep["base"]["precision"] == "nvfp4" and not rep["warnings"]
    check_merged(base, out, truth, expected_deltas([(mods, 1.0)], truth["target_map"]))
    check_loadable(out)


def test_metadata_copied_verbatim_except_rank(qwen, tmp_path):
    base, truth = qwen
    mods = random_lora_modules({"transformer_blocks.0.img_mlp.net.0.proj": (4 * D, D)}, rank=16, seed=0)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "diffusers")
    out = tmp_path / "o.safetensors"
    run(base, lp, "-o", out, "-q")
    mb, mo = metadata(base), metadata(out)
    assert set(mo) == set(mb) | {"qwenlora_merge"}
    for k in mb:
        if k != "quantization_config":
            assert mo[k] == mb[k]
    qb, qo = json.loads(mb["quantization_config"]), json.loads(mo["quantization_config"])
    assert qo.pop("rank") == 48 and qb.pop("rank") == 32 and qo == qb


def test_default_output_name_and_stale_name_warning(qwen, tmp_path):
    base, truth = qwen
    mods = random_lora_modules({"transformer_blocks.0.attn.to_out.0": (D, D)}, rank=16, seed=0)
    lp = tmp_path / "my_style.safetensors"
    write_lora(lp, mods, "diffusers")
    rep = report(run(base, lp, "--dry-run", "--json"))
    assert os.path.basename(rep["output_planned"]) == "svdq-int4_r48-qwen-image-tiny+my_style.safetensors"
    stale = tmp_path / "svdq-int4_r32-merged.safetensors"
    res = run(base, lp, "-o", stale, "-q")
    assert "svdq-int4_r48-merged" in res.stderr


def test_unmapped_and_wrong_family_errors(qwen, tmp_path):
    base, truth = qwen
    g = torch.Generator().manual_seed(0)
    flux = {f"double_blocks.{i}.img_attn.qkv": (torch.randn(4, D, generator=g), torch.randn(3 * D, 4, generator=g), None)
            for i in range(3)}
    lp = tmp_path / "flux.safetensors"
    write_lora(lp, flux, "kohya")
    out = tmp_path / "o.safetensors"
    res = run(base, lp, "-o", out, ok=False)
    assert res.exit_code == 3 and "Flux" in res.stderr and "Traceback" not in res.output
    assert not out.exists()
    mods = random_lora_modules({"transformer_blocks.0.attn.to_out.0": (D, D)}, rank=4, seed=0)
    a, b, al = mods["transformer_blocks.0.attn.to_out.0"]
    mods["transformer_blocks.0.attn.not_a_layer"] = (a.clone(), b.clone(), al)
    lp2 = tmp_path / "partly.safetensors"
    write_lora(lp2, mods, "diffusers")
    res = run(base, lp2, "-o", out, ok=False)
    assert res.exit_code == 3 and "not_a_layer" in res.stderr and "--allow-unmapped" in res.stderr
    assert not out.exists()
    rep = report(run(base, lp2, "-o", out, "--allow-unmapped", "--json"))
    assert rep["loras"][0]["keys"]["unmapped"] == 2 and out.exists()
    assert any("not applied" in w for w in rep["warnings"])


def test_shape_mismatch_names_the_module(qwen, tmp_path):
    base, truth = qwen
    mods = random_lora_modules({"transformer_blocks.0.attn.to_q": (3072, 3072)}, rank=4, seed=0)
    lp = tmp_path / "big.safetensors"
    write_lora(lp, mods, "diffusers")
    res = run(base, lp, "-o", tmp_path / "o.safetensors", ok=False)
    assert res.exit_code == 2 and "transformer_blocks.0.attn.to_q" in res.stderr and "different model size" in res.stderr


def test_refuses_to_overwrite(qwen, tmp_path):
    base, truth = qwen
    mods = random_lora_modules({"proj_out": (64, D)}, rank=4, seed=0)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "diffusers")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    res = run(base, lp, "-o", out, ok=False)
    assert res.exit_code == 2 and "exists" in res.stderr and out.read_bytes() == b"precious"
    res = run(base, lp, "-o", base, "--overwrite", ok=False)
    assert res.exit_code == 2 and "base" in res.stderr
    res = run(base, lp, "-o", lp, "--overwrite", ok=False)
    assert res.exit_code == 2 and "LoRA" in res.stderr
    run(base, lp, "-o", out, "--overwrite", "-q")
    check_loadable(out)


def test_text_encoder_keys_are_listed_as_ignored(qwen, tmp_path):
    base, truth = qwen
    mods = random_lora_modules({"proj_out": (64, D)}, rank=4, seed=0)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "kohya", extra={"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)})
    rep = report(run(base, lp, "--dry-run", "--json"))
    ign = rep["loras"][0]["ignored"]
    assert len(ign) == 1 and "text-encoder" in ign[0]["rule"]
    assert rep["loras"][0]["keys"] == {"total": 3, "applied": 2, "ignored": 1, "unmapped": 0}


def test_fused_smoothing_is_merged_exactly(tmp_path):
    """deepcompressor's fuse_when_possible: attn.to_out.0 / to_add_out see x / s and the V rows of both q/k/v
    projections hold v / s. A LoRA there goes in as A·diag(s) and diag(1/s)·B (and Δb / s): the layers'
    true maps change by exactly ΔW (docs/format.md §7)."""
    p = tmp_path / "fused.safetensors"
    truth = build_qwen_checkpoint(p, blocks=1, dim=D, rank=32, fused_smooth=("transformer_blocks.0.attn.to_out.0",))
    s = truth["svdq"]["transformer_blocks.0.attn.to_out.0"]["smooth"].float()
    blk = "transformer_blocks.0.attn."
    targets = {blk + m: (D, D) for m in ("to_out.0", "to_add_out", "to_v", "add_v_proj", "to_q")}
    mods = random_lora_modules(targets, rank=4, seed=3)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(D, generator=g) * 0.05
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "diffusers", extra={blk + "to_v.diff_b": bias})
    out = tmp_path / "o.safetensors"
    run(p, lp, "-o", out, "-q")
    want = expected_deltas([(mods, 1.0)], truth["target_map"])
    for module, scale_cols, scale_rows in ((blk + "to_out.0", True, None), (blk + "to_add_out", True, None),
                                           (blk + "to_qkv", False, slice(2 * D, 3 * D)),
                                           (blk + "add_qkv_proj", False, slice(2 * D, 3 * D))):
        dw = want[module].clone()
        if scale_cols:
            dw = dw * s[None, :]
        if scale_rows is not None:
            dw[scale_rows] = dw[scale_rows] / s[:, None]
        got, db = stored_delta(p, out, module)
        assert float((got - dw).norm() / dw.norm()) < 1e-2, module
        if module == blk + "to_qkv":
            torch.testing.assert_close(db[2 * D:], (bias / s).bfloat16().float(), atol=2e-3, rtol=1e-2)
            assert not db[:2 * D].any()
    run("verify", p, out, lp, "-q")
    # unfused layers of the same block (the q rows) are untouched by the scaling
    got, _ = stored_delta(p, out, blk + "to_qkv")
    assert float((got[:D] - want[blk + "to_qkv"][:D]).norm() / want[blk + "to_qkv"][:D].norm()) < 1e-2


def test_fused_smoothing_into_unknown_layers_is_refused(tmp_path):
    p = tmp_path / "fused.safetensors"
    build_qwen_checkpoint(p, blocks=1, dim=D, rank=32, fused_smooth=("transformer_blocks.0.attn.to_qkv",))
    lp = tmp_path / "l.safetensors"
    write_lora(lp, random_lora_modules({"transformer_blocks.0.attn.to_q": (D, D)}, rank=4, seed=0), "diffusers")
    res = run(p, lp, "-o", tmp_path / "o.safetensors", ok=False)
    assert res.exit_code == 2 and "smoothing fused" in res.stderr and "cannot identify" in res.stderr
    assert not (tmp_path / "o.safetensors").exists()
    # a LoRA elsewhere in the model is fine
    write_lora(lp, random_lora_modules({"transformer_blocks.0.img_mlp.net.2": (D, 4 * D)}, rank=4, seed=0), "diffusers")
    run(p, lp, "-o", tmp_path / "o.safetensors", "-q")


def test_runtime_manifest_ranks_are_updated(tmp_path):
    import json as _json

    from converter.st_reader import Checkpoint
    from converter.st_writer import OutSpec, StreamingWriter

    src = tmp_path / "b0.safetensors"
    build_qwen_checkpoint(src, blocks=1, dim=D, rank=32)
    base = tmp_path / "b.safetensors"
    with Checkpoint(src) as c:  # the same file, with a nunchaku_lite runtime manifest in its metadata
        meta = dict(c.metadata)
        qc = _json.loads(meta["quantization_config"])
        qc["runtime_manifest"] = {"schema": "nunchaku_lite.runtime_manifest", "version": 1,
                                  "requirements": {"rank": 32},
                                  "targets": [{"name": "transformer_blocks.0.attn.to_qkv", "rank": 32},
                                              {"name": "transformer_blocks.0.img_mlp.net.2", "rank": 32}]}
        meta["quantization_config"] = _json.dumps(qc)
        w = StreamingWriter(base, [OutSpec(i.name, i.dtype, i.shape) for i in c.tensors.values()], meta)
        for n in c.keys():
            w.copy_tensor(n, c)
        w.commit()
    mods = random_lora_modules({"transformer_blocks.0.attn.to_out.0": (D, D)}, rank=16, seed=0)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "diffusers")
    out = tmp_path / "o.safetensors"
    run(base, lp, "-o", out, "-q")
    qo = _json.loads(metadata(out)["quantization_config"])
    man = qo["runtime_manifest"]
    assert qo["rank"] == 48 and man["requirements"]["rank"] == 48 and all(t["rank"] == 48 for t in man["targets"])
    assert man["schema"] == "nunchaku_lite.runtime_manifest"

"""End-to-end merges into small Z-Image-Turbo checkpoints (both refiner variants)."""

from __future__ import annotations

import json

import pytest
import torch

from builders import build_qwen_checkpoint, build_zimage_checkpoint
from checks import check_merged, expected_deltas, quant_rank, run, stored_delta
from loader_emulation import check_loadable
from lora_builders import random_lora_modules, write_lora


D = 384
F = 1024


@pytest.fixture(scope="module", params=[False, True], ids=["quantized-refiners", "bf16-refiners"])
def zimage(request, tmp_path_factory):
    p = tmp_path_factory.mktemp("z") / "svdq-int4_r32-z-image-turbo.safetensors"
    return str(p), build_zimage_checkpoint(p, layers=2, dim=D, rank=32, skip_refiners=request.param)



def merge(base, lora_path, out, *extra):
    return json.loads(run(base, lora_path, "-o", out, "--json", *extra).stdout)


@pytest.mark.parametrize("fmt", ["diffusers", "comfy", "kohya", "peft_adapter"])
def test_every_module_merged_none_dropped(zimage, tmp_path, fmt):
    base, truth = zimage
    mods = random_lora_modules(truth["lora_targets"], rank=16, seed=11, alpha=8.0 if fmt == "kohya" else None)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, fmt)
    out = tmp_path / "out.safetensors"
    rep = merge(base, lp, out)
    k = rep["loras"][0]["keys"]
    assert k["unmapped"] == 0 and k["applied"] == k["total"] and k["total"] >= 100, k
    check_merged(base, out, truth, expected_deltas([(mods, 1.0)], truth["target_map"]))
    check_loadable(out)
    assert quant_rank(out) == rep["rank"]["to"] == 32 + 48


def test_w1_w3_order_is_w3_first(zimage, tmp_path):
    """w1 and w3 LoRAs differ; the numeric check fails if their rows are swapped."""
    base, truth = zimage
    g = torch.Generator().manual_seed(3)
    mk = lambda o, i: ((torch.randn(8, i, generator=g) * 0.05).bfloat16(), (torch.randn(o, 8, generator=g) * 0.05).bfloat16(), None)
    mods = {"layers.0.feed_forward.w1": mk(F, D), "layers.0.feed_forward.w3": mk(F, D),
            "noise_refiner.1.feed_forward.w1": mk(F, D)}
    lp = tmp_path / "glu.safetensors"
    write_lora(lp, mods, "diffusers")
    out = tmp_path / "out.safetensors"
    merge(base, lp, out)
    check_merged(base, out, truth, expected_deltas([(mods, 1.0)], truth["target_map"]))
    swapped = dict(truth["target_map"])
    swapped["layers.0.feed_forward.w1"], swapped["layers.0.feed_forward.w3"] = (
        truth["target_map"]["layers.0.feed_forward.w3"], truth["target_map"]["layers.0.feed_forward.w1"])
    with pytest.raises(AssertionError):
        check_merged(base, out, truth, expected_deltas([(mods, 1.0)], swapped))


def _split_fused(mods: dict, fused: str, parts: tuple[str, ...], rows: int) -> dict:
    """A fused LoRA module (e.g. attention.qkv) as the equivalent per-component modules."""
    out = dict(mods)
    a, b, alpha = out.pop(fused)
    base = fused.rsplit(".", 1)[0]
    for i, p in enumerate(parts):
        out[f"{base}.{p}"] = (a, b[i * rows:(i + 1) * rows], alpha)
    return out


def test_musubi_fused_qkv_out_and_comfy_aliases(zimage, tmp_path):
    base, truth = zimage
    g = torch.Generator().manual_seed(4)
    mk = lambda o, i, r=8: ((torch.randn(r, i, generator=g) * 0.05).bfloat16(), (torch.randn(o, r, generator=g) * 0.05).bfloat16(), 4.0)
    mods = {
        "layers.1.attention.qkv": mk(3 * D, D),
        "noise_refiner.0.attention.qkv": mk(3 * D, D),
        "layers.1.attention.out": mk(D, D),
        "context_refiner.1.attention.out": mk(D, D),
        "x_embedder": mk(D, 64),
        "final_layer.linear": mk(64, D),
        "final_layer.adaLN_modulation.1": mk(D, 256),
    }
    lp = tmp_path / "musubi.safetensors"
    write_lora(lp, mods, "kohya")
    out = tmp_path / "out.safetensors"
    rep = merge(base, lp, out)
    assert rep["loras"][0]["keys"]["unmapped"] == 0
    canon = _split_fused(mods, "layers.1.attention.qkv", ("to_q", "to_k", "to_v"), D)
    canon = _split_fused(canon, "noise_refiner.0.attention.qkv", ("to_q", "to_k", "to_v"), D)
    for alias, real in (("layers.1.attention.out", "layers.1.attention.to_out.0"),
                        ("context_refiner.1.attention.out", "context_refiner.1.attention.to_out.0"),
                        ("x_embedder", "all_x_embedder.2-1"), ("final_layer.linear", "all_final_layer.2-1.linear"),
                        ("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1")):
        canon[real] = canon.pop(alias)
    # a fused-qkv module uses alpha/rank of its own (single) A: same gamma for the three parts
    check_merged(base, out, truth, expected_deltas([(canon, 1.0)], truth["target_map"]))
    check_loadable(out)
    with pytest.raises(Exception):
        from converter.st_reader import Checkpoint

        with Checkpoint(out) as c:  # the file keeps the base's own key names: no Comfy renames
            c.tensors["layers.0.attention.qkv.qweight"]


def test_bias_delta_on_biasless_layer_is_an_error(zimage, tmp_path):
    base, truth = zimage
    lp = tmp_path / "b.safetensors"
    write_lora(lp, {}, "diffusers", extra={"layers.0.attention.to_out.0.diff_b": torch.zeros(D)})
    out = tmp_path / "o.safetensors"
    res = run(base, lp, "-o", out, ok=False)
    assert res.exit_code == 3 and "has no bias" in res.stderr and not out.exists()


def test_cross_family_loras_are_refused(zimage, tmp_path):
    base, truth = zimage
    q = tmp_path / "qwen.safetensors"
    qmods = random_lora_modules({f"transformer_blocks.{i}.attn.to_q": (3072, 3072) for i in range(3)}, rank=4, seed=0)
    write_lora(q, qmods, "diffusers")
    res = run(base, q, "-o", tmp_path / "o.safetensors", ok=False)
    assert res.exit_code == 3 and "Qwen-Image LoRA" in res.stderr and "Z-Image-Turbo" in res.stderr
    qb = tmp_path / "qb.safetensors"
    build_qwen_checkpoint(qb, blocks=1, dim=256)
    z = tmp_path / "z.safetensors"
    write_lora(z, random_lora_modules({f"layers.{i}.attention.to_q": (D, D) for i in range(2)}, rank=4, seed=0), "comfy")
    res = run(qb, z, "-o", tmp_path / "o.safetensors", ok=False)
    assert res.exit_code == 3 and "Z-Image-Turbo LoRA" in res.stderr and not (tmp_path / "o.safetensors").exists()


def test_nvfp4_zimage(tmp_path):
    p = tmp_path / "zfp4.safetensors"
    truth = build_zimage_checkpoint(p, layers=1, dim=D, rank=32, precision="nvfp4")
    mods = random_lora_modules({k: v for k, v in truth["lora_targets"].items() if k.startswith("layers.0.")},
                               rank=16, seed=5)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "diffusers")
    out = tmp_path / "o.safetensors"
    merge(p, lp, out)
    check_merged(p, out, truth, expected_deltas([(mods, 1.0)], truth["target_map"]))
    check_loadable(out)


def test_fused_smoothing_is_merged_exactly(tmp_path):
    """attention.to_out.0 with its smoothing fused into the V rows of to_qkv: A·diag(s) there, diag(1/s)·B on
    the V rows; the true maps change by exactly ΔW."""
    p = tmp_path / "fused.safetensors"
    truth = build_zimage_checkpoint(p, layers=1, dim=D, rank=32, fused_smooth=("layers.0.attention.to_out.0",))
    s = truth["svdq"]["layers.0.attention.to_out.0"]["smooth"].float()
    mods = random_lora_modules({f"layers.0.attention.{m}": (D, D) for m in ("to_out.0", "to_v", "to_k")}, rank=4,
                               seed=5)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "comfy")
    out = tmp_path / "o.safetensors"
    run(p, lp, "-o", out, "-q")
    want = expected_deltas([(mods, 1.0)], truth["target_map"])
    got, _ = stored_delta(p, out, "layers.0.attention.to_out.0")
    dw = want["layers.0.attention.to_out.0"] * s[None, :]
    assert float((got - dw).norm() / dw.norm()) < 1e-2
    got, _ = stored_delta(p, out, "layers.0.attention.to_qkv")
    dw = want["layers.0.attention.to_qkv"].clone()
    dw[2 * D:] /= s[:, None]
    assert float((got - dw).norm() / dw.norm()) < 1e-2
    run("verify", p, out, lp, "-q")

"""Two real-world key spellings: DiffSynth-Studio's doubled PEFT adapter name, and Anime-Z's Z-Image files (dot
weights, underscore alphas, and redundant fused `qkv` / bare `out` copies beside the split modules)."""

from __future__ import annotations

import json

import pytest
import torch

from builders import build_zimage_checkpoint
from checks import check_merged, expected_deltas, run
from lora_builders import lora_keys, random_lora_modules, write_lora

D = 384


def report(res) -> dict:
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    p = tmp_path_factory.mktemp("zs") / "svdq-int4_r32-z-image-turbo.safetensors"
    return str(p), build_zimage_checkpoint(p, layers=2, dim=D, rank=32)


def test_diffsynth_doubled_adapter_name_merges_exactly(qwen_int4, tmp_path):
    """`….lora_A.default_0.default.weight`: every key applied, ΔW exact (no alpha: scale 1)."""
    base, truth = qwen_int4
    targets = {k: v for k, v in truth["lora_targets"].items() if "_mod." not in k and "blocks.0." in k}
    mods = random_lora_modules(targets, rank=8, seed=21)
    lp = tmp_path / "diffsynth.safetensors"
    written = write_lora(lp, mods, "diffsynth")
    assert all(".default_0.default.weight" in k for k in written)
    out = tmp_path / "out.safetensors"
    rep = report(run(base, f"{lp}:0.7", "-o", out, "--json", "--mod", "skip"))
    keys = rep["loras"][0]["keys"]
    assert keys["unmapped"] == 0 and keys["applied"] == keys["total"] == 2 * len(mods), keys
    assert "default_0.default" in rep["loras"][0]["format"]
    check_merged(base, out, truth, expected_deltas([(mods, 0.7)], truth["target_map"]))


def _anime_z_file(path, truth, *, with_copies: bool) -> dict:
    """Block 0's attention and MLP in Anime-Z's spelling, alphas ≠ rank (so a scale of 1 shows); with_copies adds the
    fused `attention.qkv` (its own alpha) and the bare `attention.out` that such files also hold, with values that
    would change the result if they were applied."""
    names = [f"layers.0.attention.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")] + \
            [f"layers.0.feed_forward.{m}" for m in ("w1", "w2", "w3")]
    mods = random_lora_modules({n: truth["lora_targets"][n] for n in names}, rank=8, seed=22, alpha=2.0)
    extra = {}
    if with_copies:
        copies = random_lora_modules({"qkv": (3 * D, D), "out": (D, D)}, rank=8, seed=23, alpha=4.0)
        for name, (a, b, alpha) in copies.items():
            stem = f"layers.0.attention.{name}"
            extra |= {f"{stem}.lora.down.weight": a, f"{stem}.lora.up.weight": b}
            if name == "qkv":
                extra[f"{stem}.alpha"] = torch.tensor(alpha)
    written = write_lora(path, mods, "anime_z", extra=extra)
    assert "layers.0.attention.to.q.lora.down.weight" in written and "layers.0.attention.to_q.alpha" in written
    assert lora_keys("layers.0.attention.to_q", "anime_z")[2] == "layers.0.attention.to_q.alpha"
    return mods


@pytest.mark.parametrize("with_copies", [False, True], ids=["split-only", "with-fused-copies"])
def test_anime_z_dot_weights_take_their_underscore_alpha(zimage, tmp_path, with_copies):
    """Scale alpha/rank = 2/8 on every module (refused alphas and scale 1 before), the fused copies counted once."""
    base, truth = zimage
    lp = tmp_path / "anime-z.safetensors"
    mods = _anime_z_file(lp, truth, with_copies=with_copies)
    out = tmp_path / "out.safetensors"
    rep = report(run(base, lp, "-o", out, "--json"))
    entry = rep["loras"][0]
    assert entry["keys"]["unmapped"] == 0, entry["unmapped"]
    assert entry["keys"]["applied"] == 3 * len(mods)  # A, B and alpha of every split module
    copies = {r["key"] for r in entry["ignored"] if "second copy" in r["rule"]}
    assert copies == ({"layers.0.attention.qkv.lora.down.weight", "layers.0.attention.qkv.lora.up.weight",
                       "layers.0.attention.qkv.alpha", "layers.0.attention.out.lora.down.weight",
                       "layers.0.attention.out.lora.up.weight"} if with_copies else set())
    check_merged(base, out, truth, expected_deltas([(mods, 1.0)], truth["target_map"]))
    # the scale is alpha/rank, not 1: the same update at scale 1 is 4x as large and fails the check
    unscaled = {n: (a, b, None) for n, (a, b, _) in mods.items()}
    with pytest.raises(AssertionError):
        check_merged(base, out, truth, expected_deltas([(unscaled, 1.0)], truth["target_map"]))


def test_a_lone_fused_qkv_is_still_applied(zimage, tmp_path):
    """Without the split modules beside it, `attention.qkv` is the update itself, not a copy."""
    base, truth = zimage
    a, b, _ = random_lora_modules({"q": (3 * D, D)}, rank=8, seed=24)["q"]
    lp = tmp_path / "qkv.safetensors"
    write_lora(lp, {}, "diffusers", extra={"layers.0.attention.qkv.lora.down.weight": a,
                                            "layers.0.attention.qkv.lora.up.weight": b})
    out = tmp_path / "out.safetensors"
    rep = report(run(base, lp, "-o", out, "--json"))
    assert rep["loras"][0]["keys"]["applied"] == 2 and not rep["loras"][0]["ignored"]
    split = {f"layers.0.attention.to_{c}": (a, b[i * D:(i + 1) * D], None) for i, c in enumerate("qkv")}
    check_merged(base, out, truth, expected_deltas([(split, 1.0)], truth["target_map"]))

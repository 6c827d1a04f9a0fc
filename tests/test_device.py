"""`--device cuda` runs the same maths on a GPU: same result within tolerance (runs where CUDA exists)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from builders import build_qwen_checkpoint
from lora_builders import random_lora_modules, write_lora

from converter.cli import main
from converter.st_reader import Checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_unusable_device_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    p = tmp_path / "b.safetensors"
    build_qwen_checkpoint(p, blocks=1)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, random_lora_modules({"proj_out": (64, 256)}, rank=4, seed=0), "diffusers")
    res = CliRunner().invoke(main, [str(p), str(lp), "-o", str(tmp_path / "o.safetensors"), "--device", "cuda"])
    assert res.exit_code == 2 and "not usable" in res.stderr and not (tmp_path / "o.safetensors").exists()


@cuda
def test_cuda_matches_cpu(tmp_path):
    p = tmp_path / "b.safetensors"
    truth = build_qwen_checkpoint(p, blocks=2, dim=256)
    mods = random_lora_modules(truth["lora_targets"], rank=16, seed=3, scale=0.06)
    lp = tmp_path / "l.safetensors"
    write_lora(lp, mods, "diffusers")
    reps = {}
    for dev in ("cpu", "cuda"):
        res = CliRunner().invoke(main, [str(p), str(lp), "-o", str(tmp_path / f"{dev}.safetensors"), "--json", "--device", dev])
        assert res.exit_code == 0, res.output
        reps[dev] = {l["layer"]: l for l in json.loads(res.stdout)["layers"]}
    for name, l in reps["cpu"].items():
        g = reps["cuda"][name]
        if l["method"] == "modulation":
            assert abs(l["e_mod"] - g["e_mod"]) < 5e-3 and l["action"] == g["action"], (name, l, g)
        else:
            assert abs(l["rel_error"] - g["rel_error"]) < 1e-3, (name, l, g)
    with Checkpoint(tmp_path / "cpu.safetensors") as a, Checkpoint(tmp_path / "cuda.safetensors") as b:
        for k in a.keys():
            x, y = a.get(k), b.get(k)
            if k.endswith(".qweight") and "_mod." in k:
                from converter.codecs.awq_w4a16 import AwqQWeight

                diff = (AwqQWeight.unpack(x) != AwqQWeight.unpack(y)).float().mean()
                assert diff < 1e-3, (k, float(diff))
            elif "_mod." in k:  # a row whose sequential rounding took another turn on the GPU differs in its
                # zeros and bias as in its codes: the same bound on how many (seen: 4 of 6144 zeros, 1 beyond)
                far = (x.float() - y.float()).abs() > 1e-3 + 2e-2 * y.float().abs()
                assert float(far.float().mean()) < 1e-3, (k, float(far.float().mean()))
            elif x.is_floating_point():
                assert torch.allclose(x.float(), y.float(), rtol=2e-2, atol=1e-3), k
            else:
                assert torch.equal(x, y), k


@cuda
def test_cuda_matches_cpu_for_dense_updates(tmp_path):
    """Full diffs and DoRA (truncated SVD on W4A4, exact on bf16, requantized on modulation) on the GPU."""
    import adapter_oracles as O

    p = tmp_path / "b.safetensors"
    truth = build_qwen_checkpoint(p, blocks=1, dim=256)
    specs = {"transformer_blocks.0.img_mlp.net.2": O.random_full_diff(256, 1024, bias=False, seed=1),
             "img_in": O.random_lora_dora(256, 64, rank=4, base_weight=truth["dense"]["img_in.weight"].float(), seed=2),
             "transformer_blocks.0.img_mod.1": O.random_full_diff(1536, 256, bias=False, seed=3, target_rms=0.05)}
    lp = tmp_path / "d.safetensors"
    O.write_adapter_file(lp, specs, "lycoris-prefix")
    reps = {}
    for dev in ("cpu", "cuda"):
        res = CliRunner().invoke(main, [str(p), str(lp), "-o", str(tmp_path / f"{dev}.safetensors"), "--json",
                                        "--device", dev])
        assert res.exit_code == 0, res.output
        reps[dev] = {l["layer"]: l for l in json.loads(res.stdout)["layers"]}
    for name, l in reps["cpu"].items():
        g = reps["cuda"][name]
        for key in ("captured", "rel_error", "e_mod"):
            if key in l:
                assert abs(l[key] - g[key]) < 5e-3, (name, key, l[key], g[key])


# -- --device auto: the choice, covered on any machine (CUDA availability is passed in) -------------------------
def _plan(tmp_path, modules: dict, mod: str = "calibrated"):
    from converter.pipeline import Options, open_session

    p = tmp_path / "b.safetensors"
    if not p.exists():
        build_qwen_checkpoint(p, blocks=1, dim=256)
    lp = tmp_path / f"l{len(list(tmp_path.iterdir()))}.safetensors"
    write_lora(lp, modules, "diffusers")
    s = open_session(str(p), [str(lp)], Options(modulation=mod))
    s.close()
    return s.plan


def test_auto_device_takes_cuda_only_for_heavy_layers(tmp_path):
    from converter.pipeline import pick_device

    lowrank = _plan(tmp_path, random_lora_modules({"transformer_blocks.0.img_mlp.net.2": (256, 1024)}, rank=4, seed=0))
    mod = _plan(tmp_path, random_lora_modules({"transformer_blocks.0.img_mod.1": (1536, 256)}, rank=4, seed=1))
    skipped = _plan(tmp_path, random_lora_modules({"transformer_blocks.0.img_mod.1": (1536, 256)}, rank=4, seed=1),
                    mod="skip")
    yes, no = (lambda: True), (lambda: False)
    assert pick_device("auto", [lowrank], yes)[0] == "cpu"  # exact appends and copies: nothing to gain
    assert pick_device("auto", [skipped], yes)[0] == "cpu"
    dev, why = pick_device("auto", [mod], yes)
    assert dev == "cuda" and "1 modulation layer " in why
    dev, why = pick_device("auto", [lowrank, mod], no)
    assert dev == "cpu" and "no usable CUDA device" in why
    assert pick_device("cpu", [mod], yes) == ("cpu", "--device cpu")  # forced either way
    assert pick_device("cuda", [lowrank], no) == ("cuda", "--device cuda")


def test_auto_device_for_dense_updates_and_in_the_report(tmp_path, monkeypatch):
    import adapter_oracles as O

    from converter.pipeline import pick_device

    p = tmp_path / "b.safetensors"
    build_qwen_checkpoint(p, blocks=1, dim=256)
    lp = tmp_path / "d.safetensors"
    O.write_adapter_file(lp, {"transformer_blocks.0.img_mlp.net.2": O.random_full_diff(256, 1024, bias=False, seed=1)},
                         "lycoris-prefix")
    from converter.pipeline import Options, open_session

    s = open_session(str(p), [str(lp)], Options())
    s.close()
    assert pick_device("auto", [s.plan], lambda: True) == ("cuda", "auto: 1 dense update on the CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what the CLI sees: reported, and on the CPU
    res = CliRunner().invoke(main, [str(p), str(lp), "-o", str(tmp_path / "o.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["device"] == "cpu" and rep["device_reason"] == "auto: 1 dense update, no usable CUDA device"
    res = CliRunner().invoke(main, [str(p), str(lp), "-o", str(tmp_path / "o2.safetensors")])
    assert "device   cpu (auto: 1 dense update, no usable CUDA device)" in res.stdout

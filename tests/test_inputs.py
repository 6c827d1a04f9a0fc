"""What the user types: messages that name the real cause (a strength that is not a number, a folder, BASE and
LORA swapped, usage errors as one line) and the same LoRA file named twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from checks import check_merged, expected_deltas, run
from lora_builders import random_lora_modules, write_lora
from converter.st_reader import Checkpoint

D = 256


def error_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def one_error(res, code: int = 2) -> str:
    """The run failed with `code` and exactly one line on stderr, an `error:` line (no traceback, no usage block)."""
    lines = error_lines(res)
    assert res.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), (res.exit_code, res.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def lora(qwen_int4, tmp_path_factory) -> str:
    """A small plain LoRA on block 0 (no modulation layer, so `--mod skip` changes nothing)."""
    targets = {k: v for k, v in qwen_int4.truth["lora_targets"].items() if "blocks.0." in k and "_mod." not in k}
    path = tmp_path_factory.mktemp("inputs") / "style.safetensors"
    write_lora(path, random_lora_modules(targets, rank=8, seed=31, alpha=4.0), "kohya")
    return str(path)


# -- item 4: messages that blame the right thing -----------------------------------------------------------------
@pytest.mark.parametrize("tail, cause", [("0,8", "did you mean {lora}:0.8"), ("abc", "'abc'"),
                                         ("", "nothing after ':'")])
def test_a_bad_strength_is_called_a_bad_strength(qwen_int4, lora, tmp_path, tail, cause):
    res = run(qwen_int4.path, f"{lora}:{tail}", "-o", tmp_path / "o.safetensors", ok=False)
    line = one_error(res)
    assert "not found" not in line and cause.format(lora=lora) in line, line
    assert "strength" in line and not (tmp_path / "o.safetensors").exists()


def test_a_folder_is_called_a_folder(qwen_int4, lora, tmp_path):
    folder = tmp_path / "lora-dir"
    folder.mkdir()
    line = one_error(run(qwen_int4.path, folder, "--dry-run", ok=False))
    assert "is a folder, not a LoRA file" in line and "no .safetensors" in line, line
    shutil.copy(lora, folder / "a.safetensors")
    shutil.copy(lora, folder / "b.safetensors")
    line = one_error(run(qwen_int4.path, folder, "--dry-run", ok=False))
    assert "is a folder" in line and "a.safetensors, b.safetensors" in line, line


def test_a_peft_save_pretrained_folder_is_taken(qwen_int4, tmp_path):
    """adapter_model.safetensors + adapter_config.json (alpha 4, r 8): merged at alpha/r = 0.5."""
    base, truth = qwen_int4
    targets = {k: v for k, v in truth["lora_targets"].items() if "blocks.1." in k and "_mod." not in k}
    mods = random_lora_modules(targets, rank=8, seed=32)
    folder = tmp_path / "my-adapter"
    write_lora(folder / "adapter_model.safetensors", mods, "peft_raw")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 4}))
    out = tmp_path / "o.safetensors"
    rep = json.loads(run(base, f"{folder}:0.6", "-o", out, "--json", "--mod", "skip").stdout)
    assert rep["loras"][0]["path"] == str(folder / "adapter_model.safetensors") and rep["loras"][0]["strength"] == 0.6
    scaled = {n: (a, b, 4.0) for n, (a, b, _) in mods.items()}
    check_merged(base, out, truth, expected_deltas([(scaled, 0.6)], truth["target_map"]))
    os.remove(folder / "adapter_config.json")  # without its config the folder is not taken: alpha is unknown
    line = one_error(run(base, folder, "--dry-run", ok=False))
    assert "adapter_model.safetensors without the adapter_config.json" in line, line


def test_base_and_lora_swapped_are_recognised(qwen_int4, lora):
    line = one_error(run(lora, qwen_int4.path, "--dry-run", ok=False))
    assert "swapped" in line and f"qwenlora-merge {qwen_int4.path} {lora}" in line, line
    line = one_error(run(lora, lora, "--dry-run", ok=False))
    assert f"{lora} is a LoRA file" in line and "base checkpoint comes first" in line, line
    line = one_error(run("verify", lora, qwen_int4.path, lora, ok=False))
    assert f"{lora} is a LoRA file" in line, line


def test_a_checkpoint_given_as_lora_is_named(qwen_int4, tmp_path):
    other = tmp_path / "other-base.safetensors"
    shutil.copy(qwen_int4.path, other)
    line = one_error(run(qwen_int4.path, other, "--dry-run", ok=False))
    assert f"{other} is a Nunchaku checkpoint, not a LoRA file" in line, line


@pytest.mark.parametrize("args, cause", [
    (["{base}"], "missing argument 'LORA[:STRENGTH]...'"),
    (["{base}", "{lora}", "--no-such-option"], "no such option"),
    (["{base}", "{lora}", "--mod", "sometimes"], "invalid value for '--mod'"),
    (["verify", "{base}"], "missing argument 'MERGED'"),
    (["missing.safetensors", "{lora}"], "'missing.safetensors' does not exist"),
])
def test_usage_errors_are_one_error_line(qwen_int4, lora, args, cause):
    """The installed command, as a user runs it: exit 2 and one `error:` line that also gives the usage."""
    argv = [a.format(base=qwen_int4.path, lora=lora) for a in args]
    proc = subprocess.run([sys.executable, "-m", "converter.cli", *argv], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and cause in lines[0] and "(usage: qwenlora-merge " in lines[0], lines


def test_help_and_version_still_work(qwen_int4):
    for argv in (["--help"], ["merge", "--help"], ["--version"]):
        proc = subprocess.run([sys.executable, "-m", "converter.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout and not proc.stderr, (argv, proc.stderr)


# -- item 7: the same LoRA file twice ------------------------------------------------------------------------------
def _tensors(path) -> dict[str, bytes]:
    with Checkpoint(path) as c:
        return {name: bytes(c.read_bytes(name)) for name in c.tensors}


def test_the_same_lora_twice_is_merged_once_at_the_summed_strength(qwen_int4, lora, tmp_path):
    base = qwen_int4.path
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    single = json.loads(run(base, f"{lora}:1.0", "-o", once, "--json", "--mod", "skip").stdout)
    rep = json.loads(run(base, f"{lora}:0.5", f"{lora}:0.5", "-o", twice, "--json", "--mod", "skip").stdout)
    assert rep["rank"]["to"] == single["rank"]["to"] == 32 + 32  # q/k/v of rank 8 each on to_qkv, not twice that
    assert any("given 2 times" in w and "summed strength 1" in w for w in rep["warnings"]), rep["warnings"]
    copy = rep["loras"][1]
    assert copy["keys"]["applied"] == 0 and copy["keys"]["ignored"] == copy["keys"]["total"]
    assert _tensors(once) == _tensors(twice)  # exactly the merge at strength 1
    res = run(base, f"{lora}:0.5", f"{lora}:0.5", "--dry-run")  # the text report says it too
    assert "given 2 times" in res.stdout


def test_a_copy_under_another_name_is_the_same_file(qwen_int4, lora, tmp_path):
    """Same content, another path (compared by sha256); and a batch names one file in two outputs: no repeat."""
    copy = tmp_path / "copy-of-style.safetensors"
    shutil.copy(lora, copy)
    rep = json.loads(run(qwen_int4.path, f"{lora}:0.3", f"{copy}:0.7", "--dry-run", "--json").stdout)
    assert rep["rank"]["to"] == 64 and any("given 2 times" in w for w in rep["warnings"]), rep
    sets = ["--output-set", f"{tmp_path}/a.safetensors={lora}", "--output-set", f"{tmp_path}/b.safetensors={copy}"]
    rep = json.loads(run("batch", qwen_int4.path, "--dry-run", "--json", *sets).stdout)
    assert all(r["rank"]["to"] == 64 and not r["warnings"] for r in rep["outputs"]), rep


def _dora_file(path, dim: int = D) -> None:
    """LyCORIS DoRA on attn.to_q (dense on W4A4: SVD budget) and a plain rank-48 LoRA on attn.to_out.0."""
    g = torch.Generator().manual_seed(33)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.05).bfloat16()
    save_file({"lycoris_transformer_blocks_0_attn_to_q.lora_down.weight": rnd(8, dim),
               "lycoris_transformer_blocks_0_attn_to_q.lora_up.weight": rnd(dim, 8),
               "lycoris_transformer_blocks_0_attn_to_q.dora_scale": (torch.rand(dim, 1, generator=g) + 0.5).bfloat16(),
               "lycoris_transformer_blocks_0_attn_to_out_0.lora_down.weight": rnd(48, dim),
               "lycoris_transformer_blocks_0_attn_to_out_0.lora_up.weight": rnd(dim, 48)}, str(path))


def test_dora_twice_stays_twice_with_its_rank_cost(qwen_int4, tmp_path):
    dora = tmp_path / "dora.safetensors"
    _dora_file(dora)
    single = json.loads(run(qwen_int4.path, dora, "--dry-run", "--json").stdout)
    rep = json.loads(run(qwen_int4.path, f"{dora}:0.5", f"{dora}:0.5", "--dry-run", "--json").stdout)
    assert single["rank"]["to"] == 32 + 64 and rep["rank"]["to"] == 32 + 96  # the SVD budget; 2 x 48 exact
    want = "costing 32 extra rank on each W4A4 layer (uniform rank 128 instead of 96)"
    assert any("given 2 times" in w and "DoRA" in w and want in w for w in rep["warnings"]), rep["warnings"]
    assert rep["loras"][1]["keys"]["applied"] == rep["loras"][1]["keys"]["total"]

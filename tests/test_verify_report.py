"""`verify` on a first contact: a rank-capped merge judged by the merge's own settings, a merged file
re-checked from the files alone (the LoRAs its provenance names), report figures that read as verdicts,
counted alike by merge and verify, an exact expected size, and a `--plot` a reader can use."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from builders import build_qwen_checkpoint
from checks import run
from lora_builders import random_lora_modules, write_lora

from converter.st_reader import Checkpoint
from converter.st_writer import OutSpec, StreamingWriter

D = 256


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    p = tmp_path_factory.mktemp("verify_report") / "svdq-int4_r32-qwen-tiny.safetensors"
    return str(p), build_qwen_checkpoint(p, blocks=2, dim=D, rank=32)


def _lora(truth, path, *, modulation: bool = False, seed: int = 1):
    """A rank-16 LoRA on the attention and MLP modules (separate q/k/v: rank 48 on the fused layer), img_in (a
    16-bit layer) and, if asked, the modulation layers."""
    t = {k: v for k, v in truth["lora_targets"].items()
         if "attn" in k or "mlp" in k or k == "img_in" or (modulation and "_mod." in k)}
    write_lora(path, random_lora_modules(t, rank=16, seed=seed), "diffusers")
    return path


def _rewrite(src, dst, change, metadata: dict | None = None):
    """Copy a safetensors file, passing each tensor through change(name, tensor), with metadata entries replaced."""
    with Checkpoint(src) as c:
        meta = dict(c.metadata) | (metadata or {})
        w = StreamingWriter(dst, [OutSpec(i.name, i.dtype, i.shape) for i in c.tensors.values()], meta)
        for name in c.keys():
            w.write_tensor(name, change(name, c.get(name)))
        w.commit()


# -- item 5: a file made exactly as asked passes ------------------------------------------------------------------
def test_rank_capped_merge_verifies_against_what_the_cap_allows(qwen, tmp_path):
    base, truth = qwen
    lp = _lora(truth, tmp_path / "a.safetensors")
    out = tmp_path / "capped.safetensors"
    merged = run(base, f"{lp}:0.8", "-o", out, "--max-rank", "48", "--mod", "skip", "-v")
    # the merge's text report shows the truncation: summarised, and per layer with -v
    assert "truncated by the rank cap to their best rank-16 approximation" in merged.stdout
    assert "transformer_blocks.0.attn.to_qkv  lowrank_append  +r48  truncated to rank 16" in merged.stdout

    res = run("verify", base, out, f"{lp}:0.8", "--json")  # exit 0: judged by the recorded rank cap
    rep = json.loads(res.stdout)
    assert rep["ok"] and rep["settings"] == {"max_rank": 48, "svd_rank": 64, "modulation": "skip"}
    qkv = [l for l in rep["layers"] if l["layer"].endswith("attn.to_qkv")]
    assert len(qkv) == 2 and all(l["rank_kept"] == 16 and 0.3 < l["truncation_error"] < 1 for l in qkv)
    assert all(abs(l["rel_error"] - l["truncation_error"]) < 1e-2 for l in qkv)
    assert rep["layers_summary"]["lowrank_append"]["truncated"]["layers"] == 4  # to_qkv and add_qkv_proj

    text = run("verify", base, out, f"{lp}:0.8").stdout
    assert text.startswith("verdict  within tolerance") and "rank cap 48" in text
    assert "4 truncated by the rank cap to their best rank-16 approximation, dropping" in text
    assert "transformer_blocks.0.attn.to_qkv" not in text  # per layer only with -v
    verbose = run("verify", base, out, f"{lp}:0.8", "-v").stdout
    assert "transformer_blocks.0.attn.to_qkv  truncated to rank 16 by the rank cap: dropped" in verbose

    # a truncated layer that lost its appended part is still caught: its tolerance is the best rank-16 error
    broken = tmp_path / "broken.safetensors"
    _rewrite(out, broken, lambda n, t: _zero_appended(t) if n == "transformer_blocks.0.attn.to_qkv.proj_up" else t)
    res = run("verify", base, broken, f"{lp}:0.8", ok=False)
    assert res.exit_code == 4 and "above the best rank-16 error" in res.stdout


def _zero_appended(packed_up: torch.Tensor) -> torch.Tensor:
    from converter.codecs.lowrank import LowRankUp

    up = LowRankUp.unpack(packed_up)
    up[:, 32:] = 0
    return LowRankUp.pack(up)


def test_max_rank_above_the_loader_limit_is_refused_at_the_dry_run(qwen, tmp_path):
    base, truth = qwen
    lp = _lora(truth, tmp_path / "a.safetensors")
    res = run(base, lp, "--max-rank", "2048", "--dry-run", ok=False)
    assert res.exit_code == 2 and "--max-rank 2048" in res.stderr and "1024" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    run(base, lp, "--max-rank", "1024", "--dry-run", "-q")  # the limit itself is allowed


# -- item 6: re-check a merged file from the files alone -------------------------------------------------------------
def test_verify_finds_the_loras_the_provenance_names(qwen, tmp_path):
    base, truth = qwen
    (tmp_path / "loras").mkdir()
    (tmp_path / "out").mkdir()
    a = _lora(truth, tmp_path / "loras" / "a.safetensors", seed=1)
    b = _lora(truth, tmp_path / "loras" / "b.safetensors", seed=2)
    out = tmp_path / "out" / "m.safetensors"
    run(base, f"{a}:0.8", f"{b}:-0.5", "-o", out, "--mod", "skip", "-q")
    with Checkpoint(out) as c:
        prov = json.loads(c.metadata["qwenlora_merge"])
    assert [(l["file"], l["path"], l["strength"]) for l in prov["loras"]] == [
        ("a.safetensors", "../loras/a.safetensors", 0.8), ("b.safetensors", "../loras/b.safetensors", -0.5)]

    # at the recorded path (relative to the merged file's folder), with the recorded strengths
    res = run("verify", base, out)
    assert "found at its recorded path, sha256 matches" in res.stdout and "strength -0.5" in res.stdout
    assert str(a) in res.stdout
    # beside the merged file first
    shutil.copy(a, tmp_path / "out" / "a.safetensors")
    res = run("verify", base, out, "--json")
    used = json.loads(res.stdout)["loras"]
    assert [(os.path.basename(os.path.dirname(l["path"])), l["found"]) for l in used] == [
        ("out", "beside the merged file"), ("loras", "at its recorded path")]

    # a changed LoRA (beside it, and nothing at the recorded path): one line naming it, exit 2
    os.remove(a)
    torch.manual_seed(0)
    _lora(truth, tmp_path / "out" / "a.safetensors", seed=7)
    res = run("verify", base, out, ok=False)
    assert res.exit_code == 2 and "a.safetensors" in res.stderr and "changed" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    # a missing one
    os.remove(tmp_path / "out" / "a.safetensors")
    res = run("verify", base, out, ok=False)
    assert res.exit_code == 2 and "a.safetensors" in res.stderr and "is not at" in res.stderr
    # a file without a provenance record, or with one this version cannot read
    res = run("verify", base, base, ok=False)
    assert res.exit_code == 2 and "no provenance record" in res.stderr
    for record in ({"loras": [{"file": 3}]}, prov | {"settings": {"max_rank": "48", "svd_rank": 64}}):
        odd = tmp_path / "odd.safetensors"
        _rewrite(out, odd, lambda n, t: t, {"qwenlora_merge": json.dumps(record)})
        res = run("verify", base, odd, ok=False)
        assert res.exit_code == 2 and "cannot read" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_old_files_without_settings_are_verified_as_before(qwen, tmp_path):
    base, truth = qwen
    lp = _lora(truth, tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    run(base, f"{lp}:0.8", "-o", out, "--mod", "skip", "-q")
    old = tmp_path / "old.safetensors"
    with Checkpoint(out) as c:
        prov = json.loads(c.metadata["qwenlora_merge"])
    del prov["settings"]
    _rewrite(out, old, lambda n, t: t, {"qwenlora_merge": json.dumps(prov)})
    res = run("verify", base, old, f"{lp}:0.8", "--json")
    assert json.loads(res.stdout)["settings"] is None
    assert "none recorded in the merged file" in run("verify", base, old, f"{lp}:0.8").stdout


# -- item 9: figures that read as verdicts, counted alike ---------------------------------------------------------
def test_report_leads_with_the_verdict_and_counts_like_the_plan(qwen, tmp_path):
    base, truth = qwen
    lp = _lora(truth, tmp_path / "a.safetensors", modulation=True)
    out = tmp_path / "m.safetensors"
    merged = run(base, f"{lp}:0.8", "-o", out)
    assert "fidelity dense_add 1 layer: at the 16-bit rounding floor (rel. error " in merged.stdout
    assert "= 1.00x floor)" in merged.stdout and " x1:" not in merged.stdout
    assert "fidelity lowrank_append 16 layers: 16 exact up to 16-bit storage" in merged.stdout
    assert "fidelity modulation 4 layers" in merged.stdout
    merge_rep = json.loads(run(base, f"{lp}:0.8", "-o", out, "--overwrite", "--json").stdout)
    verify_rep = json.loads(run("verify", base, out, "--json").stdout)
    counts = lambda rep: {k: v["layers"] for k, v in rep["layers_summary"].items()}
    assert counts(verify_rep) == counts(merge_rep) == {"dense_add": 1, "lowrank_append": 16, "modulation": 4}
    assert {a for v in verify_rep["layers_summary"].values() for a in v.get("actions", {})} <= {
        "calibrated", "biasfold", "skip"}
    text = run("verify", base, out).stdout
    assert "fidelity dense_add 1 layer: at the 16-bit rounding floor" in text
    assert "others   " in text and "dense_add 5" in text  # untargeted layers: counted apart
    wrong = run("verify", base, out, f"{lp}:0.5", ok=False)  # judged against another strength: every layer off
    assert wrong.exit_code == 4 and wrong.stdout.startswith("verdict  OUT OF TOLERANCE")
    assert "fidelity dense_add 1 layer: ABOVE the 16-bit rounding floor" in wrong.stdout
    assert "fidelity lowrank_append 16 layers: 16 of 16 OUT OF TOLERANCE" in wrong.stdout


def test_expected_output_bytes_is_exact(qwen, tmp_path):
    base, truth = qwen
    a = _lora(truth, tmp_path / "a.safetensors", seed=1)
    b = _lora(truth, tmp_path / "b.safetensors", seed=2)
    out = tmp_path / "m.safetensors"
    planned = json.loads(run(base, f"{a}:0.8", "-o", out, "--mod", "skip", "--dry-run", "--json").stdout)
    rep = json.loads(run(base, f"{a}:0.8", "-o", out, "--mod", "skip", "--json").stdout)
    assert planned["expected_output_bytes"] == rep["expected_output_bytes"] == os.path.getsize(out)
    batch = json.loads(run("batch", base, "--output-set", f"{tmp_path / 'x.safetensors'}={a}:0.5,{b}",
                           "--output-set", f"{tmp_path / 'y.safetensors'}={b}:-1", "--mod", "skip",
                           "--json").stdout)["outputs"]
    assert [r["expected_output_bytes"] for r in batch] == [os.path.getsize(r["output"]) for r in batch]


def test_plot_has_integer_blocks_tolerances_a_legend_and_every_kind(qwen, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from converter.verification import figure, verify

    base, truth = qwen
    lp = _lora(truth, tmp_path / "a.safetensors", modulation=True)
    out = tmp_path / "m.safetensors"
    run(base, f"{lp}:0.8", "-o", out, "--max-rank", "48", "-q")
    res, session = verify(base, str(out), [])
    session.close()
    fig = figure(res)
    try:
        labels = [ax.get_ylabel() for ax in fig.axes]
        assert len(labels) == 3 and any("16-bit" in l for l in labels) and any("W4A4" in l for l in labels) \
            and any("e_mod" in l for l in labels)
        for ax in fig.axes:
            assert ax.get_legend() is not None
            assert all(float(t).is_integer() for t in ax.get_xticks())
            tolerance = [h for h in ax.get_legend().legend_handles if h.get_label().startswith("tolerance")]
            assert tolerance, ax.get_ylabel()
        dense = next(ax for ax in fig.axes if "16-bit" in ax.get_ylabel())
        assert [float(x) for x, _ in dense.collections[0].get_offsets()] == [-1.0]  # img_in: outside the blocks
        assert dense.xaxis.get_major_formatter()(-1, 0) == "other"
        lowrank = next(ax for ax in fig.axes if "W4A4" in ax.get_ylabel())
        series = {h.get_label() for h in lowrank.get_legend().legend_handles}
        assert {"exact", "truncated by the rank cap", "tolerance (truncated by the rank cap)"} <= series
    finally:
        plt.close(fig)
    png = tmp_path / "fid.png"
    run("verify", base, out, "--plot", png, "-q")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Batch outputs, --max-rank, streaming writer memory and atomicity, verify on broken files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from builders import build_qwen_checkpoint, build_zimage_checkpoint
from checks import check_merged, expected_deltas, quant_rank, run
from loader_emulation import check_loadable
from lora_builders import random_lora_modules, write_lora

from converter.st_reader import Checkpoint
from converter.st_writer import OutSpec, StreamingWriter

D = 256


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    p = tmp_path_factory.mktemp("qwen") / "base.safetensors"
    return str(p), build_qwen_checkpoint(p, blocks=2, dim=D, rank=32)



def _loras(truth, tmp_path):
    t = {k: v for k, v in truth["lora_targets"].items() if "_mod." not in k}
    m1 = random_lora_modules(t, rank=16, seed=1)
    m2 = random_lora_modules({k: v for k, v in t.items() if "mlp" in k}, rank=8, seed=2, alpha=4)
    write_lora(tmp_path / "a.safetensors", m1, "diffusers")
    write_lora(tmp_path / "b.safetensors", m2, "kohya")
    return m1, m2


def test_batch_plan_file_and_output_sets(qwen, tmp_path):
    base, truth = qwen
    m1, m2 = _loras(truth, tmp_path)
    plan = {"outputs": [{"output": "o1.safetensors", "loras": ["a.safetensors:0.5"]},
                        {"output": "o2.safetensors", "loras": [{"path": "a.safetensors", "strength": -1},
                                                               "b.safetensors:2"]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rep = json.loads(run("batch", base, tmp_path / "plan.json", "--output-set",
                         f"{tmp_path / 'o3.safetensors'}={tmp_path / 'b.safetensors'}", "--json").stdout)
    assert len(rep["outputs"]) == 3
    tm = truth["target_map"]
    check_merged(base, tmp_path / "o1.safetensors", truth, expected_deltas([(m1, 0.5)], tm))
    check_merged(base, tmp_path / "o2.safetensors", truth, expected_deltas([(m1, -1.0), (m2, 2.0)], tm))
    check_merged(base, tmp_path / "o3.safetensors", truth, expected_deltas([(m2, 1.0)], tm))
    for o in ("o1", "o2", "o3"):
        check_loadable(tmp_path / f"{o}.safetensors")
    assert quant_rank(tmp_path / "o3.safetensors") == 48 and quant_rank(tmp_path / "o2.safetensors") == 80


def test_provenance_hash_once_per_file(qwen, tmp_path, monkeypatch):
    """Each output records the LoRA's true sha256; a LoRA named by several outputs is hashed once."""
    import hashlib

    import converter.lorafile as lora_mod

    base, truth = qwen
    _loras(truth, tmp_path)
    hashes = lora_mod._FileHashes()
    calls = []
    real = lora_mod._FileHashes._hash

    def counting(path, out):
        calls.append(path)
        real(path, out)

    monkeypatch.setattr(lora_mod, "_FILE_HASHES", hashes)
    monkeypatch.setattr(lora_mod._FileHashes, "_hash", staticmethod(counting))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run("batch", base, "--output-set", f"{tmp_path / 'x.safetensors'}={a}:0.5,{b}",
        "--output-set", f"{tmp_path / 'y.safetensors'}={a}:-1", "-q")
    assert sorted(calls) == sorted([str(a), str(b)])
    for out, files in (("x", [a, b]), ("y", [a])):
        with Checkpoint(tmp_path / f"{out}.safetensors") as c:
            prov = json.loads(c.metadata["qwenlora_merge"])
        assert [l["sha256"] for l in prov["loras"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_batch_toml_and_all_or_nothing(qwen, tmp_path):
    base, truth = qwen
    _loras(truth, tmp_path)
    (tmp_path / "p.toml").write_text(textwrap.dedent("""
        [[outputs]]
        output = "t1.safetensors"
        loras = ["a.safetensors:0.3"]
        [[outputs]]
        output = "t2.safetensors"
        loras = ["missing.safetensors"]
    """))
    res = run("batch", base, tmp_path / "p.toml", ok=False)
    assert res.exit_code == 2 and "missing.safetensors" in res.stderr
    assert not list(tmp_path.glob("t*.safetensors")) and not list(tmp_path.glob(".*partial"))
    res = run("batch", base, "--output-set", f"{tmp_path}/x.safetensors={tmp_path}/a.safetensors",
              "--output-set", f"{tmp_path}/x.safetensors={tmp_path}/b.safetensors", ok=False)
    assert res.exit_code == 2 and "both" in res.stderr


def test_max_rank_truncates_and_reports(qwen, tmp_path):
    base, truth = qwen
    m1, _ = _loras(truth, tmp_path)
    out = tmp_path / "capped.safetensors"
    rep = json.loads(run(base, tmp_path / "a.safetensors", "-o", out, "--max-rank", "64", "--json").stdout)
    assert rep["rank"]["to"] == 64 and quant_rank(out) == 64
    qkv = [l for l in rep["layers"] if l["layer"].endswith("to_qkv")]
    assert qkv and all(l["rank_kept"] == 32 and 0 < l["truncation_error"] < 1 for l in qkv)
    assert all(abs(l["rel_error"] - l["truncation_error"]) < 1e-2 for l in qkv)
    other = [l for l in rep["layers"] if l["layer"].endswith("to_out.0")]
    assert other and all("truncation_error" not in l and l["rel_error"] < 1e-2 for l in other)
    check_loadable(out)
    res = run(base, tmp_path / "a.safetensors", "-o", out, "--max-rank", "40", "--overwrite", ok=False)
    assert res.exit_code == 2 and "multiple of 16" in res.stderr


def test_streaming_writer_memory_does_not_grow_with_tensor_count(tmp_path):
    """Peak RSS of a streamed copy of 4000 tensors equals that of 400: memory is per tensor, not per file."""
    code = textwrap.dedent("""
        import resource, sys, torch
        from converter.st_reader import Checkpoint
        from converter.st_writer import OutSpec, StreamingWriter
        n, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        specs = [OutSpec(f"t{i:05d}", "BF16", (256, 256)) for i in range(n)]
        w = StreamingWriter(path, specs, {})
        t = torch.zeros(256, 256, dtype=torch.bfloat16)
        for s in specs:
            w.write_tensor(s.name, t)
        w.commit()
        with Checkpoint(path) as c:
            w = StreamingWriter(out, [OutSpec(i.name, i.dtype, i.shape) for i in c.tensors.values()], c.metadata)
            for name in c.keys():
                w.write_tensor(name, c.get(name) + 1) if name.endswith("7") else w.copy_tensor(name, c)
            w.commit()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    rss = {}
    for n in (400, 4000):  # 52 MB vs 524 MB of tensors
        r = subprocess.run([sys.executable, "-c", code, str(n), str(tmp_path / f"a{n}"), str(tmp_path / f"b{n}")],
                           capture_output=True, text=True, cwd=os.getcwd(), check=True)
        rss[n] = int(r.stdout.strip()) / 1024  # MB
    assert rss[4000] < rss[400] + 60, rss


def test_killed_merge_leaves_no_output(qwen, tmp_path):
    base, truth = qwen
    _loras(truth, tmp_path)
    out = tmp_path / "killed.safetensors"
    code = textwrap.dedent(f"""
        import os, signal, sys
        import converter.st_writer as io
        orig = io.StreamingWriter.write_tensor
        count = [0]
        def slow(self, name, t):
            count[0] += 1
            if count[0] == 3:
                print("writing", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, name, t)
        io.StreamingWriter.write_tensor = slow
        from converter.cli import main
        main([{base!r}, {str(tmp_path / 'a.safetensors')!r}, "-o", {str(out)!r}, "-q"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL and "writing" in r.stdout
    assert not out.exists()
    # only the hidden temp file can remain after SIGKILL; it never has the output's name
    assert all(p.name.startswith(".killed.safetensors.") for p in tmp_path.iterdir() if "killed" in p.name)


def test_interrupted_merge_cleans_up(qwen, tmp_path):
    base, truth = qwen
    _loras(truth, tmp_path)
    out = tmp_path / "int.safetensors"
    code = textwrap.dedent(f"""
        import converter.st_writer as io
        orig = io.StreamingWriter.write_tensor
        def boom(self, name, t):
            raise KeyboardInterrupt
        io.StreamingWriter.write_tensor = boom
        from converter.cli import main
        main([{base!r}, {str(tmp_path / 'a.safetensors')!r}, "-o", {str(out)!r}, "-q"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "int.safetensors" in p.name]


def test_verify_accepts_good_and_catches_broken(qwen, tmp_path):
    base, truth = qwen
    m1, _ = _loras(truth, tmp_path)
    out = tmp_path / "good.safetensors"
    run(base, tmp_path / "a.safetensors:0.8", "-o", out, "-q", "--mod", "skip")
    res = run("verify", base, out, tmp_path / "a.safetensors:0.8", "--json")
    rep = json.loads(res.stdout)
    assert rep["ok"] and not rep["contract"] and len(rep["layers"]) > 10
    # wrong strength -> every targeted layer off
    res = run("verify", base, out, tmp_path / "a.safetensors:0.5", ok=False)
    assert res.exit_code == 4 and "FAIL" in res.stdout
    # stale metadata rank
    stale = tmp_path / "stale.safetensors"
    with Checkpoint(out) as c:
        meta = dict(c.metadata)
        q = json.loads(meta["quantization_config"])
        q["rank"] = 32
        meta["quantization_config"] = json.dumps(q)
        w = StreamingWriter(stale, [OutSpec(i.name, i.dtype, i.shape) for i in c.tensors.values()], meta)
        for n in c.keys():
            w.copy_tensor(n, c)
        w.commit()
    res = run("verify", base, stale, tmp_path / "a.safetensors:0.8", ok=False)
    assert res.exit_code == 4 and "stale rank" in res.stdout


def test_verify_catches_swapped_w1_w3(tmp_path):
    zb = tmp_path / "z.safetensors"
    build_zimage_checkpoint(zb, layers=1, dim=384, rank=32)
    g = torch.Generator().manual_seed(0)
    mk = lambda: ((torch.randn(8, 384, generator=g) * 0.05).bfloat16(), (torch.randn(1024, 8, generator=g) * 0.05).bfloat16(), None)
    good = {"layers.0.feed_forward.w1": mk(), "layers.0.feed_forward.w3": mk()}
    swapped = {"layers.0.feed_forward.w1": good["layers.0.feed_forward.w3"], "layers.0.feed_forward.w3": good["layers.0.feed_forward.w1"]}
    write_lora(tmp_path / "good.safetensors", good, "diffusers")
    write_lora(tmp_path / "swapped.safetensors", swapped, "diffusers")
    out = tmp_path / "m.safetensors"
    run(zb, tmp_path / "swapped.safetensors", "-o", out, "-q")  # a merge made with w1/w3 the wrong way round
    run("verify", zb, out, tmp_path / "swapped.safetensors", "-q")
    res = run("verify", zb, out, tmp_path / "good.safetensors", ok=False)
    assert res.exit_code == 4 and "feed_forward.net.0.proj" in res.stdout


def test_verify_plot(qwen, tmp_path):
    pytest.importorskip("matplotlib")  # optional dependency; scripts/test.sh installs it
    base, truth = qwen
    _loras(truth, tmp_path)
    out = tmp_path / "m.safetensors"
    run(base, tmp_path / "a.safetensors", "-o", out, "-q", "--mod", "skip")
    png = tmp_path / "fid.png"
    run("verify", base, out, tmp_path / "a.safetensors", "--plot", png, "-q")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

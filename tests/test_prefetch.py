"""The merge and the export compute layers on worker threads ahead of the writer: in order, bounded, errors raised where
the writer takes the layer, and a close that stops the worker."""

from __future__ import annotations

import os
import threading
import time

import pytest

from converter.prefetch import LayerPrefetch


def test_layers_come_in_order_and_at_most_ahead():
    computed: list[str] = []

    def compute(prefix: str, in_order) -> dict:
        computed.append(prefix)
        return {prefix + ".w": len(computed)}

    order = [f"l{i}" for i in range(6)]
    feed = LayerPrefetch(order, compute, ahead=2, workers=1)
    try:
        for _ in range(100):  # the worker stops after two layers nobody took
            if len(computed) == 2:
                break
            time.sleep(0.01)
        time.sleep(0.05)
        assert computed == ["l0", "l1"]
        assert [feed.take(p) for p in order] == [{f"l{i}.w": i + 1} for i in range(6)]
        assert computed == order
    finally:
        feed.close()


def test_an_error_is_raised_by_the_take_of_its_layer():
    def compute(prefix: str, in_order) -> dict:
        if prefix == "bad":
            raise KeyboardInterrupt
        return {prefix: 1}

    feed = LayerPrefetch(["a", "bad", "c"], compute)
    try:
        assert feed.take("a") == {"a": 1}
        with pytest.raises(KeyboardInterrupt):
            feed.take("bad")
    finally:
        feed.close()


def test_out_of_order_take_is_refused_and_close_stops_the_worker():
    started = threading.Event()
    release = threading.Event()
    computed: list[str] = []

    def compute(prefix: str, in_order) -> dict:
        started.set()
        release.wait(5)
        computed.append(prefix)
        return {}

    feed = LayerPrefetch(["a", "b", "c", "d"], compute, ahead=1, workers=1)
    assert started.wait(5)
    with pytest.raises(RuntimeError, match="b taken out of order"):
        feed.take("b")
    release.set()
    feed.close()  # waits for the layer under way, computes no further
    assert not any(worker.is_alive() for worker in feed._workers)
    assert computed == ["a"]


@pytest.mark.parametrize("failing", [None, "l3"])
def test_in_order_sections_take_turns_across_workers(failing):
    """Two workers, layers of uneven cost: the in-order sections run one at a time in layer order (also past a
    layer that fails before reaching its section), the rest overlaps, and every result reaches its layer."""
    inside: list[str] = []
    busy = threading.Lock()

    def compute(prefix: str, in_order) -> dict:
        index = int(prefix[1:])
        if prefix == failing:
            raise ValueError(prefix)
        time.sleep(0.002 * (index % 3))  # before the section: later layers may get there first
        with in_order():
            assert busy.acquire(blocking=False), "two in-order sections at once"
            inside.append(prefix)
            time.sleep(0.001)
            busy.release()
        time.sleep(0.002 * ((index + 1) % 2))
        return {prefix: index}

    order = [f"l{i}" for i in range(12)]
    feed = LayerPrefetch(order, compute, ahead=4, workers=2)
    try:
        for index, prefix in enumerate(order):
            if prefix == failing:
                with pytest.raises(ValueError, match=prefix):
                    feed.take(prefix)
            else:
                assert feed.take(prefix) == {prefix: index}
    finally:
        feed.close()
    assert inside == [p for p in order if p != failing]


def _merge_with_workers(tmp_path, monkeypatch, workers: int, device: str, name: str) -> tuple[bytes, list]:
    """A merge of a LoRA on every kind of layer (W4A4, bf16, modulation), its layers computed by `workers`
    threads (0: by the writer): the output's bytes and the report's layers in order."""
    import json

    from click.testing import CliRunner

    from builders import build_qwen_checkpoint
    from lora_builders import random_lora_modules, write_lora

    from converter import pipeline
    from converter.cli import main

    base, lora = tmp_path / "b.safetensors", tmp_path / "l.safetensors"
    if not base.exists():
        truth = build_qwen_checkpoint(base, blocks=3, dim=256)
        write_lora(lora, random_lora_modules(truth["lora_targets"], rank=8, seed=5, scale=0.05), "diffusers")
    monkeypatch.setattr(pipeline, "MERGE_WORKERS_CUDA" if device == "cuda" else "MERGE_WORKERS", workers)
    out = tmp_path / f"{name}.safetensors"
    res = CliRunner().invoke(main, [str(base), str(lora), "-o", str(out), "--json", "--device", device])
    assert res.exit_code == 0, res.output
    return out.read_bytes(), [(r["layer"], r["method"]) for r in json.loads(res.stdout)["layers"]]


def test_workers_computing_layers_at_once_change_nothing(tmp_path, monkeypatch):
    """Layers computed by three workers at once (only their records wait for the layer order) give the file and
    the report a merge computing one layer after the other gives."""
    ref_bytes, ref_layers = _merge_with_workers(tmp_path, monkeypatch, 0, "cpu", "sequential")
    assert any(method == "modulation" for _, method in ref_layers)
    for attempt in range(2):
        got_bytes, got_layers = _merge_with_workers(tmp_path, monkeypatch, 3, "cpu", f"workers{attempt}")
        assert got_layers == ref_layers
        assert got_bytes == ref_bytes


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_workers_on_their_own_streams_change_nothing(tmp_path, monkeypatch):
    """On a CUDA device each worker computes on its own stream and replays its own captured rounding loops: three
    workers give the bytes one gives."""
    ref_bytes, ref_layers = _merge_with_workers(tmp_path, monkeypatch, 1, "cuda", "one")
    for attempt in range(2):
        got_bytes, got_layers = _merge_with_workers(tmp_path, monkeypatch, 3, "cuda", f"three{attempt}")
        assert got_layers == ref_layers
        assert got_bytes == ref_bytes


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_workers_start_dense_updates_at_once(tmp_path):
    """Full diffs on several W4A4 layers (a truncated SVD each) computed by the CUDA workers in a fresh process:
    their first linear algebra calls come at once, which torch's lazy loading of its CUDA linear algebra does not
    survive unless it was loaded before the workers started."""
    import subprocess
    import sys

    import adapter_oracles as O
    from builders import build_qwen_checkpoint

    base, lora = tmp_path / "b.safetensors", tmp_path / "d.safetensors"
    build_qwen_checkpoint(base, blocks=2, dim=256)
    specs = {f"transformer_blocks.{b}.{name}": O.random_full_diff(*shape, bias=False, seed=10 * b + i)
             for b in range(2) for i, (name, shape) in enumerate([("img_mlp.net.2", (256, 1024)),
                                                                   ("txt_mlp.net.2", (256, 1024)),
                                                                   ("attn.to_out.0", (256, 256))])}
    O.write_adapter_file(lora, specs, "lycoris-prefix")
    res = subprocess.run([sys.executable, "-m", "converter.cli", str(base), str(lora), "-o",
                          str(tmp_path / "o.safetensors"), "--device", "cuda", "-q"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr

"""The extension points: a layer kind and an adapter type registered from a test (one class each, nothing
else edited) are planned, merged, verified and reported through the registries alone."""

from __future__ import annotations

import json

import pytest
import torch

from builders import build_qwen_checkpoint
from checks import run
from converter.adapters import ADAPTERS, Adapter, KeyPattern
from converter.layers import BY_NAME, KINDS, LayerKind
from converter.layout import Layout
from converter.st_reader import Checkpoint
from lora_builders import write_lora

D = 128


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    p = tmp_path_factory.mktemp("registry") / "svdq-int4_r32-qwen-image-tiny.safetensors"
    return str(p), build_qwen_checkpoint(p, blocks=1, dim=D, rank=32)


@pytest.fixture
def norm_scale_kind():
    """A kind for 1-D parameters that multiplies the weight by (1 + Δ) instead of adding Δ."""
    saved = KINDS.pop(Layout.VECTOR)

    class NormScale(LayerKind, layouts=(Layout.VECTOR,)):
        name = "norm_scale"
        verify_figure = "max_abs_error"

        @classmethod
        def apply(cls, ctx, plan, layer, op):
            from converter.layers.deltas import dense_delta

            if op is None:
                return {}, None
            w = ctx.base.get(layer.key("weight"))
            new = (w.float() * (1 + dense_delta(op))).to(w.dtype)
            return {layer.key("weight"): new}, {"scaled": True}

        @classmethod
        def verify(cls, ctx, plan, layer, op):
            from converter.layers.deltas import dense_delta

            w0, w1 = ctx.base.get(layer.key("weight")), ctx.merged.get(layer.key("weight"))
            want = (w0.float() * (1 + dense_delta(op))).to(w0.dtype) if op is not None else w0
            err = float((w1.float() - want.float()).abs().max())
            return {"layer": layer.prefix, "kind": cls.name, "max_abs_error": err, "ok": err == 0, "problems": []}

        @classmethod
        def summarize(cls, records):
            return {"layers": len(records), "scaled": sum(r.get("scaled", False) for r in records)}

        @classmethod
        def render_summary(cls, d):
            return f"fidelity norm_scale x{d['layers']}: {d['scaled']} scaled"

    yield NormScale
    KINDS[Layout.VECTOR] = saved
    del BY_NAME["norm_scale"]


@pytest.fixture
def doubled_delta_adapter():
    """An adapter type for keys `….twice`: ΔW = 2·strength·tensor."""

    class Twice(Adapter, name="twice"):
        title = "twice"
        key_patterns = (KeyPattern(r"twice", "twice", "diff"),)
        signature = parts = frozenset({"twice"})

        @property
        def shape(self):
            return tuple(self.part_shape("twice"))

        def delta(self, base=None):
            return 2 * self.lf.strength * self.tensor("twice").float()

    yield Twice
    del ADAPTERS["twice"]


def test_a_layer_kind_registered_from_a_test(qwen, tmp_path, norm_scale_kind):
    base, truth = qwen
    delta = torch.randn(128, generator=torch.Generator().manual_seed(0)) * 0.1
    lp = tmp_path / "norm.safetensors"
    write_lora(lp, {}, "diffusers", extra={"transformer_blocks.0.attn.norm_q.diff": delta})
    out = tmp_path / "o.safetensors"
    rep = json.loads(run(base, lp, "-o", out, "--json").stdout)
    assert [t["method"] for t in rep["targets"]] == ["norm_scale"]
    assert rep["layers_summary"]["norm_scale"] == {"layers": 1, "scaled": 1}
    with Checkpoint(base) as b, Checkpoint(out) as m:
        key = "transformer_blocks.0.attn.norm_q.weight"
        want = (b.get(key).float() * (1 + delta)).to(torch.bfloat16)
        assert torch.equal(m.get(key), want)
    res = run("verify", base, out, lp, "--json")
    layers = [l for l in json.loads(res.stdout)["layers"] if l["kind"] == "norm_scale"]
    assert layers and all(l["ok"] and l["max_abs_error"] == 0 for l in layers)
    assert "fidelity norm_scale x1: 1 scaled" in run(base, lp, "-o", out, "--overwrite").stdout


def test_an_adapter_type_registered_from_a_test(qwen, tmp_path, doubled_delta_adapter):
    base, truth = qwen
    delta = torch.randn(D, 64, generator=torch.Generator().manual_seed(1)) * 0.01
    lp = tmp_path / "twice.safetensors"
    write_lora(lp, {}, "diffusers", extra={"img_in.twice": delta})
    out = tmp_path / "o.safetensors"
    rep = json.loads(run(base, f"{lp}:0.5", "-o", out, "--json").stdout)
    assert rep["loras"][0]["keys"] == {"total": 1, "applied": 1, "ignored": 0, "unmapped": 0}
    assert rep["targets"][0]["adapters"] == ["twice"]
    with Checkpoint(base) as b, Checkpoint(out) as m:
        w0 = b.get("img_in.weight")
        assert torch.equal(m.get("img_in.weight"), (w0.float() + delta).to(w0.dtype))
    run("verify", base, out, f"{lp}:0.5")

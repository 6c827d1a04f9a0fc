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


# -- a storage layout declared from a test: its Layout member, its codec and its layer kind, nothing else -------------
@pytest.fixture
def transposed_layout():
    """A 16-bit linear stored transposed, as `weight_t` (in, out): declared, decoded, detected, merged, verified
    and exported by the three pieces a new layout brings."""
    from converter.codecs import LAYER_CODECS, Codec, LayerCodec
    from converter.layers import DETECTORS, LayerKind
    from converter.layout import Layer

    layout = Layout.declare("DENSE_TRANSPOSED", "dense-transposed")

    class TransposedWeight(Codec, name="transposed_weight"):
        @classmethod
        def pack(cls, x):
            return x.t().contiguous()

        @classmethod
        def unpack(cls, x):
            return x.t().contiguous()

    class TransposedLayer(LayerCodec, layout=layout):
        weight_parts = required_parts = ("weight_t",)

        @classmethod
        def dequantize(cls, t):
            return TransposedWeight.unpack(t["weight_t"]).float()

    class TransposedAdd(LayerKind, layouts=(layout,)):
        name = "transposed_add"

        @classmethod
        def detect(cls, path, tensors, prefix, part, info):
            if part != "weight_t" or len(info.shape) != 2:
                return None
            return Layer(prefix, layout, info.shape[0], info.shape[1], f"{prefix}.bias" in tensors, dtype=info.dtype)

        @classmethod
        def touched(cls, layer, op, plan):
            return {layer.key("weight_t")} if op is not None and op.weight_contributions else set()

        @classmethod
        def apply(cls, ctx, plan, layer, op):
            from converter.factors import dense_record
            from converter.layers.deltas import dense_delta

            if op is None:
                return {}, None
            stored = ctx.base.get(layer.key("weight_t"))
            weight = TransposedLayer.dequantize({"weight_t": stored})
            new = (weight + dense_delta(op)).to(stored.dtype)
            record = dense_record(weight.to(stored.dtype), new, dense_delta(op))
            return {layer.key("weight_t"): TransposedWeight.pack(new)}, {"rel_error": record["rel_error"]}

        @classmethod
        def verify(cls, ctx, plan, layer, op):
            want = cls.apply(ctx, plan, layer, op)[0].get(layer.key("weight_t"), ctx.base.get(layer.key("weight_t")))
            same = torch.equal(ctx.merged.get(layer.key("weight_t")), want)
            return {"layer": layer.prefix, "kind": cls.name, "rel_error": 0.0 if same else 1.0, "ok": same,
                    "problems": [] if same else ["weight_t differs"]}

        @classmethod
        def export_outputs(cls, tree, layer, names):
            (part,) = tree.parts_of(layer)
            for name in names:
                suffix = name.rpartition(".")[2]
                if suffix == "weight_t":
                    tree.add(f"{part.name}.weight", layer, name, "untranspose",
                             shape=(layer.out_features, layer.in_features))
                else:
                    tree.add(f"{part.name}.{suffix}", layer, name)

        @classmethod
        def export_tensor(cls, sources, out, tensor):
            if out.op == "untranspose":
                return TransposedWeight.unpack(tensor)
            return super().export_tensor(sources, out, tensor)

    yield layout
    for registry in (KINDS, DETECTORS, LAYER_CODECS):
        del registry[layout]
    del BY_NAME["transposed_add"]
    Layout.forget(layout)


def test_a_layout_declared_from_a_test_merges_verifies_and_exports(qwen, tmp_path, transposed_layout):
    from safetensors.torch import load_file, save_file

    from lora_builders import random_lora_modules

    base_path, truth = qwen
    with Checkpoint(base_path) as source:
        metadata = dict(source.metadata)
    tensors = load_file(base_path)
    weight = tensors.pop("img_in.weight")
    tensors["img_in.weight_t"] = weight.t().contiguous()
    base = tmp_path / "svdq-int4_r32-qwen-image-tiny.safetensors"
    save_file(tensors, str(base), metadata=metadata)
    lora = tmp_path / "lora.safetensors"
    modules = random_lora_modules({"img_in": tuple(weight.shape)}, rank=4, seed=2)
    write_lora(lora, modules, "diffusers")
    merged = tmp_path / "merged.safetensors"
    report = json.loads(run(base, f"{lora}:0.5", "-o", merged, "--json").stdout)
    assert [(t["layer"], t["layout"], t["method"]) for t in report["targets"]] == [
        ("img_in", "dense-transposed", "transposed_add")]
    down, up, _ = modules["img_in"]
    want = (weight.float() + 0.5 * up.float() @ down.float()).to(weight.dtype)
    with Checkpoint(merged) as result:
        assert "img_in.weight" not in result.tensors
        assert torch.equal(result.get("img_in.weight_t"), want.t())
    checked = json.loads(run("verify", base, merged, "--json").stdout)
    assert [layer["ok"] for layer in checked["layers"] if layer["kind"] == "transposed_add"] == [True]
    folder = tmp_path / "diffusers"
    run("export-diffusers", base, f"{lora}:0.5", "-o", folder, "-q")
    exported = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert "img_in.weight_t" not in exported and torch.equal(exported["img_in.weight"], want)

"""The test fixtures themselves: built checkpoints load, the loader emulation rejects broken files, the
builders' truth agrees with the packed bytes (decoded with this file's own closed-form formulas of
docs/format.md §3, §5 and §8, independent of converter/), and the LoRA writer's key names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import builders
from builders import E2M1_VALUES, build_qwen_checkpoint, build_zimage_checkpoint
from loader_emulation import check_loadable, expected_parameters, parse_metadata
from lora_builders import FORMATS, lora_keys, random_lora_modules, write_lora

BF16 = torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add overhead (a lot of it on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ doc-formula decoders (test only)


def _unpack_qweight(qweight: torch.Tensor, signed: bool) -> torch.Tensor:
    o, half = qweight.shape
    i = half * 2
    w = qweight.contiguous().view(torch.int32).reshape(o // 128, i // 64, 8, 8, 4, 2, 2)
    nib = (w[..., None] >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF
    q = nib.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(o, i)
    return ((q ^ 8) - 8) if signed else q


def _unpack_vector(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 8, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1)


def _unpack_wscales_int4(ws: torch.Tensor, o: int) -> torch.Tensor:
    ng = ws.numel() // o
    return ws.reshape(o // 128, ng, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(o, ng)


def _unpack_wscales_nvfp4(ws: torch.Tensor, o: int) -> torch.Tensor:
    ng = ws.numel() // o
    x = ws.float().reshape(o // 128, ng // 4, 1, 8, 4, 4, 4)
    return x.permute(0, 2, 5, 4, 3, 1, 6).reshape(o, ng)


def _unpack_lowrank(p: torch.Tensor, down: bool) -> torch.Tensor:
    c, r = p.shape
    x = p.reshape(c // 16, r // 16, 8, 4, 2, 2, 2)  # [ct][rt][l][q][s][t][e]
    if down:  # n-role = rank, k-role = in_features -> (R, I)
        return x.permute(1, 4, 2, 0, 5, 3, 6).reshape(r, c)
    return x.permute(0, 4, 2, 1, 5, 3, 6).reshape(c, r)  # n-role = out, k-role = rank -> (O, R)


def _unpack_awq(qweight: torch.Tensor) -> torch.Tensor:
    o4, half = qweight.shape
    o, i = o4 * 4, half * 2
    u16 = qweight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    u16 = u16.reshape(o4, i // 64, 4, 2, 8)
    nib = (u16[..., None] >> (4 * torch.arange(4, dtype=torch.int32))) & 0xF
    return nib.permute(0, 2, 1, 3, 5, 4).reshape(o, i)


def _assert_close(actual, expected, *, rtol, atol):
    # (torch.testing.assert_close costs ~2 s of lazy imports on first use)
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    assert not bad.any(), f"{int(bad.sum())} elements differ, max abs err {float(err.max())}"


def _rewrite(src, dst, *, drop=(), add=None, replace=None, metadata=None):
    sd = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
    for k in drop:
        del sd[k]
    sd.update(add or {})
    sd.update(replace or {})
    if metadata is not None:
        md = metadata(md)
    save_file(sd, str(dst), metadata=md)
    return dst


def _set_rank(rank):
    def edit(md):
        qc = json.loads(md["quantization_config"])
        qc["rank"] = rank
        md["quantization_config"] = json.dumps(qc)
        return md

    return edit


# --------------------------------------------------------------------------------- loadability


def test_every_checkpoint_loads(any_checkpoint):
    check_loadable(any_checkpoint.path)


def test_truth_matches_file(any_checkpoint):
    path, truth = any_checkpoint
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == truth["keys"]
        assert f.metadata() == truth["metadata"]
    md = truth["metadata"]
    assert set(md) == {"config", "comfy_config", "model_class", "quantization_config"}
    qc = json.loads(md["quantization_config"])
    assert qc["rank"] == truth["rank"] == 32
    assert qc["method"] == "svdquant"
    if truth["precision"] == "int4":
        assert qc["weight"] == {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    else:
        assert qc["weight"] == {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
    assert qc["activation"] == qc["weight"]
    assert ("skip_refiners" in qc) == (truth["family"] == "zimage")
    info = parse_metadata(md)
    assert info["family"] == truth["family"] and info["precision"] == truth["precision"]
    # bf16 everywhere except the packed integer / fp8 / wtscale tensors
    for k, v in truth["state_dict"].items():
        if k.endswith(".qweight"):
            assert v.dtype in (torch.int8, torch.int32), k
        elif k.endswith(".wscales") and truth["precision"] == "nvfp4" and k[: -len(".wscales")] in truth["svdq"]:
            assert v.dtype == torch.float8_e4m3fn, k
        elif k.endswith(".wtscale"):
            assert v.dtype == torch.float32 and v.numel() == 1, k
        else:
            assert v.dtype == BF16, k


def test_key_counts(qwen_int4, qwen_nvfp4, zimage_int4, zimage_int4_skip_refiners):
    t = qwen_int4.truth
    assert len(t["svdq"]) == 8 * 2 and len(t["awq"]) == 2 * 2
    assert "transformer_blocks.1.attn.to_qkv.bias" in t["keys"]
    assert not any(k.endswith((".wcscales", ".wtscale")) for k in t["keys"])
    t = qwen_nvfp4.truth
    assert sum(k.endswith(".wcscales") for k in t["keys"]) == 16
    assert sum(k.endswith(".wtscale") for k in t["keys"]) == 16
    t = zimage_int4.truth
    assert len(t["svdq"]) == 4 * 6 and not t["awq"]
    assert not any(k.endswith(".bias") and k.rsplit(".", 1)[0] in t["svdq"] for k in t["keys"])
    assert "context_refiner.0.adaLN_modulation.0.weight" not in t["keys"]
    assert "noise_refiner.1.adaLN_modulation.0.bias" in t["keys"]
    t = zimage_int4_skip_refiners.truth
    assert len(t["svdq"]) == 4 * 2
    assert t["state_dict"]["noise_refiner.0.attention.to_q.weight"].shape == (384, 384)
    assert t["state_dict"]["context_refiner.1.feed_forward.net.0.proj.weight"].shape == (2048, 384)
    assert t["state_dict"]["context_refiner.1.feed_forward.net.2.weight"].shape == (384, 1024)
    assert t["target_map"]["noise_refiner.0.feed_forward.w1"] == ("noise_refiner.0.feed_forward.net.0.proj", 1024, 2048)


def test_expected_table_is_metadata_only(qwen_int4):
    table = expected_parameters(qwen_int4.truth["metadata"])
    assert table["transformer_blocks.0.attn.to_qkv.proj_down"] == ((256, 32), BF16)
    assert table["transformer_blocks.1.img_mod.1.qweight"] == ((1536 // 4, 128), torch.int32)
    assert table["transformer_blocks.1.img_mod.1.wscales"] == ((4, 1536), BF16)


def test_wcscales_may_be_missing_and_wtscale_is_popped(qwen_nvfp4, tmp_path):
    keys = qwen_nvfp4.truth["keys"]
    drop = [k for k in keys if k.endswith(".wcscales")][:3] + [k for k in keys if k.endswith(".wtscale")][:3]
    check_loadable(_rewrite(qwen_nvfp4.path, tmp_path / "x.safetensors", drop=drop))


# --------------------------------------------------------------------------------- rejections


def _rejects(path, *fragments):
    with pytest.raises(AssertionError) as exc:
        check_loadable(path)
    msg = str(exc.value)
    for frag in fragments:
        assert frag in msg, msg
    return msg


@pytest.mark.parametrize("fixture", ["qwen_int4", "zimage_int4"])
def test_rejects_stale_rank(fixture, request, tmp_path):
    built = request.getfixturevalue(fixture)
    bad = _rewrite(built.path, tmp_path / "r.safetensors", metadata=_set_rank(48))
    msg = _rejects(bad, "shape mismatch", ".proj_down", ".proj_up", "rank=48")
    assert "qweight" not in msg


def test_rejects_missing_rank_when_not_32(make_qwen, tmp_path):
    built = make_qwen(rank=16)

    def drop_rank(md):
        qc = json.loads(md["quantization_config"])
        del qc["rank"]
        md["quantization_config"] = json.dumps(qc)
        return md

    _rejects(_rewrite(built.path, tmp_path / "r.safetensors", metadata=drop_rank), "rank=32", "proj_down")
    check_loadable(built.path)


def test_rejects_rank_not_multiple_of_16(qwen_int4, tmp_path):
    _rejects(_rewrite(qwen_int4.path, tmp_path / "r.safetensors", metadata=_set_rank(40)), "multiple of 16")


@pytest.mark.parametrize("fixture", ["qwen_int4", "zimage_int4_skip_refiners"])
def test_rejects_extra_key(fixture, request, tmp_path):
    built = request.getfixturevalue(fixture)
    extra = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 256, dtype=BF16)}
    _rejects(_rewrite(built.path, tmp_path / "x.safetensors", add=extra), "unexpected key", "lora_A")


def test_rejects_wtscale_in_int4(qwen_int4, tmp_path):
    extra = {"transformer_blocks.0.attn.to_qkv.wtscale": torch.ones(1)}
    _rejects(_rewrite(qwen_int4.path, tmp_path / "x.safetensors", add=extra), "unexpected key", "wtscale")


@pytest.mark.parametrize(
    "key",
    [
        "transformer_blocks.1.attn.to_out.0.smooth_factor_orig",
        "transformer_blocks.0.img_mod.1.wzeros",
        "transformer_blocks.0.attn.norm_added_k.weight",
        "proj_out.bias",
    ],
)
def test_rejects_missing_key(qwen_int4, tmp_path, key):
    _rejects(_rewrite(qwen_int4.path, tmp_path / "m.safetensors", drop=[key]), "missing key", key)


def test_rejects_missing_key_zimage(zimage_int4, tmp_path):
    key = "context_refiner.1.feed_forward.net.2.proj_up"
    _rejects(_rewrite(zimage_int4.path, tmp_path / "m.safetensors", drop=[key]), "missing key", key)


@pytest.mark.parametrize(
    "key,dtype",
    [
        ("transformer_blocks.0.attn.to_qkv.proj_up", torch.float16),
        ("transformer_blocks.0.attn.to_qkv.proj_down", torch.float32),
        ("transformer_blocks.1.txt_mlp.net.2.bias", torch.float16),
        ("img_in.weight", torch.float32),
    ],
)
def test_rejects_wrong_dtype(qwen_int4, tmp_path, key, dtype):
    t = qwen_int4.truth["state_dict"][key].to(dtype)
    _rejects(_rewrite(qwen_int4.path, tmp_path / "d.safetensors", replace={key: t}), "dtype mismatch", key)


def test_rejects_wrong_integer_dtype(qwen_int4, zimage_nvfp4, tmp_path):
    key = "transformer_blocks.0.img_mod.1.qweight"
    q = qwen_int4.truth["state_dict"][key].view(torch.int8)  # same bytes, wrong dtype/shape
    _rejects(_rewrite(qwen_int4.path, tmp_path / "a.safetensors", replace={key: q}), "dtype mismatch", key)
    key = "layers.0.attention.to_qkv.wscales"
    ws = zimage_nvfp4.truth["state_dict"][key].to(BF16)
    _rejects(_rewrite(zimage_nvfp4.path, tmp_path / "b.safetensors", replace={key: ws}), "dtype mismatch", key)


def test_rejects_bad_metadata(qwen_int4, tmp_path):
    def drop_qc(md):
        del md["quantization_config"]
        return md

    def garble_qc(md):
        md["quantization_config"] = "{rank: 32"
        return md

    def bad_class(md):
        md["model_class"] = "NunchakuFluxTransformer2dModel"
        return md

    _rejects(_rewrite(qwen_int4.path, tmp_path / "a.safetensors", metadata=drop_qc), "quantization_config")
    _rejects(_rewrite(qwen_int4.path, tmp_path / "b.safetensors", metadata=garble_qc), "not valid JSON")
    _rejects(_rewrite(qwen_int4.path, tmp_path / "c.safetensors", metadata=bad_class), "model_class")


def test_rejects_precision_mismatch(qwen_int4, tmp_path):
    def to_fp4(md):
        qc = json.loads(md["quantization_config"])
        qc["weight"] = {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
        md["quantization_config"] = json.dumps(qc)
        return md

    _rejects(_rewrite(qwen_int4.path, tmp_path / "p.safetensors", metadata=to_fp4), "wscales", "precision=nvfp4")


def test_rejects_skip_refiners_flip(zimage_int4, tmp_path):
    def flip(md):
        qc = json.loads(md["quantization_config"])
        qc["skip_refiners"] = True
        md["quantization_config"] = json.dumps(qc)
        return md

    _rejects(_rewrite(zimage_int4.path, tmp_path / "s.safetensors", metadata=flip), "noise_refiner.0.attention.to_q")


# -------------------------------------------------------------- truth vs packed bytes (doc formulas)


def _layer_keys(sd, module):
    return {k[len(module) + 1 :]: v for k, v in sd.items() if k.startswith(module + ".")}


@pytest.mark.parametrize("fixture", ["qwen_int4", "qwen_nvfp4", "qwen_int4_fused_smooth", "zimage_nvfp4"])
def test_svdq_truth_decodes(fixture, request):
    truth = request.getfixturevalue(fixture).truth
    sd = truth["state_dict"]
    nvfp4 = truth["precision"] == "nvfp4"
    for module, info in truth["svdq"].items():
        if module.startswith(("layers.1.", "noise_refiner.1.", "context_refiner.0.")):
            continue  # same shapes as layers.0 / the other refiner: keep the test quick
        t = _layer_keys(sd, module)
        o, i = info["weight"].shape
        q = _unpack_qweight(t["qweight"], signed=not nvfp4)
        assert torch.equal(q, info["q"].to(torch.int32)), module
        if nvfp4:
            ws = _unpack_wscales_nvfp4(t["wscales"], o)
            wc = _unpack_vector(t["wcscales"]).float()
            wt = float(t["wtscale"].item())
            assert torch.equal(wc, info["wcscales"]) and wt == info["wtscale"]
            w_hat = E2M1_VALUES[q.long()] * ws.repeat_interleave(16, 1) * wt
        else:
            ws = _unpack_wscales_int4(t["wscales"], o).float()
            wc = torch.ones(o)
            w_hat = q.float() * ws.repeat_interleave(64, 1)
        assert torch.equal(ws.float(), info["wscales"]), module
        s = _unpack_vector(t["smooth_factor"])
        s_orig = _unpack_vector(t["smooth_factor_orig"])
        assert torch.equal(s, info["smooth_runtime"]) and torch.equal(s_orig, info["smooth"]), module
        assert info["fused_smooth"] == bool((s == 1).all() and not (s_orig == 1).all())
        down = _unpack_lowrank(t["proj_down"], down=True)
        up = _unpack_lowrank(t["proj_up"], down=False)
        assert torch.equal(down, info["lora_down"]) and torch.equal(up, info["lora_up"]), module
        assert down.abs().max() > 0 and up.abs().max() > 0
        if info["bias"] is None:
            assert "bias" not in t
        else:
            assert torch.equal(_unpack_vector(t["bias"]), info["bias_stored"]), module
        # docs/format.md §5: W_eff = diag(wcscales)·Ŵ·diag(1/s) + U·D
        w_eff = wc[:, None] * w_hat / s.float()[None, :] + up.float() @ down.float()
        _assert_close(w_eff, info["w_eff"], rtol=1e-5, atol=1e-6)
        rel = (info["w_deq"] - info["weight"].float()).norm() / info["weight"].float().norm()
        assert rel < 0.3, (module, float(rel))


def test_fused_smooth_fixture(qwen_int4_fused_smooth):
    truth = qwen_int4_fused_smooth.truth
    assert truth["fused_smooth"] == ["transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn.to_out.0"]
    out, add = truth["svdq"]["transformer_blocks.0.attn.to_out.0"], truth["svdq"]["transformer_blocks.0.attn.to_add_out"]
    assert torch.equal(out["smooth"], add["smooth"]) and (out["smooth_runtime"] == 1).all()
    s = out["smooth"].float()
    for qkv in ("transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.add_qkv_proj"):
        info = truth["svdq"][qkv]
        assert not info["fused_smooth"]
        # the stored V rows are the logical ones divided by s (bias exactly up to bf16 rounding)
        _assert_close(
            info["bias_stored"].float()[512:], info["bias"].float()[512:] / s, rtol=1e-2, atol=1e-4
        )
    assert not truth["svdq"]["transformer_blocks.1.attn.to_out.0"]["fused_smooth"]


def test_awq_truth_decodes(qwen_int4):
    truth = qwen_int4.truth
    sd = truth["state_dict"]
    for module, info in truth["awq"].items():
        t = _layer_keys(sd, module)
        o, i = info["weight"].shape
        q = _unpack_awq(t["qweight"])
        assert torch.equal(q, info["q"].to(torch.int32)), module
        g = torch.arange(i) // 64
        w_i = q.float() * t["wscales"].float()[g, :].t() + t["wzeros"].float()[g, :].t()
        w_d = w_i.view(o // 6, 6, i).transpose(0, 1).reshape(o, i)  # undo d*6+k interleave
        assert torch.equal(w_d, info["w_deq"])
        rel = (w_d - info["weight"].float()).norm() / info["weight"].float().norm()
        assert rel < 0.2
        # bias: interleaved, +1 on the scale entries (k = 1, 4)
        b = t["bias"].float().view(o // 6, 6)
        b_ref = info["bias"].float().view(6, o // 6).t()
        _assert_close(b - b_ref, torch.tensor([0, 1, 0, 0, 1, 0.0]).expand_as(b), atol=8e-3, rtol=0)
        assert t["wscales"].shape == (i // 64, o) and t["wzeros"].shape == (i // 64, o)


def test_e2m1_codes_equal_deepcompressor():
    from deepcompressor.backend.utils import fp_quantize

    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(20000, generator=g) * 3,
            torch.arange(-800, 801) / 100.0,  # every tie point of the codebook
            torch.tensor([0.0, -0.0, 1e-9, -1e-9, 0.25, -0.25, 5.0, -5.0, 7.0, -9.0]),
        ]
    )
    assert torch.equal(builders._e2m1_codes(x), fp_quantize(x))


def _same_file(a, b):
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        assert fa.metadata() == fb.metadata()


def test_fp_quantize_hook_is_byte_identical(tmp_path, monkeypatch):
    kw = dict(blocks=1, dim=128, text_dim=128, precision="nvfp4", seed=9)
    build_qwen_checkpoint(tmp_path / "a.safetensors", **kw)
    monkeypatch.setattr(builders, "FAST_FP_QUANTIZE", False)
    build_qwen_checkpoint(tmp_path / "b.safetensors", **kw)
    _same_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_builders_are_deterministic(tmp_path):
    build_qwen_checkpoint(tmp_path / "a.safetensors", blocks=1, dim=128, text_dim=128, seed=7)
    build_qwen_checkpoint(tmp_path / "b.safetensors", blocks=1, dim=128, text_dim=128, seed=7)
    _same_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_builder_argument_checks(tmp_path):
    with pytest.raises(ValueError):
        build_qwen_checkpoint(tmp_path / "a.safetensors", rank=24)
    with pytest.raises(ValueError):
        build_qwen_checkpoint(tmp_path / "a.safetensors", precision="fp8")
    with pytest.raises(ValueError):
        build_zimage_checkpoint(tmp_path / "a.safetensors", dim=200)


def test_other_sizes_load(make_qwen, make_zimage):
    check_loadable(make_qwen("a", blocks=1, dim=128, text_dim=192, rank=48).path)
    check_loadable(make_zimage("b", layers=1, dim=384, rank=16, precision="nvfp4", skip_refiners=True).path)


def test_target_map_shapes(qwen_int4, zimage_int4):
    for truth in (qwen_int4.truth, zimage_int4.truth):
        for name, (module, r0, r1) in truth["target_map"].items():
            o, i = truth["lora_targets"][name]
            w = truth["weights"][module]
            assert r1 - r0 == o and w.shape[1] == i and r1 <= w.shape[0], name
    tm = zimage_int4.truth["target_map"]
    assert tm["layers.0.feed_forward.w3"] == ("layers.0.feed_forward.net.0.proj", 0, 1024)
    assert tm["layers.0.feed_forward.w1"] == ("layers.0.feed_forward.net.0.proj", 1024, 2048)
    assert qwen_int4.truth["target_map"]["transformer_blocks.1.attn.add_v_proj"] == (
        "transformer_blocks.1.attn.add_qkv_proj",
        512,
        768,
    )


# ---------------------------------------------------------------------------------- LoRA writer

_EXPECTED_KEYS = {
    "diffusers": (
        "transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer_blocks.0.attn.to_q.lora_B.weight",
        "transformer_blocks.0.attn.to_q.alpha",
    ),
    "peft_adapter": (
        "transformer_blocks.0.attn.to_q.lora_A.default.weight",
        "transformer_blocks.0.attn.to_q.lora_B.default.weight",
        "transformer_blocks.0.attn.to_q.alpha",
    ),
    "peft_raw": (
        "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight",
        "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight",
        "base_model.model.transformer_blocks.0.attn.to_q.alpha",
    ),
    "transformer": (
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
        "transformer.transformer_blocks.0.attn.to_q.alpha",
    ),
    "comfy": (
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight",
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight",
        "diffusion_model.transformer_blocks.0.attn.to_q.alpha",
    ),
    "lightx2v": (
        "transformer_blocks.0.attn.to_q.lora_down.weight",
        "transformer_blocks.0.attn.to_q.lora_up.weight",
        "transformer_blocks.0.attn.to_q.alpha",
    ),
    "kohya": (
        "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight",
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight",
        "lora_unet_transformer_blocks_0_attn_to_q.alpha",
    ),
    "lycoris": (
        "lycoris_transformer_blocks_0_attn_to_q.lora_down.weight",
        "lycoris_transformer_blocks_0_attn_to_q.lora_up.weight",
        "lycoris_transformer_blocks_0_attn_to_q.alpha",
    ),
    "diffsynth": (
        "transformer_blocks.0.attn.to_q.lora_A.default_0.default.weight",
        "transformer_blocks.0.attn.to_q.lora_B.default_0.default.weight",
        "transformer_blocks.0.attn.to_q.alpha",
    ),
}


def test_formats_cover_everything():
    assert set(FORMATS) == set(_EXPECTED_KEYS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_writer_keys(fmt, tmp_path):
    mods = random_lora_modules(
        {"transformer_blocks.0.attn.to_q": (256, 256), "transformer_blocks.0.img_mlp.net.2": (256, 1024)},
        rank=8,
        seed=0,
        alpha=4.0,
    )
    mods["transformer_blocks.0.img_mlp.net.2"] = mods["transformer_blocks.0.img_mlp.net.2"][:2] + (None,)
    extra = {"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}
    written = write_lora(tmp_path / "l.safetensors", mods, fmt, extra=extra, metadata={"ss_network_dim": 8})
    ka, kb, kalpha = _EXPECTED_KEYS[fmt]
    assert lora_keys("transformer_blocks.0.attn.to_q", fmt) == (ka, kb, kalpha)
    with safe_open(str(tmp_path / "l.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"ss_network_dim": "8"}
        assert keys == set(written)
        assert {ka, kb, kalpha} <= keys
        a, b, alpha = f.get_tensor(ka), f.get_tensor(kb), f.get_tensor(kalpha)
    assert a.shape == (8, 256) and b.shape == (256, 8) and a.dtype == BF16
    assert alpha.shape == () and alpha.dtype == torch.float32 and float(alpha) == 4.0
    assert torch.equal(a, mods["transformer_blocks.0.attn.to_q"][0])
    a2, b2, alpha2 = lora_keys("transformer_blocks.0.img_mlp.net.2", fmt)
    assert a2 in keys and b2 in keys and alpha2 not in keys
    assert "text_encoder.x.lora_A.weight" in keys
    assert len(keys) == 2 + 3 + 1


def test_lora_writer_zimage_names(tmp_path):
    mods = random_lora_modules({"layers.0.feed_forward.w1": (1024, 384)}, rank=4, seed=1)
    assert set(write_lora(tmp_path / "k.safetensors", mods, "kohya")) == {
        "lora_unet_layers_0_feed_forward_w1.lora_down.weight",
        "lora_unet_layers_0_feed_forward_w1.lora_up.weight",
    }
    assert set(write_lora(tmp_path / "c.safetensors", mods, "comfy")) == {
        "diffusion_model.layers.0.feed_forward.w1.lora_A.weight",
        "diffusion_model.layers.0.feed_forward.w1.lora_B.weight",
    }
    with pytest.raises(ValueError):
        write_lora(tmp_path / "x.safetensors", mods, "nope")


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_random_lora_scale(alpha):
    mods = random_lora_modules({"m": (512, 256), "n": (128, 1024)}, rank=8, seed=3, alpha=alpha, scale=0.05)
    for name, (o, i) in {"m": (512, 256), "n": (128, 1024)}.items():
        a, b, al = mods[name]
        assert a.shape == (8, i) and b.shape == (o, 8) and al == alpha
        gamma = 1.0 if alpha is None else alpha / 8
        norm = float((b.float() @ a.float()).norm()) * gamma
        assert norm == pytest.approx(0.05 * o**0.5, rel=0.02)
    again = random_lora_modules({"m": (512, 256), "n": (128, 1024)}, rank=8, seed=3, alpha=alpha)
    assert torch.equal(again["n"][1], mods["n"][1])

"""export-diffusers: the folder loads into stock diffusers through diffusers' own Nunchaku Lite quantizer with
nothing missing, unexpected or mismatched (and passes its strict key check); every exported tensor, after the
inverse transform, is the plain `qwenlora-merge` output's bit for bit; CPU reference forwards of the exported
tensors (diffusers semantics) and of the merged Nunchaku file agree layer by layer; shards, atomicity, refusals.

The inverse transforms and the expected values here are written independently of converter/export (plain
concatenation, deepcompressor's AWQ packer), on top of the codecs' unpacking only (itself tested bit-exact
against deepcompressor in test_codecs.py)."""

from __future__ import annotations

import inspect
import json
import os
import re
import struct

import pytest
import torch

from diffusers_harness import install_kernels_standin, load_as_readme_shows, quantized_skeleton

diffusers = pytest.importorskip("diffusers")
install_kernels_standin()  # its quantizer module fetches kernels at import: a stand-in get_kernel, offline
pytest.importorskip("accelerate")  # diffusers' quantized loading builds the model with it

from deepcompressor.backend.tinychat.utils import pack_w4  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from checks import run  # noqa: E402
from converter.codecs.awq_w4a16 import AwqQWeight  # noqa: E402
from converter.codecs.svdq_scales import PackedVector, WScalesInt4  # noqa: E402
from converter.codecs.svdq_weight import SvdqQWeightInt4  # noqa: E402
from reference import awq_forward, dense_forward, layer_tensors, svdq_forward, svdq_lowrank  # noqa: E402
from reference import svdq_main_weight  # noqa: E402
from converter.st_reader import Checkpoint  # noqa: E402
from lora_builders import random_lora_modules, write_lora  # noqa: E402

SHIFT = 0.171875  # Nunchaku's int4 GELU shift before Qwen's *_mlp.net.2
CLASSES = {"qwen": "QwenImageTransformer2DModel", "zimage": "ZImageTransformer2DModel"}
# checkpoint layer suffix -> the diffusers modules its rows are (in order), per family
FUSED = {"qwen": {".attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                  ".attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
         "zimage": {".attention.to_qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
                    ".feed_forward.net.0.proj": ("feed_forward.w3", "feed_forward.w1"),
                    ".feed_forward.net.2": ("feed_forward.w2",)}}
LATER_BLOCKS = re.compile(r"^(transformer_blocks|layers|noise_refiner|context_refiner)\.[1-9]")  # skipped
# id: (checkpoint fixture, LoRA on which targets (None: no LoRA), extra options)
CASES = {"qwen-int4+lora": ("qwen_int4", "all", ["--mod", "calibrated"]),
         "qwen-nvfp4+lora": ("qwen_nvfp4", "no-mod", []),
         "zimage-int4+lora": ("zimage_int4", "all", []),
         "zimage-nvfp4": ("zimage_nvfp4", None, []),
         "zimage-skip-refiners+lora": ("zimage_int4_skip_refiners", "all", [])}


def _lora(tmp, truth, which: str):
    targets = {k: v for k, v in truth["lora_targets"].items() if which == "all" or "_mod." not in k}
    extra = {}
    if truth["family"] == "qwen":  # bias deltas: a fused (to_q) one and one on a GELU-shifted layer
        extra = {"transformer_blocks.0.attn.to_q.diff_b": torch.randn(truth["dim"]).to(torch.bfloat16) * 0.01,
                 "transformer_blocks.0.img_mlp.net.2.diff_b": torch.randn(truth["dim"]).to(torch.bfloat16) * 0.01}
    path = tmp / "lora.safetensors"
    write_lora(path, random_lora_modules(targets, rank=16, seed=11), "diffusers", extra=extra)
    return f"{path}:0.7"


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(export folder, the Nunchaku-format file of the same merge (the base without LoRA), truth)."""
    fixture, which, extra = CASES[request.param]
    base, truth = request.getfixturevalue(fixture)
    tmp = tmp_path_factory.mktemp(request.param)
    loras = [_lora(tmp, truth, which)] if which else []
    folder = tmp / "diffusers"
    run("export-diffusers", base, *loras, "-o", folder, "-q", *extra)
    merged = base
    if loras:
        merged = tmp / "merged.safetensors"
        run(base, *loras, "-o", merged, "-q", *extra)
    return folder, merged, truth


def read_folder(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


# -- (1) stock diffusers loads it, strictly ------------------------------------------------------------------------

def test_harness_leaves_an_installed_kernels_package_alone():
    """The stand-in may never shadow a real `kernels` that other libraries import (transformers >= 5 imports names
    from it): with the real package installed, it stays in sys.modules and transformers' integration imports."""
    import importlib.machinery
    import sys

    if importlib.machinery.PathFinder.find_spec("kernels") is None:  # on sys.path, whatever sys.modules holds
        pytest.skip("no real kernels package installed")
    kernels = sys.modules.get("kernels") or __import__("kernels")
    assert not getattr(kernels, "__standin__", False)
    assert kernels.get_kernel.__module__ != "diffusers_harness"
    pytest.importorskip("transformers")
    import transformers.integrations.hub_kernels  # noqa: F401 - failed with ImportError under the old stand-in

def test_stock_diffusers_loads_the_export_strictly(exported):
    folder, _, truth = exported
    transformer, info = load_as_readme_shows(folder, CLASSES[truth["family"]])  # the README's snippet, as written
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    loaded = transformer.state_dict()
    assert not [k for k, v in loaded.items() if v.is_meta], "parameters left on the meta device"
    sd = read_folder(folder)
    from diffusers.quantizers.nunchaku.utils import check_strict_state_dict_match

    check_strict_state_dict_match(quantized_skeleton(folder), sd)  # diffusers' own exact-key check
    assert set(loaded) == set(sd)
    bad = [k for k in sd if not same_bytes(loaded[k], sd[k])]
    assert not bad, f"loaded differently from the file (dtype or values): {bad[:5]}"


# -- (2) bit-exact after the inverse transform -----------------------------------------------------------------------
def _refuse(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of a row split: per-output packed tensors stacked back (wscales as flat stretches: the 128-channel
    tile is outermost in memory), per-input ones checked identical in every part."""
    out = {}
    for k in parts[0]:
        ts = [p[k] for p in parts]
        if k in ("smooth_factor", "proj_down", "wtscale"):
            assert all(same_bytes(t, ts[0]) for t in ts), f"{k} differs between the parts"
            out[k] = ts[0]
        elif k == "wscales":
            flat = torch.cat([_bytes(t).reshape(-1) for t in ts]).view(ts[0].dtype)
            out[k] = flat.reshape(ts[0].shape[0], -1)
        else:
            out[k] = torch.cat([_bytes(t) for t in ts]).view(ts[0].dtype)
    return out


def _interleave_mod(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' chunk order k*D+d and bias without the +1 -> Nunchaku's rows d*6+k with the +1 folded in."""
    def to_ck(x):
        return x.reshape(6, x.shape[0] // 6, *x.shape[1:]).transpose(0, 1).reshape(x.shape)

    codes = AwqQWeight.unpack(t["qweight"])
    d = codes.shape[0] // 6
    b = t["bias"].float()
    b[d:2 * d] += 1
    b[4 * d:5 * d] += 1
    return {"qweight": pack_w4(to_ck(codes).to(torch.int32)).view(torch.int32),
            "wscales": to_ck(t["wscales"].t()).t().contiguous(), "wzeros": to_ck(t["wzeros"].t()).t().contiguous(),
            "bias": to_ck(b.to(t["bias"].dtype))}


def nunchaku_view(sd: dict[str, torch.Tensor], family: str, merged: Checkpoint) -> dict[str, dict]:
    """{merged layer prefix: {part: tensor}} rebuilt from the export; every export key must be used once."""
    by_prefix: dict[str, dict] = {}
    for k, v in sd.items():
        p, _, part = k.rpartition(".")
        by_prefix.setdefault(p, {})[part] = v
    used, out = set(), {}
    for prefix in {k.rpartition(".")[0] for k in merged.keys()}:
        names = [prefix]
        for suffix, modules in FUSED[family].items():
            if prefix.endswith(suffix):
                names = [prefix[: -len(suffix)] + "." + m for m in modules]
        if names[0] not in by_prefix:  # e.g. Z-Image's bf16 refiner to_q, kept as it is
            names = [prefix]
        parts = [by_prefix[n] for n in names]
        used |= set(names)
        out[prefix] = _refuse(parts) if len(parts) > 1 else dict(parts[0])
        if prefix.endswith(("img_mod.1", "txt_mod.1")):
            out[prefix] = _interleave_mod(out[prefix])
    assert used == set(by_prefix), f"export modules no merged layer accounts for: {sorted(set(by_prefix) - used)[:4]}"
    return out


def expected_shifted_bias(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """b + SHIFT·Σ_j q[o,j]·wscales[o,j//64] / smooth[j] (fp64, logical order), packed, rounded once."""
    scales = WScalesInt4.unpack(t["wscales"]).double().repeat_interleave(64, 1)
    w = SvdqQWeightInt4.unpack(t["qweight"]).double() * scales
    rowsum = (w / PackedVector.unpack(t["smooth_factor"]).double()).sum(1)
    return PackedVector.pack((PackedVector.unpack(t["bias"]).double() + SHIFT * rowsum).to(t["bias"].dtype))


def _shifted(family: str, prefix: str, t: dict) -> bool:
    return (family == "qwen" and prefix.endswith(("img_mlp.net.2", "txt_mlp.net.2"))
            and t["wscales"].dtype != torch.float8_e4m3fn)


def test_export_is_the_merge_bit_for_bit(exported):
    folder, merged_path, truth = exported
    fam = truth["family"]
    sd = read_folder(folder)
    assert not [k for k in sd if k.endswith("smooth_factor_orig")]
    with Checkpoint(merged_path) as merged:
        view = nunchaku_view(sd, fam, merged)
        for name in merged.keys():
            prefix, _, part = name.rpartition(".")
            if part == "smooth_factor_orig":
                continue
            got, want = view[prefix].pop(part), merged.get(name)
            if part == "wtscale":  # diffusers holds it as (1,) in the compute dtype
                assert got.shape == (1,) and got.dtype == torch.bfloat16 and got.float().item() == want.float().item()
            elif part == "bias" and _shifted(fam, prefix, layer_tensors(merged, prefix)):
                assert same_bytes(got, expected_shifted_bias(layer_tensors(merged, prefix))), name
            else:
                assert same_bytes(got, want), f"{name}: export differs from the merge"
        extra = {p: sorted(v) for p, v in view.items() if v}
        assert not extra, f"export tensors the merge does not have: {extra}"


# -- (3) reference forwards ----------------------------------------------------------------------------------------
def _nunchaku_svdq(t: dict, x: torch.Tensor, shift: float) -> torch.Tensor:
    """Nunchaku's W4A4 layer: the 4-bit path reads (x + shift) / smooth (int4 GELU shift), the low-rank branch x."""
    s = PackedVector.unpack(t["smooth_factor"]).float()
    y = ((x + shift) / s) @ svdq_main_weight(t).T
    if "bias" in t:
        y = y + PackedVector.unpack(t["bias"]).float()
    d, u = svdq_lowrank(t)
    return y + (x @ d.T) @ u.T


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    err = float((got - want).abs().max())
    assert err <= atol + 1e-5 * float(want.abs().max()), f"{what}: max error {err:.3g}"


def _check_layer(fam, prefix, merged, sd, x):
    t = layer_tensors(merged, prefix)
    names = [prefix]
    for suffix, modules in FUSED[fam].items():
        if prefix.endswith(suffix):
            names = [prefix[: -len(suffix)] + "." + m for m in modules]
    parts = [{k.rpartition(".")[2]: v for k, v in sd.items() if k.rpartition(".")[0] == n} for n in names]
    if not parts[0]:
        return
    if "qweight" in t and t["qweight"].dtype == torch.int8:
        shift = SHIFT if _shifted(fam, prefix, t) else 0.0
        want = _nunchaku_svdq(t, x, shift)
        got = torch.cat([svdq_forward(p, x) for p in parts], 1)  # diffusers' module: no shift
        atol = 2.0 ** -8 * float(PackedVector.unpack(parts[0]["bias"]).float().abs().max()) if shift else 0.0
        _close(got, want, atol, prefix)
    elif "qweight" in t:  # AWQ modulation: Nunchaku runs x * scale + shift with the +1 in scale's bias
        want = awq_forward(t, x, splits=6)
        d = want.shape[1] // 6
        want[:, d:2 * d] -= 1
        want[:, 4 * d:5 * d] -= 1
        _close(awq_forward(parts[0], x), want, 2.0 ** -7, prefix)  # diffusers: x * (1 + scale) + shift
    elif "weight" in t and t["weight"].ndim == 2:
        _close(torch.cat([dense_forward(p, x) for p in parts], 1), dense_forward(t, x), 0.0, prefix)


def test_reference_forwards_agree(exported):
    """Every layer of the first block of each kind (blocks repeat: the others only cost time), and the rest."""
    folder, merged_path, truth = exported
    fam = truth["family"]
    sd = read_folder(folder)
    g = torch.Generator().manual_seed(5)
    with Checkpoint(merged_path) as merged:
        prefixes = sorted({k.rpartition(".")[0] for k in merged.keys() if not LATER_BLOCKS.match(k)})
        for prefix in prefixes:
            t = layer_tensors(merged, prefix)
            i = t["qweight"].shape[1] * 2 if "qweight" in t else t["weight"].shape[-1] if "weight" in t else 0
            if i:
                _check_layer(fam, prefix, merged, sd, torch.randn(8, i, generator=g))
        if fam == "zimage":
            _check_swiglu(merged, sd, truth, g)


def _check_swiglu(merged, sd, truth, g):
    """Z-Image's feed-forward as each side runs it: Nunchaku `net.2(a * silu(b))` with [a; b] = net.0.proj(x),
    diffusers `w2(silu(w1 x) * w3 x)`: the same map iff net.0.proj = [w3; w1]."""
    block = "layers.0.feed_forward"
    part = lambda n: {k.rpartition(".")[2]: v for k, v in sd.items() if k.rpartition(".")[0] == f"{block}.{n}"}
    x = torch.randn(4, truth["dim"], generator=g)
    a, b = svdq_forward(layer_tensors(merged, f"{block}.net.0.proj"), x).chunk(2, dim=1)
    want = svdq_forward(layer_tensors(merged, f"{block}.net.2"), a * torch.nn.functional.silu(b))
    h = torch.nn.functional.silu(svdq_forward(part("w1"), x)) * svdq_forward(part("w3"), x)
    _close(svdq_forward(part("w2"), h), want, 0.0, "SwiGLU")


# -- (4) the folder: config, shards, atomicity, refusals -----------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen-image", "z-image"])
def test_config_keys_are_the_stock_class_arguments(family):
    from mappings import by_name

    fam = by_name(family)
    init = inspect.signature(getattr(diffusers, fam.diffusers_class).__init__).parameters
    assert fam.diffusers_config_keys == set(init) - {"self"}


def _with_config(src, dst, drop=(), **extra) -> None:
    """A copy of checkpoint `src` without the tensors `drop`, its diffusers config carrying `extra` keys."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    meta["config"] = json.dumps(json.loads(meta["config"]) | extra)
    save_file(sd, str(dst), metadata=meta)


def test_shard_sizes_parse():
    from converter.export import ExportError, parse_size

    assert parse_size("500MB") == 500 * 10**6 and parse_size("10GB") == 10**10 and parse_size("2GiB") == 2 << 30
    assert parse_size("1.5gb") == 1.5e9 and parse_size("4096") == 4096
    for bad in ("", "5 parsecs", "-1GB", "0"):
        with pytest.raises(ExportError):
            parse_size(bad)


def test_nvfp4_without_channel_scales_gets_ones(zimage_nvfp4, tmp_path):
    """Nunchaku treats an absent wcscales / wtscale as ones; diffusers' nvfp4 module has both parameters."""
    layer = "layers.0.attention.to_qkv"
    base = tmp_path / "base.safetensors"
    _with_config(zimage_nvfp4.path, base, drop=(f"{layer}.wcscales", f"{layer}.wtscale"))
    run("export-diffusers", base, "-o", tmp_path / "out", "-q")
    sd = read_folder(tmp_path / "out")
    for m in ("to_q", "to_k", "to_v"):
        wc, wt = sd[f"layers.0.attention.{m}.wcscales"], sd[f"layers.0.attention.{m}.wtscale"]
        assert wc.dtype == wt.dtype == torch.bfloat16 and wt.shape == (1,) and bool((wc == 1).all() and wt == 1)
    _, info = load_as_readme_shows(tmp_path / "out", "ZImageTransformer2DModel")
    assert not any(info.values()), info


def _shard_offsets_aligned(path) -> bool:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    sizes = {"I8": 1, "F8_E4M3": 1, "BF16": 2, "F16": 2, "I32": 4, "F32": 4}
    return (8 + n) % 8 == 0 and all(v["data_offsets"][0] % sizes[v["dtype"]] == 0
                                    for k, v in header.items() if k != "__metadata__")


def test_sharded_export_loads_and_drops_foreign_config_keys(qwen_nvfp4, tmp_path):
    base = tmp_path / "base.safetensors"
    _with_config(qwen_nvfp4.path, base, pooled_projection_dim=768)
    folder = tmp_path / "sharded"
    rep = json.loads(run("export-diffusers", base, "-o", folder, "--max-shard-size", "300KB", "--json").stdout)
    assert any("pooled_projection_dim" in w for w in rep["warnings"])
    cfg = json.loads((folder / "config.json").read_text())
    init = set(inspect.signature(diffusers.QwenImageTransformer2DModel.__init__).parameters)
    assert {k for k in cfg if not k.startswith("_")} - {"quantization_config"} <= init
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) == shards
    assert all(os.path.getsize(folder / s) <= 300_000 + 64_000 for s in shards)  # + header; no tensor is larger
    sd = read_folder(folder)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert all(_shard_offsets_aligned(folder / s) for s in shards)
    _, info = load_as_readme_shows(folder, "QwenImageTransformer2DModel")
    assert not any(info.values()), info
    with Checkpoint(qwen_nvfp4.path) as b:
        view = nunchaku_view(sd, "qwen", b)
        assert all(same_bytes(view[k.rpartition(".")[0]][k.rpartition(".")[2]], b.get(k))
                   for k in b.keys() if not k.endswith(("smooth_factor_orig", "wtscale")))


def _refused(res, folder) -> None:
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    parent = os.path.dirname(folder)
    assert not [f for f in os.listdir(parent) if f.startswith(f".{os.path.basename(folder)}.")], "temp left behind"


def test_refusals_leave_nothing(qwen_int4, qwen_int4_fused_smooth, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    res = run("export-diffusers", qwen_int4_fused_smooth.path, "-o", out, ok=False)
    _refused(res, out)
    assert "smoothing fused upstream" in res.stderr and not os.path.exists(out)
    res = run("export-diffusers", qwen_int4.path, "-o", os.path.dirname(qwen_int4.path), "--overwrite", ok=False)
    _refused(res, os.path.dirname(qwen_int4.path))
    assert "contains the input" in res.stderr
    from mappings.qwen_image import QwenImage

    monkeypatch.setattr(QwenImage, "diffusers_class", None)  # a family diffusers lacks
    res = run("export-diffusers", qwen_int4.path, "-o", out, ok=False)
    _refused(res, out)
    assert "no stock diffusers model" in res.stderr and not os.path.exists(out)


def test_existing_folder_overwrite_and_interrupt_are_atomic(zimage_nvfp4, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _refused(run("export-diffusers", zimage_nvfp4.path, "-o", out, ok=False), str(out))
    assert os.listdir(out) == ["old.txt"]
    from converter.export import transform

    calls = []

    def interrupted(self, prefix, merged):
        calls.append(prefix)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, prefix, merged)

    real = transform.LayerTransformer.outputs_of
    monkeypatch.setattr(transform.LayerTransformer, "outputs_of", interrupted)
    res = run("export-diffusers", zimage_nvfp4.path, "-o", out, "--overwrite", ok=False)
    assert res.exit_code == 130 and os.listdir(out) == ["old.txt"]  # the old folder untouched
    assert sorted(os.listdir(tmp_path)) == ["out"], "temp left behind"
    monkeypatch.setattr(transform.LayerTransformer, "outputs_of", real)
    (tmp_path / ".out.999999999.x.partial").mkdir()  # left by a killed export (no such process): removed
    (tmp_path / f".out.{os.getppid()}.y.partial").mkdir()  # a running process's: kept
    run("export-diffusers", zimage_nvfp4.path, "-o", out, "--overwrite", "-q")
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == [f".out.{os.getppid()}.y.partial", "out"]
    os.rmdir(tmp_path / f".out.{os.getppid()}.y.partial")
    run("export-diffusers", zimage_nvfp4.path, "-o", tmp_path / "dry", "--dry-run")
    assert sorted(os.listdir(tmp_path)) == ["out"]

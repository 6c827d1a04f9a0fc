"""A small built-in demo: writes a tiny Nunchaku Qwen-Image checkpoint (2 blocks, hidden 256, int4, rank 32)
and a kohya-style LoRA, using only this package's own codecs (no downloads, no deepcompressor).

    python -m converter.demo DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .codecs.awq_w4a16 import AwqGroupParams, AwqQWeight
from .codecs.lowrank import LowRankDown, LowRankUp
from .codecs.svdq_scales import PackedVector, WScalesInt4
from .codecs.svdq_weight import SvdqQWeightInt4
from .dtypes import dtype_name
from .st_writer import OutSpec, StreamingWriter

BF16 = torch.bfloat16


def _svdq(g: torch.Generator, prefix: str, o: int, i: int, rank: int, sd: dict) -> None:
    w = torch.randn(o, i, generator=g) / i ** 0.5
    s = torch.exp(torch.randn(i, generator=g) * 0.3).to(BF16)
    ws = (w * s.float()).reshape(o, i // 64, 64)
    scale = (ws.abs().amax(-1) / 7).clamp_min(1e-6).to(BF16)
    q = torch.round(ws / scale.float()[..., None]).clamp(-8, 7).to(torch.int32).reshape(o, i)
    sd[f"{prefix}.qweight"] = SvdqQWeightInt4.pack(q)
    sd[f"{prefix}.wscales"] = WScalesInt4.pack(scale)
    sd[f"{prefix}.smooth_factor"] = PackedVector.pack(s)
    sd[f"{prefix}.smooth_factor_orig"] = PackedVector.pack(s)
    sd[f"{prefix}.proj_down"] = LowRankDown.pack((torch.randn(rank, i, generator=g) * 0.02).to(BF16))
    sd[f"{prefix}.proj_up"] = LowRankUp.pack((torch.randn(o, rank, generator=g) * 0.02).to(BF16))
    sd[f"{prefix}.bias"] = PackedVector.pack((torch.randn(o, generator=g) * 0.02).to(BF16))


def _awq_mod(g: torch.Generator, prefix: str, d: int, sd: dict) -> None:
    o, i = 6 * d, d
    w = (torch.randn(o, i, generator=g) / i ** 0.5).reshape(6, d, i).transpose(0, 1).reshape(o, i)  # interleave
    b = (torch.randn(6, d, generator=g) * 0.02)
    b[1] += 1
    b[4] += 1  # Nunchaku folds the +1 of the two scale terms into the bias
    b = b.T.reshape(o)
    wg = w.reshape(o, i // 64, 64)
    scale = (wg.abs().amax(-1) / 7).clamp_min(1e-6).to(BF16)
    q = (torch.round(wg / scale.float()[..., None]) + 7).clamp(0, 15).reshape(o, i)
    sd[f"{prefix}.qweight"] = AwqQWeight.pack(q)
    sd[f"{prefix}.wscales"] = AwqGroupParams.pack(scale)
    sd[f"{prefix}.wzeros"] = AwqGroupParams.pack((-7 * scale.float()).to(BF16))
    sd[f"{prefix}.bias"] = b.to(BF16)


def _dense(g, prefix, o, i, sd, bias=True):
    sd[f"{prefix}.weight"] = (torch.randn(o, i, generator=g) / i ** 0.5).to(BF16)
    if bias:
        sd[f"{prefix}.bias"] = (torch.randn(o, generator=g) * 0.02).to(BF16)


def build_base(path: str, blocks: int = 2, d: int = 256, text: int = 256, rank: int = 32, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _dense(g, "img_in", d, 64, sd)
    _dense(g, "txt_in", d, text, sd)
    sd["txt_norm.weight"] = torch.ones(text, dtype=BF16)
    _dense(g, "time_text_embed.timestep_embedder.linear_1", d, 256, sd)
    _dense(g, "time_text_embed.timestep_embedder.linear_2", d, d, sd)
    for b in range(blocks):
        p = f"transformer_blocks.{b}"
        for name, (o, i) in {"attn.to_qkv": (3 * d, d), "attn.add_qkv_proj": (3 * d, d), "attn.to_out.0": (d, d),
                             "attn.to_add_out": (d, d), "img_mlp.net.0.proj": (4 * d, d),
                             "txt_mlp.net.0.proj": (4 * d, d), "img_mlp.net.2": (d, 4 * d),
                             "txt_mlp.net.2": (d, 4 * d)}.items():
            _svdq(g, f"{p}.{name}", o, i, rank, sd)
        for m in ("img_mod.1", "txt_mod.1"):
            _awq_mod(g, f"{p}.{m}", d, sd)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            sd[f"{p}.attn.{n}.weight"] = torch.ones(128, dtype=BF16)
    _dense(g, "norm_out.linear", 2 * d, d, sd)
    _dense(g, "proj_out", 64, d, sd)
    config = {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 64, "out_channels": 16,
              "num_layers": blocks, "attention_head_dim": 128, "num_attention_heads": d // 128,
              "joint_attention_dim": text, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
    qc = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
          "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}, "rank": rank}
    meta = {"config": json.dumps(config), "comfy_config": json.dumps({"model_class": "QwenImage"}),
            "model_class": "NunchakuQwenImageTransformer2DModel", "quantization_config": json.dumps(qc)}
    _write(path, sd, meta)


def build_lora(path: str, blocks: int = 2, d: int = 256, rank: int = 16, seed: int = 1) -> None:
    """kohya/musubi-style keys with alpha, on attention, MLP, modulation and a 16-bit layer."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    mods = {"img_in": (d, 64)}
    for b in range(blocks):
        p = f"transformer_blocks_{b}"
        mods |= {f"{p}_attn_to_q": (d, d), f"{p}_attn_to_k": (d, d), f"{p}_attn_to_v": (d, d),
                 f"{p}_attn_to_out_0": (d, d), f"{p}_img_mlp_net_0_proj": (4 * d, d), f"{p}_img_mlp_net_2": (d, 4 * d),
                 f"{p}_img_mod_1": (6 * d, d), f"{p}_txt_mod_1": (6 * d, d)}
    for name, (o, i) in mods.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = (torch.randn(rank, i, generator=g) * 0.2 / i ** 0.5).to(BF16)
        sd[f"lora_unet_{name}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.2 / rank ** 0.5).to(BF16)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank) / 2)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(rank, 32, dtype=BF16)
    _write(path, sd, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


def _write(path: str, sd: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    w = StreamingWriter(path, [OutSpec(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in sd.items()], meta)
    for k, t in sd.items():
        w.write_tensor(k, t)
    w.commit()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0] if argv else "demo"
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, "svdq-int4_r32-qwen-image-demo.safetensors")
    lora = os.path.join(folder, "demo-style-lora.safetensors")
    build_base(base)
    build_lora(lora)
    print(f"wrote {base}\nwrote {lora}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Z-Image-Turbo (NextDiT): `NunchakuZImageTransformer2DModel`.

Quantized per block (`layers.N`, and the refiners unless `skip_refiners`): `attention.to_qkv` = [q; k; v],
`attention.to_out.0`, `feed_forward.net.0.proj` = [w3; w1] (w3, the "up" projection, FIRST: diffusers SwiGLU
computes `hidden, gate = proj(x).chunk(2)`), `feed_forward.net.2` = w2. No layer has a bias. With
`skip_refiners` the refiner blocks hold bf16 `to_q/to_k/to_v` and a bf16 `net.0.proj` = [w3; w1].
The file keeps these diffusers names; ComfyUI-nunchaku renames at load time, so we never rename.
"""

from __future__ import annotations

import re

from converter.layout import Family, Layer, Segment, fused_modules, fused_over, whole
from converter.layout import DiffusersPart

_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.")
# a block's fused layers and the modules their rows are, in order: (component, module name in the block), the names
# LoRAs and diffusers' ZImageTransformerBlock both use (it keeps w1/w2/w3 and to_q/to_k/to_v apart, all without a
# bias); feed_forward.net.0.proj = [w3; w1]
FUSED = {".attention.to_qkv": (("q", "attention.to_q"), ("k", "attention.to_k"), ("v", "attention.to_v")),
         ".feed_forward.net.0.proj": (("w3", "feed_forward.w3"), ("w1", "feed_forward.w1")),
         ".feed_forward.net.2": (("", "feed_forward.w2"),)}
DIFFUSERS_NO_BIAS = (".attention.to_q", ".attention.to_k", ".attention.to_v", ".attention.to_out.0")

# names that ComfyUI / the original Z-Image code use for the same layers
ALIASES = {
    "x_embedder": "all_x_embedder.2-1",
    "final_layer.linear": "all_final_layer.2-1.linear",
    "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
}


class ZImage(Family):
    name = "z-image"
    title = "Z-Image-Turbo"
    model_class = "NunchakuZImageTransformer2DModel"
    signatures = (r"^(layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward|adaLN)",
                  r"^(x_embedder|final_layer|cap_embedder|t_embedder)")
    # no AWQ modulation layers: adaLN_modulation stays bf16, so no timestep_keys and no row_order
    # Anime-Z files hold `attention.qkv` beside `attention.to.q/k/v` and `attention.out` beside `to_out.0`, the
    # same update twice; diffusers' Z-Image converter skips the fused copies
    redundant_copies = {".attention.qkv": (".attention.to_q", ".attention.to_k", ".attention.to_v"),
                        ".attention.out": (".attention.to_out.0",)}

    def matches(self, metadata, tensors) -> bool:
        return (metadata.get("model_class") == self.model_class or "layers.0.attention.to_qkv.qweight" in tensors
                or "layers.0.attention.to_out.0.qweight" in tensors)

    def smoothing_producers(self, prefix: str, layers) -> list[Segment] | None:
        """The attention output's input is the attention of the V rows of `to_qkv`, where deepcompressor folds its
        smoothing. (q/k/v and the gate/up projection could fold theirs into the preceding RMSNorm weights;
        that is not mapped: such layers are refused.)"""
        if not prefix.endswith(".attention.to_out.0"):
            return None
        layer = layers.get(prefix[: -len("to_out.0")] + "to_qkv")
        if layer is None:
            return None
        return fused_modules(layer, FUSED)[prefix[: -len("to_out.0")] + "to_v"]

    # diffusers' ZImageTransformer2DModel (transformer_z_image.py): its __init__ arguments
    diffusers_class = "ZImageTransformer2DModel"
    diffusers_config_keys = frozenset({
        "all_patch_size", "all_f_patch_size", "in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads",
        "n_kv_heads", "norm_eps", "qk_norm", "cap_feat_dim", "siglip_feat_dim", "rope_theta", "t_scale", "axes_dims",
        "axes_lens"})

    def diffusers_parts(self, layer: Layer) -> list[DiffusersPart] | None:
        """Block layers (quantized, or bf16 refiners with skip_refiners): to_qkv -> to_q/to_k/to_v, net.0.proj =
        [w3; w1] -> w3, w1, net.2 -> w2. diffusers' block linears have no bias: a layer with one has no place."""
        p = layer.prefix
        if not _BLOCK.match(p):
            return [DiffusersPart(p, 0, layer.out_features)]
        fused = fused_modules(layer, FUSED)
        if fused is not None:
            return None if layer.has_bias else [DiffusersPart.of(name, segments) for name, segments in fused.items()]
        if p.endswith(DIFFUSERS_NO_BIAS) and layer.has_bias:
            return None
        return [DiffusersPart(p, 0, layer.out_features)]

    def lora_targets(self, layers: dict[str, Layer]) -> dict[str, list[Segment]]:
        targets = {p: whole(l) for p, l in layers.items()}
        for p, l in layers.items():
            if not _BLOCK.match(p):
                continue
            if p.endswith(".attention.to_qkv"):
                targets.update(fused_modules(l, FUSED))
                targets[p[: -len("to_qkv")] + "qkv"] = whole(l)
            elif p.endswith(".attention.to_q") and p[:-1] + "k" in layers and p[:-1] + "v" in layers:
                base = p[: -len("to_q")]  # skip_refiners: separate bf16 q/k/v; a fused LoRA spreads over them
                targets[f"{base}qkv"] = fused_over([layers[base + "to_q"], layers[base + "to_k"], layers[base + "to_v"]],
                                                   ("q", "k", "v"))
            elif p.endswith(".attention.to_out.0"):
                targets[p[: -len("to_out.0")] + "out"] = whole(l)
            elif p.endswith((".feed_forward.net.0.proj", ".feed_forward.net.2")):
                targets.update(fused_modules(l, FUSED))
            elif p.endswith((".attention.norm_q", ".attention.norm_k")):
                targets[p[:-len("norm_q")] + ("q_norm" if p.endswith("q") else "k_norm")] = whole(l)
        for alias, real in ALIASES.items():
            if real in layers:
                targets[alias] = whole(layers[real])
        return targets


FAMILY = ZImage()

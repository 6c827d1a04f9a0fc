"""The export's computed tensors, one checkpoint layer at a time: the layer's tensors after the merge (the merge's
new ones, the base's for the rest) cut, permuted and re-based as tree.py declared them. Every operation is a
codec-level one (tested bit-exact in tests/test_codecs.py) or plain row slicing, except the int4 shift
compensation, a bias change computed in fp64 and rounded once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .. import dtypes
from ..codecs.awq_w4a16 import permute_group_params, permute_qweight_rows
from ..codecs.lowrank import up_rows
from ..codecs.svdq_scales import PackedVector, WScalesInt4, vector_rows, wscales_rows
from ..codecs.svdq_weight import group_dots, qweight_rows
from ..layers import MergeContext, merge_layer
from ..layout import AWQ_GROUP, Layout
from .tree import ExportError, ExportTree, OutTensor

if TYPE_CHECKING:
    from ..layout import Layer
    from ..planner import Plan


class _Sources:
    """A layer's tensors after the merge, each read from the base at most once, plus values derived from them
    once per layer (the shifted bias, the row permutation)."""

    def __init__(self, base, layer: Layer, merged: dict[str, torch.Tensor], family):
        self.base, self.layer, self.merged, self.family = base, layer, merged, family
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name in self.merged:
            return self.merged[name]
        if name not in self._cache:
            self._cache[name] = self.base.get(name)
        return self._cache[name]

    def derived(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def perm(self) -> torch.Tensor | None:
        """perm[i] = the stored row that is diffusers' row i (None: the rows are stored in diffusers' order)."""
        order = self.family.row_order(self.layer.prefix)
        if order is None:
            return None
        return self.derived("#perm", lambda: order.to_lora(torch.arange(self.layer.out_features)))


def shifted_bias(src: _Sources, shift: float) -> torch.Tensor:
    """The packed bias of an SVDQ layer whose Nunchaku runtime feeds the 4-bit path (x + shift) / smooth while
    diffusers' module feeds it x / smooth: b + shift·Σ_j Ŵ[o, j] / smooth[j] (Ŵ the dequantized 4-bit weight,
    logical order), so both compute the same output. The low-rank branch reads the unshifted input in both
    (nunchaku's epilogue order), so it needs nothing. int4 only (nvfp4 has no shift); in fp64, one rounding:
    Σ_g wscales[o, g]·Σ_{j in g} q[o, j]/smooth[j], the inner sums taken in packed space (group_dots)."""
    layer = src.layer
    if layer.layout != Layout.SVDQ_INT4:
        raise ExportError(f"{layer.prefix}: an activation shift is an int4 fact; this layer is {layer.layout.value}")
    inv_smooth = 1.0 / PackedVector.unpack(src.get(layer.key("smooth_factor"))).double()
    dots = group_dots(src.get(layer.key("qweight")), inv_smooth)
    rowsum = (dots * WScalesInt4.unpack(src.get(layer.key("wscales"))).double()).sum(1)
    b = src.get(layer.key("bias"))
    return PackedVector.pack((PackedVector.unpack(b).double() + shift * rowsum).to(b.dtype))


def _awq_bias(src: _Sources, t: torch.Tensor) -> torch.Tensor:
    perm = src.perm()
    b = (t[perm] if perm is not None else t).float()
    for start, stop, c in src.family.folded_bias(src.layer):
        b[start:stop] -= c
    return b.to(t.dtype)


def _awq_params(src: _Sources, t: torch.Tensor) -> torch.Tensor:
    t = t[: src.layer.in_features // AWQ_GROUP]
    perm = src.perm()
    return permute_group_params(t, perm) if perm is not None else t


def _awq_qweight(src: _Sources, t: torch.Tensor) -> torch.Tensor:
    perm = src.perm()
    return permute_qweight_rows(t, perm) if perm is not None else t


def _cut(fn) -> Callable[[_Sources, OutTensor, torch.Tensor], torch.Tensor]:
    return lambda src, o, t: fn(t, *o.rows)


# op name (tree.py) -> (the layer's sources, the output's declaration, its source tensor) -> the tensor
OPS: dict[str, Callable[[_Sources, OutTensor, torch.Tensor | None], torch.Tensor]] = {
    "same": lambda src, o, t: t,
    "qweight_rows": _cut(qweight_rows),
    "wscales_rows": _cut(wscales_rows),
    "vector_rows": _cut(vector_rows),
    "up_rows": _cut(up_rows),
    "dense_rows": _cut(lambda t, a, b: t[a:b].contiguous()),
    "shifted_bias": lambda src, o, t: vector_rows(
        src.derived("#shifted_bias", lambda: shifted_bias(src, src.family.activation_shift(src.layer))), *o.rows),
    "ones": lambda src, o, t: torch.ones(o.shape, dtype=dtypes.torch_dtype(o.dtype)),
    "wtscale": lambda src, o, t: t.reshape(1),
    "awq_qweight": lambda src, o, t: _awq_qweight(src, t),
    "awq_params": lambda src, o, t: _awq_params(src, t),
    "awq_bias": lambda src, o, t: _awq_bias(src, t),
}


class LayerTransformer:
    """Computes the export's tensors of one checkpoint layer at a time (the merge through the layer kinds, then
    the ops), keeping the merge's fidelity records and, per layer, the values the compute dtype had to round."""

    def __init__(self, ctx: MergeContext, plan: Plan, tree: ExportTree):
        self.ctx, self.plan = ctx, plan
        self.touched_layers = {k.rpartition(".")[0] for k in plan.touched_keys()}
        self.outputs: dict[str, list[OutTensor]] = {}
        for out in tree.tensors:
            if not out.copy and out.byte_range is None:  # a byte range is copied from the base by the writer
                self.outputs.setdefault(out.layer, []).append(out)
        self.records: list[dict] = []
        self.rounded: dict[str, list[str]] = {}  # layer -> its tensors rounded to the compute dtype

    def merge(self, prefix: str) -> dict[str, torch.Tensor]:
        """The layer's tensors the merge rewrites (none if the LoRAs leave it alone), recording how. Layers
        computed on several threads take turns here, in layer order: the records keep the merge's order and the
        kinds' shared cache is used by one layer at a time."""
        if prefix not in self.touched_layers:
            return {}
        return merge_layer(self.ctx, self.plan, prefix, self.records)

    def outputs_of(self, prefix: str, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layer's export tensors, from its merged tensors and the base's (safe to run on several threads)."""
        src = _Sources(self.ctx.base, self.plan.model.layers[prefix], merged, self.plan.model.family)
        rounded = self.rounded.setdefault(prefix, [])
        return {out.name: _finish(out, OPS[out.op](src, out, src.get(out.source) if out.source else None), rounded)
                for out in self.outputs[prefix]}


def _finish(out: OutTensor, tensor: torch.Tensor, rounded: list[str]) -> torch.Tensor:
    want = dtypes.torch_dtype(out.dtype)
    if tensor.dtype != want:
        cast = tensor.to(want)
        if tensor.is_floating_point() and not torch.equal(cast.to(tensor.dtype), tensor):
            rounded.append(out.name)  # e.g. an fp32 wtscale: diffusers holds it in the compute dtype
        tensor = cast
    if tuple(tensor.shape) != out.shape:
        raise ExportError(f"{out.name}: made {tuple(tensor.shape)}, declared {out.shape} (a bug or an inconsistent "
                          "file)")
    return tensor.contiguous()

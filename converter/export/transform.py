"""The export's computed tensors, one checkpoint layer at a time: the layer's tensors after the merge (the merge's
new ones, the base's for the rest) cut, permuted and re-based as tree.py declared them, each by its layer kind
(`LayerKind.export_tensor`). Every operation is a codec-level one (tested bit-exact in tests/test_codecs.py) or
plain row slicing, except the int4 shift compensation, a bias change computed in fp64 and rounded once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .. import dtypes
from ..errors import ExportError
from ..layers import MergeContext, kind_of, merge_layer
from ..engine import OutTensor
from .tree import ExportTree

if TYPE_CHECKING:
    from ..layout import Layer
    from ..planner import Plan


class LayerSources:
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
        layer = self.plan.model.layers[prefix]
        kind, sources = kind_of(layer), LayerSources(self.ctx.base, layer, merged, self.plan.model.family)
        rounded = self.rounded.setdefault(prefix, [])
        made = {}
        for out in self.outputs[prefix]:
            source = sources.get(out.source) if out.source else None
            made[out.name] = _finish(out, kind.export_tensor(sources, out, source), rounded)
        return made


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

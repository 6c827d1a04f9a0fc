"""What an export writes, decided from the headers alone (no torch): every output tensor with its diffusers
name, dtype and shape, the base tensor it comes from and the operation that makes it. The same list gives the
shards' headers before anything is read and drives the transform (transform.py) afterwards.

The rules (diffusers 0.42.1, quantizers/nunchaku/utils.py: SVDQW4A4Linear, AWQW4A16Linear):
* a Nunchaku layer becomes the diffusers modules its family names (`Family.diffusers_parts`), each a range of
  its output rows: the per-output tensors are cut in packed space (qweight, wscales, bias, wcscales, proj_up),
  the per-input ones are shared (smooth_factor, proj_down);
* `smooth_factor_orig` is dropped (diffusers' module has no such parameter);
* nvfp4: `wcscales` (O,) and `wtscale` (1,) in the compute dtype, ones where the file has none;
* AWQ layers with a stored row order (Qwen's modulation) are permuted to diffusers' row order, and a bias
  constant the family folded in is taken out;
* everything else is copied byte for byte, under its diffusers name.

Each rule is its layer kind's (`LayerKind.export_outputs` declares a layer's tensors here, `export_tensor` makes
them in transform.py): this module walks the layers and holds what every kind shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import OutTensor
from ..errors import ExportError
from ..layers import kind_of
from ..layout import DiffusersPart, Layer
from ..naming import natural

__all__ = ["ExportError", "ExportTree", "OutTensor", "TreeBuilder", "export_tree"]


@dataclass
class ExportTree:
    """The export's tensors (copies first, then the computed ones layer by layer) and its quantized targets: the
    diffusers module names of each quantization_config section (`svdq_w4a4`, `awq_w4a16`)."""

    tensors: list[OutTensor]
    targets: dict[str, list[str]]
    compute_dtype: str  # safetensors dtype of the floating parameters of the quantized modules ("BF16")

    @property
    def svdq_targets(self) -> list[str]:
        return self.targets.get("svdq_w4a4", [])

    @property
    def awq_targets(self) -> list[str]:
        return self.targets.get("awq_w4a16", [])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class TreeBuilder:
    """Walks the base's tensors layer by layer; the layer kinds append their outputs (`add`) and their quantized
    targets (`target`)."""

    def __init__(self, model, plan, base):
        self.model, self.plan, self.base = model, plan, base
        self.family = model.family
        self.touched = plan.touched_keys()
        self.compute_dtype = _compute_dtype(model)
        self.out: list[OutTensor] = []
        self._targets: dict[str, list[tuple]] = {}  # section -> (natural order of the layer, part index, module)

    def add(self, name: str, layer: Layer | None, source: str | None, op: str = "same", *, dtype: str | None = None,
            shape: tuple[int, ...] | None = None, rows: tuple[int, int] | None = None,
            byte_range: tuple[int, int] | None = None) -> None:
        """Output `name` made by `op` from base tensor `source` (default dtype: the source's; default shape: the
        source's after the merge). It is a plain copy when nothing changes it."""
        info = self.base.tensors[source] if source is not None else None
        dtype = dtype or info.dtype
        shape = tuple(shape if shape is not None else self.plan.out_shape(source, info.shape))
        copy = (op == "same" and info is not None and dtype == info.dtype and shape == info.shape
                and source not in self.touched)
        self.out.append(OutTensor(name, dtype, shape, layer.prefix if layer else None, source, op, rows, copy,
                                  byte_range))

    def target(self, section: str, layer: Layer, index: int, module: str) -> None:
        """Diffusers module `module` (part `index` of `layer`) is quantized, under quantization_config[section]."""
        self._targets.setdefault(section, []).append((natural(layer.prefix), index, module))

    def targets(self) -> dict[str, list[str]]:
        return {section: [found[-1] for found in sorted(items)] for section, items in self._targets.items()}

    def parts_of(self, layer: Layer) -> list[DiffusersPart]:
        parts = self.family.diffusers_parts(layer)
        if parts is None:
            raise ExportError(f"layer {layer.prefix} has no counterpart in diffusers' {self.family.diffusers_class} "
                              f"(e.g. a bias its module lacks); nothing was written")
        return parts

    def parts_by_name(self, layer: Layer, names: list[str], allowed: frozenset[str]) -> dict[str, str]:
        """{part: tensor name} of the layer, refusing a tensor the diffusers module has no parameter for."""
        parts = {n.rpartition(".")[2]: n for n in names}
        extra = sorted(set(parts) - allowed)
        if extra:
            raise ExportError(f"layer {layer.prefix} holds {layer.prefix}.{extra[0]}, which diffusers' quantized "
                              "module has no parameter for; nothing was written")
        return parts


def export_tree(model, plan, base) -> ExportTree:
    """Every tensor of the export, in the order written: copies first (the writer starts at once), then the
    computed tensors layer by layer in the model's natural order (a layer's results are written as soon as
    they are made). The shards are cut from this order (folder.py)."""
    builder = TreeBuilder(model, plan, base)
    groups: dict[str, list[str]] = {}
    for name in base.tensors:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    for prefix, names in groups.items():
        layer = model.layers.get(prefix)
        if layer is None:
            for name in names:
                builder.add(name, None, name)
        else:
            kind_of(layer).export_outputs(builder, layer, names)
    out_names = [t.name for t in builder.out]
    if len(set(out_names)) != len(out_names):
        twice = sorted({n for n in out_names if out_names.count(n) > 1})
        raise ExportError(f"two checkpoint tensors would both be {twice[0]} in diffusers' tree; nothing was written")
    copies = [t for t in builder.out if t.copy]
    computed = sorted((t for t in builder.out if not t.copy), key=lambda t: natural(t.layer))  # stable in a layer
    return ExportTree(copies + computed, builder.targets(), builder.compute_dtype)


def _compute_dtype(model) -> str:
    """The 16-bit dtype of the quantized layers' floating tensors (their low-rank branch): diffusers builds the
    replaced modules in one compute dtype."""
    found = {l.dtype for l in model.layers.values() if l.layout.is_svdq}
    if len(found) != 1 or next(iter(found)) not in ("BF16", "F16"):
        raise ExportError(f"the W4A4 layers' 16-bit tensors are {sorted(found) or 'absent'}; the export needs one "
                          "16-bit compute dtype (bf16 or fp16)")
    return next(iter(found))

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
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MergeError
from ..layout import AWQ_GROUP, DiffusersPart, Layer, Layout
from ..naming import natural
from ..st_writer import OutSpec

DROPPED = frozenset({"smooth_factor_orig"})  # diffusers' SVDQW4A4Linear has no such parameter
SVDQ_PARTS = frozenset({"qweight", "wscales", "bias", "smooth_factor", "proj_down", "proj_up", "wcscales", "wtscale"})
AWQ_PARTS = frozenset({"qweight", "wscales", "wzeros", "bias"})


class ExportError(MergeError):
    """A checkpoint or request the diffusers export cannot serve (exit code 2, one line, nothing written)."""


@dataclass(frozen=True)
class OutTensor(OutSpec):
    """One tensor of the export. `op` names how it is made from `source` (transform.py); `copy` means the bytes
    of `source` in the base, unchanged (no op, no dtype change, not rewritten by the merge)."""

    layer: str | None = None  # checkpoint layer whose transform computes it
    source: str | None = None  # base tensor (None: synthesized ones)
    op: str = "same"
    rows: tuple[int, int] | None = None  # the diffusers part's rows of the layer's output
    copy: bool = True
    # bytes [start, stop) of `source` in the base are this tensor (a cut of whole rows the merge leaves alone):
    # written by a file copy, never read into memory
    byte_range: tuple[int, int] | None = None


@dataclass
class ExportTree:
    """The export's tensors (copies first, then the computed ones layer by layer) and its quantized targets."""

    tensors: list[OutTensor]
    svdq_targets: list[str]
    awq_targets: list[str]
    compute_dtype: str  # safetensors dtype of the floating parameters of the quantized modules ("BF16")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class _Builder:
    """Walks the base's tensors layer by layer and appends their outputs."""

    def __init__(self, model, plan, base):
        self.model, self.plan, self.base = model, plan, base
        self.fam = model.family
        self.touched = plan.touched_keys()
        self.cdtype = _compute_dtype(model)
        self.out: list[OutTensor] = []
        self.svdq: list[tuple] = []  # (natural order of the layer, part index, module name)
        self.awq: list[tuple] = []

    def add(self, name: str, layer: Layer | None, source: str | None, op: str = "same", *, dtype: str | None = None,
            shape: tuple[int, ...] | None = None, rows: tuple[int, int] | None = None) -> None:
        info = self.base.tensors[source] if source is not None else None
        src_shape = self.plan.out_shape(source, info.shape) if info is not None else None
        dtype = dtype or info.dtype
        shape = tuple(shape if shape is not None else src_shape)
        copy = (op == "same" and info is not None and dtype == info.dtype and shape == info.shape
                and source not in self.touched)
        byte_range = None
        if op == "qweight_rows" and source not in self.touched and rows[0] % 128 == 0 and rows[1] % 128 == 0:
            row_bytes = info.nbytes // info.shape[0]  # 128-row tiles are outermost: whole tiles are whole rows
            byte_range = (rows[0] * row_bytes, rows[1] * row_bytes)
        self.out.append(OutTensor(name, dtype, shape, layer.prefix if layer else None, source, op, rows, copy,
                                  byte_range))

    def parts_of(self, layer: Layer) -> list[DiffusersPart]:
        parts = self.fam.diffusers_parts(layer)
        if parts is None:
            raise ExportError(f"layer {layer.prefix} has no counterpart in diffusers' {self.fam.diffusers_class} "
                              f"(e.g. a bias its module lacks); nothing was written")
        return parts


def export_tree(model, plan, base) -> ExportTree:
    """Every tensor of the export, in the order written: copies first (the writer starts at once), then the
    computed tensors layer by layer in the model's natural order (a layer's results are written as soon as
    they are made). The shards are cut from this order (folder.py)."""
    b = _Builder(model, plan, base)
    groups: dict[str, list[str]] = {}
    for name in base.tensors:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    for prefix, names in groups.items():
        layer = model.layers.get(prefix)
        if layer is None:
            for n in names:
                b.add(n, None, n)
        elif layer.layout.is_svdq:
            _svdq_outputs(b, layer, names)
        elif layer.layout == Layout.AWQ_W4A16:
            _awq_outputs(b, layer, names)
        else:
            _dense_outputs(b, layer, names)
    out_names = [t.name for t in b.out]
    if len(set(out_names)) != len(out_names):
        twice = sorted({n for n in out_names if out_names.count(n) > 1})
        raise ExportError(f"two checkpoint tensors would both be {twice[0]} in diffusers' tree; nothing was written")
    copies = [t for t in b.out if t.copy]
    computed = sorted((t for t in b.out if not t.copy), key=lambda t: natural(t.layer))  # stable within a layer
    return ExportTree(copies + computed, [t[-1] for t in sorted(b.svdq)], [t[-1] for t in sorted(b.awq)], b.cdtype)


def _compute_dtype(model) -> str:
    """The 16-bit dtype of the quantized layers' floating tensors (their low-rank branch): diffusers builds the
    replaced modules in one compute dtype."""
    found = {l.dtype for l in model.layers.values() if l.layout.is_svdq}
    if len(found) != 1 or next(iter(found)) not in ("BF16", "F16"):
        raise ExportError(f"the W4A4 layers' 16-bit tensors are {sorted(found) or 'absent'}; the export needs one "
                          "16-bit compute dtype (bf16 or fp16)")
    return next(iter(found))


def _parts_by_name(layer: Layer, names: list[str], allowed: frozenset[str]) -> dict[str, str]:
    """{part: tensor name} of the layer, refusing a tensor the diffusers module has no parameter for."""
    parts = {n.rpartition(".")[2]: n for n in names}
    extra = sorted(set(parts) - allowed - DROPPED)
    if extra:
        raise ExportError(f"layer {layer.prefix} holds {layer.prefix}.{extra[0]}, which diffusers' quantized module "
                          "has no parameter for; nothing was written")
    return parts


def _svdq_outputs(b: _Builder, layer: Layer, names: list[str]) -> None:
    src = _parts_by_name(layer, names, SVDQ_PARTS)
    nvfp4 = layer.layout == Layout.SVDQ_NVFP4
    if not nvfp4 and ({"wcscales", "wtscale"} & set(src)):
        raise ExportError(f"int4 layer {layer.prefix} carries wcscales/wtscale, which diffusers' int4 module has no "
                          "parameter for; nothing was written")
    shift = b.fam.activation_shift(layer)
    for i, part in enumerate(b.parts_of(layer)):
        b.svdq.append((natural(layer.prefix), i, part.name))
        rows, n = (part.start, part.stop), part.stop - part.start
        whole = rows == (0, layer.out_features)
        cut = "same" if whole else None
        b.add(f"{part.name}.qweight", layer, src["qweight"], cut or "qweight_rows", shape=(n, layer.in_features // 2),
              rows=rows)
        ws = b.base.tensors[src["wscales"]].shape
        b.add(f"{part.name}.wscales", layer, src["wscales"], cut or "wscales_rows", shape=(ws[0], n), rows=rows)
        if "bias" in src:
            op = "shifted_bias" if shift else cut or "vector_rows"
            b.add(f"{part.name}.bias", layer, src["bias"], op, shape=(n,), rows=rows)
        b.add(f"{part.name}.smooth_factor", layer, src["smooth_factor"])
        b.add(f"{part.name}.proj_down", layer, src["proj_down"])
        b.add(f"{part.name}.proj_up", layer, src["proj_up"], cut or "up_rows",
              shape=(n, b.plan.out_shape(src["proj_up"], b.base.tensors[src["proj_up"]].shape)[1]), rows=rows)
        if nvfp4:
            wc = src.get("wcscales")
            b.add(f"{part.name}.wcscales", layer, wc, "ones" if wc is None else cut or "vector_rows", dtype=b.cdtype,
                  shape=(n,), rows=rows)
            wt = src.get("wtscale")
            b.add(f"{part.name}.wtscale", layer, wt, "ones" if wt is None else "wtscale", dtype=b.cdtype, shape=(1,))


def _awq_outputs(b: _Builder, layer: Layer, names: list[str]) -> None:
    src = _parts_by_name(layer, names, AWQ_PARTS)
    parts = b.parts_of(layer)
    if len(parts) != 1 or (parts[0].start, parts[0].stop) != (0, layer.out_features):
        raise ExportError(f"AWQ layer {layer.prefix} would be split, which the export does not do; nothing was written")
    name = parts[0].name
    b.awq.append((natural(layer.prefix), 0, name))
    order = b.fam.row_order(layer.prefix) is not None
    ng = layer.in_features // AWQ_GROUP
    b.add(f"{name}.qweight", layer, src["qweight"], "awq_qweight" if order else "same")
    for p in ("wscales", "wzeros"):  # the stored group params may carry padding rows past I/64: diffusers' have none
        padded = b.base.tensors[src[p]].shape[0] != ng
        b.add(f"{name}.{p}", layer, src[p], "awq_params" if order or padded else "same", shape=(ng, layer.out_features))
    if "bias" in src:
        b.add(f"{name}.bias", layer, src["bias"], "awq_bias" if order or b.fam.folded_bias(layer) else "same")


def _dense_outputs(b: _Builder, layer: Layer, names: list[str]) -> None:
    parts = b.parts_of(layer)
    src = {n.rpartition(".")[2]: n for n in names}
    for part in parts:
        whole = (part.start, part.stop) == (0, layer.out_features)
        for p, n in src.items():
            if whole:
                b.add(f"{part.name}.{p}", layer, n)
            elif p in ("weight", "bias"):
                shape = (part.stop - part.start,) + tuple(b.base.tensors[n].shape[1:])
                b.add(f"{part.name}.{p}", layer, n, "dense_rows", shape=shape, rows=(part.start, part.stop))
            else:
                raise ExportError(f"layer {layer.prefix} holds {n}, which cannot be split into {part.name}")

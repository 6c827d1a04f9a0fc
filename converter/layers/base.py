"""Layer kinds: how a layer of one storage layout takes a LoRA, one class per kind, registered by the
layouts it serves. A kind owns everything that depends on it: which adapters it refuses (planning), which
tensors it rewrites, how it merges (`apply`), how `verify` checks it, and how the report summarizes it.
The planner, the pipeline, `verify` and the report dispatch through `kind_of` / `by_name` only.

To add a kind: a module here with one `LayerKind` subclass (`layouts=(...)`), imported by `__init__`.
"""

from __future__ import annotations

import statistics
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Mapping

from ..errors import ExportError, MergeError
from ..layout import Layer, Layout
from ..naming import counted

if TYPE_CHECKING:
    import torch

    from ..adapters import Adapter
    from ..engine import OutTensor
    from ..export.transform import LayerSources
    from ..export.tree import TreeBuilder
    from ..model import Model
    from ..planner import LayerOp, Plan
    from ..st_reader import Checkpoint, TensorInfo

KINDS: dict[Layout, type[LayerKind]] = {}
BY_NAME: dict[str, type[LayerKind]] = {}
# layout -> the `detect` of the kind that declared it (a kind registered later for the same layout, with no `detect`
# of its own, takes its LoRAs differently but leaves the detection as it was)
DETECTORS: dict[Layout, Callable[[str, Mapping[str, TensorInfo], str, str, TensorInfo], Layer | None]] = {}


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep up to `limit` bytes of freed memory instead of handing it back to the
    kernel at once. A modulation layer allocates ~1 GB of short-lived fp32 temporaries, a dense update
    several O x I ones; returned and faulted in again for every layer, the page faults took a third of a
    modulation layer's time (measured: 1.7 -> 1.2 s a layer, with the peak memory unchanged). Process-wide;
    best effort: a no-op where the C library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return bool(libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, limit)
                    and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False


def one_heap() -> bool:
    """Ask glibc's malloc to serve every thread from one heap (arena). With a heap per thread each one keeps its
    own freed memory (see keep_freed_memory): the modulation merge's two row-chunk threads took the full-size
    merge to 1.33-1.59 GB peak RSS, one heap to 1.00 GB, no slower. Only effective before the threads start,
    so the command line calls it first thing. Process-wide; best effort: a no-op where the C library is not
    glibc."""
    try:
        import ctypes

        m_arena_max = -8
        return bool(ctypes.CDLL("libc.so.6").mallopt(m_arena_max, 1))
    except (OSError, AttributeError):
        return False


class MergeContext:
    """What the layers of one merge share: the base, the device, torch's thread setting and a cache for
    things computed once per run (the modulation inputs). The per-layer work outside the modulation layers
    is many small ops, so it runs on one intra-op thread, leaving the other cores to the writer threads (on
    2 cores a 12.7 GB merge took 32 s with 2 threads, 23 s with one); `all_threads` lends them all back."""

    def __init__(self, base: Checkpoint, model: Model, device: str = "cpu", single_thread: bool = True):
        import torch

        self.base, self.model, self.device = base, model, device
        self.cache: dict = {}
        self._cache_lock = threading.RLock()  # re-entrant: a shared thing may be made from other shared things
        self._streams: dict[int, object] = {}
        self._threads = torch.get_num_threads()
        self._single = single_thread
        if single_thread:
            torch.set_num_threads(1)
        if device.startswith("cuda"):
            # torch loads its CUDA linear algebra on the first such call, and two threads making their first
            # call at once fail ("lazy wrapper should be called at most once"): one call now, before any worker.
            # Should it fail here, the layers that need it say so themselves (a merge of plain LoRAs does not)
            try:
                torch.linalg.cholesky_ex(torch.ones(1, 1, device=device))
            except RuntimeError:
                pass

    def shared(self, name: str, make: Callable[[], object]) -> object:
        """The run's one `name`, made by `make()` on first use (once, whichever thread asks first)."""
        with self._cache_lock:
            if name not in self.cache:
                self.cache[name] = make()
            return self.cache[name]

    @contextmanager
    def worker_stream(self) -> Iterator[None]:
        """On a CUDA device: the calling thread's own CUDA stream for the block, so that a layer's host round trips
        (figures, the results' copies back) wait for its own kernels only, not for another worker's layer. Else
        nothing."""
        if not self.device.startswith("cuda"):
            yield
            return
        import torch

        with self._cache_lock:
            stream = self._streams.setdefault(threading.get_ident(), torch.cuda.Stream(self.device))
        with torch.cuda.stream(stream):
            yield

    @contextmanager
    def all_threads(self) -> Iterator[None]:
        import torch

        torch.set_num_threads(self._threads)
        try:
            yield
        finally:
            if self._single:
                torch.set_num_threads(1)

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._threads)


def merge_layer(ctx: MergeContext, plan: Plan, prefix: str, records: list[dict]) -> dict[str, torch.Tensor]:
    """Layer `prefix`'s tensors that the merge rewrites, made by its kind (the same for a merged file and an
    export); the kind's fidelity record, if any, is appended to `records` as {"layer", "method", ...}."""
    merged, record = compute_layer(ctx, plan, prefix)
    if record is not None:
        records.append(record)
    return merged


def compute_layer(ctx: MergeContext, plan: Plan, prefix: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(layer `prefix`'s rewritten tensors, its fidelity record {"layer", "method", ...} or None). Layers may be
    computed at once on several threads (a CUDA merge's workers): what they share goes through `ctx.shared`."""
    layer = plan.model.layers[prefix]
    kind = kind_of(layer)
    merged, record = kind.apply(ctx, plan, layer, plan.ops.get(prefix))
    return merged, None if record is None else {"layer": prefix, "method": kind.name} | record


class VerifyContext(MergeContext):
    """A merge context that also holds the merged file being checked."""

    def __init__(self, base: Checkpoint, merged: Checkpoint, model: Model):
        super().__init__(base, model, "cpu", single_thread=False)
        self.merged = merged

    def unchanged(self, key: str) -> bool:
        """Whether tensor `key` is byte-identical in the merged file and the base."""
        import torch

        a, b = self.base.get(key), self.merged.get(key)
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class LayerKind:
    """Base class; subclasses register with `class X(LayerKind, layouts=(Layout.…,))`."""

    name: ClassVar[str]
    verify_figure: ClassVar[str] = "rel_error"  # the figure verify's table shows for this kind
    plot_label: ClassVar[str | None] = None  # `verify --plot` draws a panel of verify_figure per block if set
    plot_limit: ClassVar[float | None] = None  # a tolerance line on that panel
    takes_dense: ClassVar[bool] = True  # takes weight updates that are not low-rank (a dense ΔW)
    # the parts of its layers whose second dimension is the checkpoint's uniform rank (resized when it changes)
    rank_parts: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, layouts: tuple[Layout, ...] = (), **kw):
        super().__init_subclass__(**kw)
        for layout in layouts:
            if layout in KINDS:
                raise RuntimeError(f"two layer kinds for layout {layout}")
            KINDS[layout] = cls
            if "detect" in cls.__dict__:
                DETECTORS[layout] = cls.detect
        if layouts:
            BY_NAME[cls.name] = cls

    # -- reading the header ----------------------------------------------------------------------------------
    @classmethod
    def detect(cls, path: str, tensors: Mapping[str, TensorInfo], prefix: str, part: str, info: TensorInfo
               ) -> Layer | None:
        """The layer (of a layout this kind declares) that tensor `prefix.part` (`info`) of the header makes known, from
        names, shapes and dtypes alone; None if the tensor is not the one that tells. A layer of its layout that
        is broken is a MergeError naming `path`. A kind that declares a layout defines it."""
        return None

    # -- planning --------------------------------------------------------------------------------------------
    @classmethod
    def refuse(cls, layer: Layer, adapter: Adapter) -> str | None:
        """Why `adapter` cannot go into `layer` (a reason for the unmapped list), or None."""
        if adapter.applies_to == "bias" and not layer.has_bias:
            return f"bias delta for {layer.prefix}, which has no bias"
        if adapter.applies_to == "weight" and adapter.rank is None and not cls.takes_dense:
            return "full-weight delta (.diff) on a 4-bit layer cannot be merged exactly"
        return None

    @classmethod
    def max_exact_rank(cls, layer: Layer, base_rank: int) -> int:
        """Largest rank of a low-rank update this kind takes as exact factors; above it, as a dense ΔW."""
        return 1 << 30

    @classmethod
    def dense_rank(cls, op: LayerOp, svd_rank: int) -> int:
        """Rank the uniform low-rank branch needs for this layer's dense updates (kinds without a branch: 0)."""
        return 0

    @classmethod
    def added_rank(cls, op: LayerOp) -> int:
        """Rank this layer's low-rank branch grows by (kinds without a branch: 0)."""
        return 0

    @classmethod
    def touched(cls, layer: Layer, op: LayerOp | None, plan: Plan) -> set[str]:
        """The tensors of `layer` the merge rewrites."""
        if op is None:
            return set()
        out = {layer.key("weight")} if op.weight_contributions else set()
        return out | ({layer.key("bias")} if op.bias_contributions else set())

    # -- merging and checking ---------------------------------------------------------------------------------
    @classmethod
    def apply(cls, ctx: MergeContext, plan: Plan, layer: Layer, op: LayerOp | None
              ) -> tuple[dict[str, torch.Tensor], dict | None]:  # pragma: no cover - interface
        """The layer's new tensors (only those that change) and its fidelity record (None: nothing to say)."""
        raise NotImplementedError

    @classmethod
    def verify(cls, ctx: VerifyContext, plan: Plan, layer: Layer, op: LayerOp | None
               ) -> dict | None:  # pragma: no cover - interface
        """{"ok", "problems", figures...} for `layer` of the merged file, or None when there is nothing to check."""
        raise NotImplementedError

    # -- the diffusers export ---------------------------------------------------------------------------------
    @classmethod
    def export_outputs(cls, tree: TreeBuilder, layer: Layer, names: list[str]) -> None:
        """Declare the export's tensors of `layer` (`names`: its tensors in the base) with `tree.add`, from the
        headers alone. By default a 16-bit layer's: each diffusers part takes its rows of the weight and bias."""
        for part in tree.parts_of(layer):
            whole_rows = (part.start, part.stop) == (0, layer.out_features)
            for name in names:
                suffix = name.rpartition(".")[2]
                if whole_rows:
                    tree.add(f"{part.name}.{suffix}", layer, name)
                elif suffix in ("weight", "bias"):
                    shape = (part.stop - part.start,) + tuple(tree.base.tensors[name].shape[1:])
                    tree.add(f"{part.name}.{suffix}", layer, name, "dense_rows", shape=shape,
                             rows=(part.start, part.stop))
                else:
                    raise ExportError(f"layer {layer.prefix} holds {name}, which cannot be split into {part.name}")

    @classmethod
    def export_tensor(cls, sources: LayerSources, out: OutTensor, tensor: torch.Tensor | None) -> torch.Tensor:
        """Output `out` of the layer, made by its `op` (as export_outputs declared it) from `tensor`, its source
        after the merge (None for a synthesized one); `sources` holds the layer's other tensors. The ops every
        kind has: "same", "dense_rows" (a row range), "ones"."""
        if out.op == "same":
            return tensor
        if out.op == "dense_rows":
            return tensor[out.rows[0]:out.rows[1]].contiguous()
        if out.op == "ones":
            import torch

            from ..dtypes import torch_dtype

            return torch.ones(out.shape, dtype=torch_dtype(out.dtype))
        raise ExportError(f"{out.name}: a {cls.name} layer has no export op {out.op!r} (a bug)")

    # -- reporting -------------------------------------------------------------------------------------------
    # merge and verify summarize the same records (one per layer the plan targets) with the same words, so both
    # count in layers as the plan does; a verify record may lack the merge-only figures
    @classmethod
    def summarize(cls, records: list[dict]) -> dict:
        e = [r["rel_error"] for r in records if "rel_error" in r]
        return {"layers": len(records), "rel_error_max": max(e) if e else None,
                "rel_error_median": statistics.median(e) if e else None}

    @classmethod
    def render_summary(cls, d: dict) -> str | None:
        if d.get("rel_error_max") is None:
            return None
        return f"fidelity {cls.name} {count_layers(d['layers'])}: rel. error max {d['rel_error_max']:.2e}"

    @classmethod
    def render_layer(cls, rec: dict) -> str:
        """One layer's figures in a few words (the report's and verify's per-layer lines with -v)."""
        value = rec.get(cls.verify_figure)
        return f"{cls.verify_figure} {value:.3g}" if isinstance(value, (int, float)) else ""

    @classmethod
    def plot_point(cls, rec: dict) -> tuple[str, float, float | None] | None:
        """(series, value, tolerance) of one verify record for `verify --plot`; None: nothing to draw."""
        value = rec.get(cls.verify_figure)
        return None if not isinstance(value, (int, float)) else (cls.name, float(value), cls.plot_limit)


def count_layers(count: int) -> str:
    """The one unit merge and verify count in: layers, as the plan counts them."""
    return counted(count, "layer")


def detect_layer(path: str, tensors: Mapping[str, TensorInfo], name: str) -> Layer | None:
    """The layer tensor `name` makes known (see LayerKind.detect), asking the kinds in the order they declared
    their layouts; None: the tensor tells of no layer (another tensor of its layer does, or it is no layer's)."""
    prefix, _, part = name.rpartition(".")
    for detect in dict.fromkeys(DETECTORS.values()):
        layer = detect(path, tensors, prefix, part, tensors[name])
        if layer is not None:
            return layer
    return None


def is_qweight(path: str, tensors: Mapping[str, TensorInfo], part: str, info: TensorInfo, dtype: str,
               matrices: tuple[str, ...]) -> bool:
    """Whether tensor `part` (`info`) is the `qweight` of a quantized layer packed as `dtype`; the tensors
    `matrices` of its layer that are present must be 2-D (the header may lie)."""
    if part != "qweight" or info.dtype != dtype:
        return False
    prefix = info.name.rpartition(".")[0]
    packed = {name: tensors.get(f"{prefix}.{name}") for name in matrices}
    flat = [f"{name} {found.shape}" for name, found in packed.items() if found is not None and len(found.shape) != 2]
    if flat:
        raise MergeError(f"{path}: quantized layer {prefix} has {', '.join(flat)}: not a matrix")
    return True


def kind_of(layer: Layer) -> type[LayerKind]:
    return KINDS[layer.layout]


def by_name(name: str) -> type[LayerKind]:
    return BY_NAME[name]

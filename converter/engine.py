"""One streamed pass over a base, shared by the merge (one or more output files, `pipeline.execute_many`) and the
diffusers export (a folder of shards, `export.run.write_export`): the LoRAs hashed in the background for the
provenance, the changed layers computed ahead of the writer (`LayerStream`, through prefetch.py) with one merge
context, every output finished (complete, durable, checked), the inputs re-checked after the last read, then the
outputs published together, or all of them aborted when anything failed (an interrupt included): all or nothing.

An output is a description, a list of `OutTensor`s (name, dtype, shape, and where it comes from: copied from a base
tensor, whole or a byte range of it, or computed by its layer), and a writer: a `TensorFeed` hands the described
tensors to it. What differs between the passes lives with them: the description (the merge's is the base's
tensors in its output order, each copied or rewritten by its layer kind: op "merged"; the export's the diffusers
tree each kind declares) and how it is written (`Sink`: one file, or shards with an index in a folder)."""

from __future__ import annotations

import gc
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Protocol

from . import interrupts
from .errors import MergeError
from .prefetch import InOrder, LayerPrefetch
from .st_reader import Checkpoint
from .st_writer import OutSpec

if TYPE_CHECKING:
    from .layers import MergeContext
    from .model import Model
    from .st_writer import StreamingWriter

# compute(key, in_order, context) -> the layer's tensors; `context()` gives the pass's merge context (its first call
# makes it, whichever worker calls first)
LayerCompute = Callable[[Hashable, InOrder, Callable[[], "MergeContext"]], dict]


@dataclass(frozen=True)
class OutTensor(OutSpec):
    """One tensor of an output's description. `copy`: the bytes of base tensor `source`, unchanged (no op, no dtype
    change, not rewritten by the merge). Otherwise it is made by its layer's computation (`layer`), with `op`
    naming how: "merged" is the merge's tensor as the layer kind rewrote it, or the source unchanged where the kind
    left it (a modulation layer kept as it was); the export's ops are its layer kind's (LayerKind.export_tensor)."""

    layer: str | None = None  # the checkpoint layer whose computation makes it
    source: str | None = None  # base tensor (None: synthesized ones)
    op: str = "same"
    rows: tuple[int, int] | None = None  # the diffusers part's rows of the layer's output
    copy: bool = True
    # bytes [start, stop) of `source` in the base are this tensor (a cut of whole rows the merge leaves alone):
    # written by a file copy, never read into memory
    byte_range: tuple[int, int] | None = None


class TensorFeed:
    """Hands one output's described tensors to its writer(s), in order: copies (whole, or a byte range) go from
    the base file to the output file; a computed tensor comes from its layer's results, taken once per layer
    (`take_layer(layer)`) when its first computed tensor comes up, the others waiting until their turn."""

    def __init__(self, base: Checkpoint, take_layer: Callable[[str], dict]):
        self.base, self.take_layer = base, take_layer
        self.pending: dict[str, object] = {}
        self.taken: set[str] = set()  # layers already taken (once each, even when nothing came of them)

    def put(self, writer: StreamingWriter, tensor: OutTensor) -> None:
        if tensor.copy or tensor.byte_range is not None:
            writer.copy_tensor(tensor.name, self.base, tensor.source, tensor.byte_range)
            return
        if tensor.layer not in self.taken:
            self.taken.add(tensor.layer)
            self.pending.update(self.take_layer(tensor.layer))
        made = self.pending.pop(tensor.name, None)
        if made is not None:
            writer.write_tensor(tensor.name, made)
        elif tensor.op == "merged":  # the kind left it as it was
            writer.copy_tensor(tensor.name, self.base, tensor.source)
        else:
            raise RuntimeError(f"{tensor.name}: its layer {tensor.layer} did not make it (a bug)")


class Sink(Protocol):
    """One output of a pass."""

    def open(self) -> None:
        """Make its temp file or folder (nothing is visible at the output path yet)."""

    def finish(self) -> None:
        """Every tensor is written: complete it, make it durable and check it."""

    def publish(self) -> None:
        """Move it into place (called for every output at once, with signals deferred)."""

    def abort(self) -> None:
        """Remove whatever it made (safe before open and after a failed publish)."""


class LayerStream:
    """The changed layers of a pass, computed on `workers` threads in `schedule` order, at most `ahead` layers
    before the writer takes them (`take(key)`), with one MergeContext for all of them, made (and torch imported)
    by the first layer that asks for it. A failure is raised by the `take` of its layer."""

    def __init__(self, base: Checkpoint, model: Model, device: str, schedule: list[Hashable], compute: LayerCompute,
                 *, workers: int, ahead: int, name: str):
        self._base, self._model, self._device, self._compute = base, model, device, compute
        self._contexts: list[MergeContext] = []
        self._context_lock = threading.Lock()
        # no workers: each layer is computed by the take that needs it, in the writer's thread
        self._prefetch = (LayerPrefetch(schedule, self._run, ahead=ahead, workers=workers, name=name) if workers
                          else None)

    def _context(self) -> MergeContext:
        with self._context_lock:
            if not self._contexts:
                from .layers import MergeContext

                self._contexts.append(MergeContext(self._base, self._model, self._device))
            return self._contexts[0]

    def _run(self, key: Hashable, in_order: InOrder) -> dict:
        return self._compute(key, in_order, self._context)

    def take(self, key: Hashable) -> dict:
        if self._prefetch is None:
            return self._run(key, nullcontext)
        return self._prefetch.take(key)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()  # before the context: a worker may still be computing with it
        if self._contexts:
            self._contexts[0].close()


def run_pass(inputs: list[Checkpoint], loras: Iterable, sinks: list[Sink], layers: Callable[[], LayerStream],
             write: Callable[[LayerStream], None]) -> None:
    """Open the sinks, start the layers, `write(stream)` every tensor, finish the sinks, re-check the inputs and
    publish every sink; on any failure abort them all (no output is left) and re-raise."""
    for lora in loras:
        lora.hash_in_background()
    stream: LayerStream | None = None
    # everything long-lived exists now; the pass allocates many short-lived objects, and full collections would
    # keep walking the plan and headers (measured ~3% of a merge)
    gc.freeze()
    try:
        for sink in sinks:
            sink.open()
        stream = layers()
        write(stream)
        for sink in sinks:
            sink.finish()
        check_inputs_unchanged(inputs)
        with interrupts.deferred():  # a signal now waits until every output is in place: all or nothing
            for sink in sinks:
                sink.publish()
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    finally:
        if stream is not None:
            stream.close()
        gc.unfreeze()


def check_inputs_unchanged(inputs: list[Checkpoint]) -> None:
    """What was read must be what the output vouches for (and hashed): the inputs unchanged since they were
    opened, checked after the last read."""
    for checkpoint in inputs:
        checkpoint.check_unchanged()


def progress_counter(progress: Callable[[int, int, str], None] | None, total: int) -> Callable[[int], None]:
    """A writer callback that adds up the bytes written and reports them to `progress(done, total, what)`."""
    done = [0]

    def step(count: int) -> None:
        done[0] += count
        if progress:
            progress(done[0], total, "")

    return step


def post_write_check(path: str, specs: list[OutSpec], meta: dict[str, str]) -> None:
    """Re-open what was written: same key set, dtypes, shapes and metadata as planned."""
    with Checkpoint(path) as written:
        got = {name: (info.dtype, info.shape) for name, info in written.tensors.items()}
        want = {spec.name: (spec.dtype, spec.shape) for spec in specs}
        if got != want or written.metadata != meta:
            raise MergeError("the written file does not match the plan (disk full or a concurrent writer?); "
                             "nothing was written")

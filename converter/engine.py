"""One streamed pass over a base, shared by the merge (one or more output files, `pipeline.execute_many`) and the
diffusers export (a folder of shards, `export.run.write_export`): the LoRAs hashed in the background for the
provenance, the changed layers computed ahead of the writer (`LayerStream`, through prefetch.py) with one merge
context, every output finished (complete, durable, checked), the inputs re-checked after the last read, then the
outputs published together, or all of them aborted when anything failed (an interrupt included): all or nothing.

What differs between the two lives with them: which tensors an output holds and where each comes from (the
merge: the base's tensors, copied or rewritten by their layer kind; the export: the diffusers tree each kind
declares), and how it is written (`Sink`: one file, or shards with an index in a folder)."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Protocol

from . import interrupts
from .errors import MergeError
from .prefetch import InOrder, LayerPrefetch
from .st_reader import Checkpoint

if TYPE_CHECKING:
    from .layers import MergeContext
    from .model import Model
    from .st_writer import OutSpec

# compute(key, in_order, context) -> the layer's tensors; `context()` gives the pass's merge context (call it inside
# the in-order section: its first call makes it)
LayerCompute = Callable[[Hashable, InOrder, Callable[[], "MergeContext"]], dict]


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
    by the first layer's in-order section. A failure is raised by the `take` of its layer."""

    def __init__(self, base: Checkpoint, model: Model, device: str, schedule: list[Hashable], compute: LayerCompute,
                 *, workers: int, ahead: int, name: str):
        self._base, self._model, self._device, self._compute = base, model, device, compute
        self._contexts: list[MergeContext] = []
        self._prefetch = LayerPrefetch(schedule, self._run, ahead=ahead, workers=workers, name=name)

    def _context(self) -> MergeContext:
        if not self._contexts:
            from .layers import MergeContext

            self._contexts.append(MergeContext(self._base, self._model, self._device))
        return self._contexts[0]

    def _run(self, key: Hashable, in_order: InOrder) -> dict:
        return self._compute(key, in_order, self._context)

    def take(self, key: Hashable) -> dict:
        return self._prefetch.take(key)

    def close(self) -> None:
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

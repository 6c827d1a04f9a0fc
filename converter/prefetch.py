"""Layers computed ahead of the writer, for the merge pass and the export alike: worker threads compute them in
the order they will be written, at most `ahead` layers before the writer takes them. The compute then overlaps
what the main thread does meanwhile (the copies of the tensors before and between the computed ones, a shard's
last writes and fsync, the write queue's room); torch releases the GIL while it works. The part of a layer's
work that must see the layers before it (the merge, which keeps records and shares a cache) runs in a section
the workers pass in layer order, so every result and record is the one a sequential run makes.

How many workers: the export two on 2 cores, up to six on more (its ops after the merge are thread-safe: see
export/run.EXPORT_WORKERS); the merge none on the CPU (its layers are computed by the take that needs them: see
pipeline.MERGE_WORKERS for the measurement) and four when its maths runs on a CUDA device, where only the
records of its layers wait for the layer order (each worker on its own CUDA stream)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, ContextManager, Hashable, Iterator

InOrder = Callable[[], ContextManager[None]]


class _Stopped(Exception):
    """The prefetch was closed while a worker waited for its turn."""


class LayerPrefetch:
    """`take(key)` hands over the result of `compute(key, in_order)`, computed in the background; the keys (a
    layer's prefix, or anything hashable that names one layer's work, such as (output, prefix)) must be taken in
    `order`. `with in_order():` inside `compute` runs after the same section of every earlier layer has ended.
    An exception of `compute` is raised by the `take` of its layer. `close` stops the workers (after the layers
    they are computing) and waits for them."""

    def __init__(self, order: list[Hashable], compute: Callable[[Hashable, InOrder], dict], ahead: int = 2,
                 workers: int = 2, name: str = "layer-compute"):
        self._order = order
        self._compute = compute
        self._ahead = max(ahead, workers)
        self._results: dict[Hashable, tuple[dict | None, BaseException | None]] = {}
        self._claimed = 0  # layers handed to a worker
        self._turn = 0  # the layer whose in-order section may run
        self._taken = 0
        self._stopped = False
        self._changed = threading.Condition()
        self._workers = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
                         for n in range(workers)]
        for worker in self._workers:
            worker.start()

    def _claim(self) -> int | None:
        with self._changed:  # bounded memory: at most `ahead` layers computed or under way before the writer
            while not self._stopped and self._claimed < len(self._order) and self._claimed - self._taken >= self._ahead:
                self._changed.wait()
            if self._stopped or self._claimed >= len(self._order):
                return None
            self._claimed += 1
            return self._claimed - 1

    def _work(self) -> None:
        while (index := self._claim()) is not None:
            key = self._order[index]
            try:
                result: tuple[dict | None, BaseException | None] = (self._compute(key, self._section(index)), None)
            except _Stopped:
                return
            except BaseException as e:  # noqa: BLE001 - raised in the main thread by take()
                result = (None, e)
            try:
                self._pass_turn(index)  # a layer that failed before its section still lets the next ones on
            except _Stopped:
                return
            with self._changed:
                self._results[key] = result
                self._changed.notify_all()

    def _wait_turn(self, index: int) -> None:
        with self._changed:
            while self._turn < index and not self._stopped:
                self._changed.wait()
            if self._turn < index:
                raise _Stopped

    def _pass_turn(self, index: int) -> None:
        self._wait_turn(index)
        with self._changed:
            self._turn = max(self._turn, index + 1)
            self._changed.notify_all()

    def _section(self, index: int) -> InOrder:
        @contextmanager
        def in_order() -> Iterator[None]:
            self._wait_turn(index)
            try:
                yield
            finally:
                self._pass_turn(index)

        return in_order

    def take(self, key: Hashable) -> dict:
        if self._taken >= len(self._order) or self._order[self._taken] != key:
            raise RuntimeError(f"prefetch: {key} taken out of order")
        with self._changed:
            while key not in self._results:
                self._changed.wait()
            tensors, error = self._results.pop(key)
            self._taken += 1
            self._changed.notify_all()
        if error is not None:
            raise error
        return tensors

    def close(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        for worker in self._workers:
            worker.join()

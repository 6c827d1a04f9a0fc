"""Layers computed ahead of the writer: one worker thread computes them in the order they will be written, at
most `ahead` layers before the writer takes them. The compute then overlaps what the main thread waits for (a
shard's last writes and fsync, the write queue's room); torch releases the GIL while it works. One worker keeps
the order of the computation, and so of its records, exactly as in a sequential run."""

from __future__ import annotations

import threading
from typing import Callable


class LayerPrefetch:
    """`take(prefix)` hands over the result of `compute(prefix)`, computed in the background; layers must be
    taken in `order`. An exception of `compute` is raised by the `take` of its layer. `close` stops the worker
    (after the layer it is computing) and waits for it."""

    def __init__(self, order: list[str], compute: Callable[[str], dict], ahead: int = 2):
        self._order = order
        self._compute = compute
        self._ahead = ahead
        self._results: dict[str, tuple[dict | None, BaseException | None]] = {}
        self._taken = 0
        self._stopped = False
        self._changed = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="export-compute", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        for index, prefix in enumerate(self._order):
            with self._changed:  # bounded memory: at most `ahead` finished layers wait for the writer
                while not self._stopped and index - self._taken >= self._ahead:
                    self._changed.wait()
                if self._stopped:
                    return
            try:
                result: tuple[dict | None, BaseException | None] = (self._compute(prefix), None)
            except BaseException as e:  # noqa: BLE001 - raised in the main thread by take()
                result = (None, e)
            with self._changed:
                self._results[prefix] = result
                self._changed.notify_all()
            if result[1] is not None:
                return

    def take(self, prefix: str) -> dict:
        if self._taken >= len(self._order) or self._order[self._taken] != prefix:
            raise RuntimeError(f"prefetch: {prefix} taken out of order")
        with self._changed:
            while prefix not in self._results:
                self._changed.wait()
            tensors, error = self._results.pop(prefix)
            self._taken += 1
            self._changed.notify_all()
        if error is not None:
            raise error
        return tensors

    def close(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._worker.join()

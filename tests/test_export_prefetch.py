"""The export computes layers on a worker thread ahead of the writer: in order, bounded, errors raised where
the writer takes the layer, and a close that stops the worker."""

from __future__ import annotations

import threading
import time

import pytest

from converter.export.prefetch import LayerPrefetch


def test_layers_come_in_order_and_at_most_ahead():
    computed: list[str] = []

    def compute(prefix: str) -> dict:
        computed.append(prefix)
        return {prefix + ".w": len(computed)}

    order = [f"l{i}" for i in range(6)]
    feed = LayerPrefetch(order, compute, ahead=2)
    try:
        for _ in range(100):  # the worker stops after two layers nobody took
            if len(computed) == 2:
                break
            time.sleep(0.01)
        time.sleep(0.05)
        assert computed == ["l0", "l1"]
        assert [feed.take(p) for p in order] == [{f"l{i}.w": i + 1} for i in range(6)]
        assert computed == order
    finally:
        feed.close()


def test_an_error_is_raised_by_the_take_of_its_layer():
    def compute(prefix: str) -> dict:
        if prefix == "bad":
            raise KeyboardInterrupt
        return {prefix: 1}

    feed = LayerPrefetch(["a", "bad", "c"], compute)
    try:
        assert feed.take("a") == {"a": 1}
        with pytest.raises(KeyboardInterrupt):
            feed.take("bad")
    finally:
        feed.close()


def test_out_of_order_take_is_refused_and_close_stops_the_worker():
    started = threading.Event()
    release = threading.Event()
    computed: list[str] = []

    def compute(prefix: str) -> dict:
        started.set()
        release.wait(5)
        computed.append(prefix)
        return {}

    feed = LayerPrefetch(["a", "b", "c", "d"], compute, ahead=1)
    assert started.wait(5)
    with pytest.raises(RuntimeError, match="b taken out of order"):
        feed.take("b")
    release.set()
    feed.close()  # waits for the layer under way, computes no further
    assert not feed._worker.is_alive()
    assert computed == ["a"]

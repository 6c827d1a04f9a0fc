"""The two sequential loops of the calibrated merge (the rounding order and the rounding itself) in a form whose
kernel sequence does not depend on the layer, so that on a CUDA device each is captured once as a CUDA graph and
replayed for every layer with new inputs.

On a GPU these loops are thousands of tiny kernels (a full-size layer: 560 pivot steps and 561 rounding steps of
a few vector ops each); launched one by one from Python they took 80 of a layer's 93 ms on an H100, almost all
launch latency. The static forms compute exactly what `ModulationCalibration.rounding_plan` and
`sequential_round` compute, bit for bit (same ops on the same values; tested on the CPU): the pivot loop keeps
the rows it has taken instead of dropping them, the rounding step computes the code and the bf16 outcome of
every variable and keeps the one its kind asks for.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

ENABLED = True  # tests switch it off to compare with the launched loops
_LOCK = threading.Lock()
_GRAPHS: dict[tuple, _Graphed] = {}
_GRAPHS_KEPT = 16  # two loops for each CUDA stream (a merge's worker) and layer shape
_FAILED: set[tuple] = set()


def usable(device: torch.device) -> bool:
    return ENABLED and device.type == "cuda"


# -- the static loops (any device) ------------------------------------------------------------------------------
def pivot_order_static(a: torch.Tensor, picks: torch.Tensor) -> None:
    """Minimum-pivot Cholesky order of the symmetric matrix `a` (n x n, float32 or float64, overwritten):
    picks[k] = the k-th pivot. Taken rows stay in place with their diagonal at the largest float (out of every
    later argmin); the update of the rows not taken is the same as when taken rows are dropped."""
    big, tiny = torch.finfo(a.dtype).max, torch.finfo(a.dtype).tiny
    for k in range(a.shape[0]):
        pivot = torch.argmin(a.diagonal()).view(1)
        picks[k: k + 1].copy_(pivot)
        col = a.index_select(1, pivot).squeeze(1)
        col = col / col.index_select(0, pivot).clamp_min(tiny).sqrt()
        a.addr_(col, col, alpha=-1.0)
        a.diagonal().index_fill_(0, pivot, big)


class RoundingInputs:
    """The buffers of one static rounding: rows in rounding order (variables x rows). work: targets (consumed);
    scale / scale_div / zero: each variable's grid (a tail weight: its group's scale, the scale to divide by
    and its zero; the bias: 1, 1, 0; a zero shift: 1, 1, the base zero); is_code (N',) bool; u, u_rel_t (u's rows
    divided by their diagonal, transposed), u_diag; value_code / value_float: a step's raw error as a code / as a bf16
    value. Outputs: codes (every row's code; kept for the tail weights), rounded
    (every row's bf16 outcome; kept for the bias and the new zeros), errs (scaled errors), sum_e2 (O,)."""

    def __init__(self, nvar: int, rows: int, device: torch.device):
        def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        self.work, self.scale, self.scale_div, self.zero = (empty(nvar, rows) for _ in range(4))
        self.codes, self.rounded, self.errs = (empty(nvar, rows) for _ in range(3))
        self.value_code, self.value_float = empty(rows), empty(rows)
        self.is_code = empty(nvar, dtype=torch.bool)
        self.u, self.u_rel_t = empty(nvar, nvar), empty(nvar, nvar)
        self.u_diag = empty(nvar)
        self.sum_e2 = empty(rows)


def sequential_round_static(b: RoundingInputs, block: int) -> None:
    """`calibration.sequential_round` on buffers in rounding order, every step the same kernels (on the CPU,
    the steps on one thread like there: a product's sums may be split differently on more)."""
    from .calibration import cpu_threads

    nvar = b.work.shape[0]
    b.sum_e2.zero_()
    for i1 in range(0, nvar, block):
        i2 = min(i1 + block, nvar)
        with cpu_threads(1, b.work.device):
            _round_block(b, i1, i2)
        errs = b.errs[i1:i2]
        errs.div_(b.u_diag[i1:i2, None])
        b.sum_e2.add_(errs.square().sum(0))
        if i2 < nvar:
            b.work[i2:].addmm_(b.u[i1:i2, i2:].T, errs, alpha=-1.0)


def _round_block(b: RoundingInputs, i1: int, i2: int) -> None:
    for i in range(i1, i2):
        t, r, zero = b.work[i], b.errs[i], b.zero[i]
        if i > i1:
            t.addmv_(b.errs[i1:i].T, b.u_rel_t[i, i1:i], alpha=-1.0)
        q = b.codes[i]
        torch.sub(t, zero, out=b.value_code)
        torch.div(b.value_code, b.scale_div[i], out=q).round_().clamp_(0, 15)
        b.value_code.addcmul_(q, b.scale[i], value=-1.0)
        rounded = b.rounded[i]
        torch.add(t, zero, out=rounded)
        rounded.copy_(rounded.to(torch.bfloat16))
        torch.sub(rounded, zero, out=b.value_float)
        torch.sub(t, b.value_float, out=b.value_float)
        torch.where(b.is_code[i], b.value_code, b.value_float, out=r)


# -- on a CUDA device: captured once, replayed per layer ----------------------------------------------------------
def pivot_order(a: torch.Tensor) -> torch.Tensor:
    """`pivot_order_static` of `a` (left as it was), from a CUDA graph (off CUDA: launched)."""
    n = a.shape[0]

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(a), torch.zeros(n, dtype=torch.long, device=a.device)

    return _run(("pivot", n, a.device), make, lambda bufs: pivot_order_static(*bufs),
                lambda bufs: bufs[0].copy_(a), lambda bufs: bufs[1].clone())


def sequential_round(targets: torch.Tensor, perm: torch.Tensor, u: torch.Tensor, s_t: torch.Tensor,
                     z_t: torch.Tensor, z_g: torch.Tensor, block: int, s_div: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`calibration.sequential_round` (same arguments and results) from a CUDA graph (off CUDA: launched)."""
    nvar, rows = targets.shape
    m = s_t.shape[0]
    rank = torch.empty_like(perm)  # each canonical variable's place in the rounding order
    rank[perm] = torch.arange(nvar, device=perm.device)
    code_at, zero_at = rank[1: 1 + m], rank[1 + m:]

    def load(b: RoundingInputs) -> None:
        torch.index_select(targets, 0, perm, out=b.work)
        for buffer, tail, other in ((b.scale, s_t, 1.0), (b.scale_div, s_t if s_div is None else s_div, 1.0),
                                    (b.zero, z_t, 0.0)):
            buffer.fill_(other).index_copy_(0, code_at, tail)
        b.zero.index_copy_(0, zero_at, z_g)
        b.is_code.zero_().index_fill_(0, code_at, True)
        b.u.copy_(u)
        b.u_diag.copy_(u.diagonal())
        b.u_rel_t.copy_((u / b.u_diag[:, None]).T)

    def unload(b: RoundingInputs) -> tuple[torch.Tensor, ...]:
        # index_select, not rounded[rank[0]]: indexing by a device scalar would wait for the device
        return (b.rounded.index_select(0, rank[:1]).squeeze(0), b.codes.index_select(0, code_at),
                b.rounded.index_select(0, zero_at), b.sum_e2.clone())

    return _run(("round", nvar, rows, block, targets.device), lambda: RoundingInputs(nvar, rows, targets.device),
                lambda b: sequential_round_static(b, block), load, unload)


class _Graphed:
    """One captured loop, the buffers it reads and writes, and the lock of their one user at a time."""

    def __init__(self, buffers, body: Callable[[], None]):
        self.buffers = buffers
        self.lock = threading.Lock()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # a warm-up outside the capture (lazy inits, workspaces)
            body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            body()


def _capture(key: tuple, make_buffers: Callable[[], object], body: Callable[[object], None]) -> _Graphed | None:
    if key in _FAILED:
        return None
    buffers = make_buffers()
    try:
        graphed = _Graphed(buffers, lambda: body(buffers))
    except Exception as e:  # noqa: BLE001 - launching the kernels one by one always works
        log.debug("CUDA graph capture failed (%s); the loop's kernels are launched one by one", e)
        _FAILED.add(key)
        return None
    if len(_GRAPHS) >= _GRAPHS_KEPT:
        _GRAPHS.clear()
    _GRAPHS[key] = graphed
    return graphed


def _run(key: tuple, make_buffers: Callable[[], object], body: Callable[[object], None],
         load: Callable[[object], None], unload: Callable[[object], object]):
    """load(buffers); body(buffers), replayed from the graph captured for `key` on the current CUDA stream (or
    launched where capture failed, or launched as they are off CUDA: `key` ends with the device); unload(buffers).

    A graph and its buffers per stream: a merge's workers each compute on their own stream, so their loops run
    side by side on the device (each is thousands of kernels too small to fill it), and the stream's order alone
    keeps one replay's results from being overwritten by the next (the lock only orders the launches of threads
    sharing a stream). Nothing here waits for the device."""
    device = key[-1]
    graphed = None
    if usable(device):
        key = key[:-1] + (torch.cuda.current_stream(device).cuda_stream, device)
        with _LOCK:  # one capture at a time
            graphed = _GRAPHS.get(key) or _capture(key, make_buffers, body)
    if graphed is None:
        buffers = make_buffers()
        load(buffers)
        body(buffers)
        return unload(buffers)
    with graphed.lock:
        load(graphed.buffers)
        graphed.graph.replay()
        return unload(graphed.buffers)

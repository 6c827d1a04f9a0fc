"""The two sequential loops of the calibrated merge on the CPU (the rounding order, the rounding steps of a
block), compiled with TorchScript so that they run without Python between their ops.

Each loop is hundreds of tiny ops in a row (a full-size layer: 560 pivot steps, 561 rounding steps). From Python
every op holds the interpreter lock while it is dispatched, so two row chunks rounding on two threads took
longer than one after the other (measured: two 561-step loops of 9216 rows, 14 ms one after the other, 28 ms on
two threads); compiled, a loop releases the lock for its whole run (the same two on two threads: 8 ms). The
functions below are the loops themselves, in TorchScript's subset of Python: compiled once on first use, and
run as they are where TorchScript is not available (same ops, same bits; a test compares the two).
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Callable, List

import torch

log = logging.getLogger(__name__)


def pivot_order(a: torch.Tensor, big: float, tiny: float) -> torch.Tensor:
    """Minimum-pivot Cholesky order of the symmetric matrix `a` (overwritten): the pivots in the order taken.
    `big` / `tiny`: the largest and the smallest normal float of a's dtype."""
    alive = torch.arange(a.shape[0], device=a.device)  # original index of each row of `a`
    picks: List[torch.Tensor] = []
    while alive.numel() > 0:
        for _ in range(min(64, alive.numel())):  # then drop the rows taken, to shrink the updates
            # the pivot stays a tensor (index_select, not int()): no host round trip per step on a GPU
            pivot = torch.argmin(a.diagonal()).view(1)
            picks.append(alive.index_select(0, pivot))
            col = a.index_select(1, pivot).squeeze(1)
            col = col / col.index_select(0, pivot).clamp_min(tiny).sqrt()
            a.addr_(col, col, alpha=-1.0)
            a.diagonal().index_fill_(0, pivot, big)  # row and column are now zero: out of the argmin
        keep = a.diagonal() < big
        a = a[keep][:, keep]
        alive = alive[keep]
    return torch.cat(picks)


def round_block(work: torch.Tensor, errs: torch.Tensor, u_rel_t: torch.Tensor, order: List[int], i1: int, m: int,
                codes: torch.Tensor, scale: torch.Tensor, scale_div: torch.Tensor, zero: torch.Tensor,
                new_zeros: torch.Tensor, base_zeros: torch.Tensor, bias: torch.Tensor) -> None:
    """Round the variables i1 .. i1 + len(errs) - 1 of the rounding order (`order`: their canonical indices), each
    to its grid: the bias to bf16 (into `bias`), a tail weight (canonical 1..m) to a code 0..15 on its group's
    grid (`codes`, `scale`, `scale_div`: the scale to divide by, `zero`), a zero shift to bf16 (`new_zeros`, from
    `base_zeros`). errs[i - i1] gets the raw error t - value; before a variable is rounded, the errors of the
    block's earlier ones are taken in (u_rel_t: the update rows over their diagonal, transposed)."""
    for n in range(errs.shape[0]):
        i = i1 + n
        t = work[i]
        r = errs[n]
        if n > 0:
            t.addmv_(errs[:n].t(), u_rel_t[i, i1:i], alpha=-1.0)
        c = order[i]
        if 0 < c <= m:
            j = c - 1
            q = codes[j]
            torch.sub(t, zero[j], out=r)
            torch.div(r, scale_div[j], out=q).round_().clamp_(0, 15)
            r.addcmul_(q, scale[j], value=-1.0)
        elif c == 0:
            torch.sub(t, t.to(torch.bfloat16).to(torch.float32), out=r)
            torch.sub(t, r, out=bias)
        else:
            k = c - m - 1
            zn = new_zeros[k]
            z0 = base_zeros[k]
            torch.add(t, z0, out=zn)
            zn.copy_(zn.to(torch.bfloat16))
            torch.sub(zn, z0, out=r)
            torch.sub(t, r, out=r)


_COMPILED: dict[str, Callable] = {}
_LOCK = threading.Lock()
ENABLED = True  # tests switch it off to compare the compiled loops with the same functions run from Python


def compiled(fn: Callable) -> Callable:
    """`fn` compiled with TorchScript (once per process), or `fn` itself where that is not possible."""
    if not ENABLED:
        return fn
    with _LOCK:
        if fn.__name__ not in _COMPILED:
            try:
                with warnings.catch_warnings():  # TorchScript is deprecated, not removed: no warning for users
                    warnings.simplefilter("ignore")
                    _COMPILED[fn.__name__] = torch.jit.script(fn)
            except Exception as e:  # noqa: BLE001 - any failure: the same loop from Python
                log.debug("TorchScript unavailable for %s (%s): the loop runs from Python", fn.__name__, e)
                _COMPILED[fn.__name__] = fn
        return _COMPILED[fn.__name__]

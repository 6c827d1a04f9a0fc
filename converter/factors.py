"""Low-rank factor maths shared by the adapters (which produce factors), the layer kinds (which store them)
and `verify` (which measures them): ΔW = up·down, never formed as an O×I matrix where it can be avoided."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROBES = 16  # input directions for the merge-time estimate of a low-rank layer's error


@dataclass
class Factors:
    down: torch.Tensor  # (r, I) fp32, scale folded in
    up: torch.Tensor  # (O, r) fp32, rows placed on the layer's output rows

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def dense(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.up.to(device) @ self.down.to(device)


_PROBE_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def probes(n: int, k: int) -> torch.Tensor:
    """Fixed Gaussian directions (the same for every layer of a width: made once)."""
    if (n, k) not in _PROBE_CACHE:
        _PROBE_CACHE[(n, k)] = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return _PROBE_CACHE[(n, k)]


def probe_rows(out_rows: int) -> slice:
    return slice(None, None, max(1, out_rows // 1024))  # rounding noise is alike in every row


def relative(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(||got − want|| / ||want||, ||want||)."""
    ref = float(want.norm())
    return (float((got - want).norm()) / ref if ref else 0.0), ref


def lowrank_error(u_app: torch.Tensor, d_app: torch.Tensor, f: Factors, n_probes: int = 0) -> tuple[float, float]:
    """(||U_app·D_app − ΔW|| / ||ΔW||, ||ΔW||) with ΔW = f.up·f.down, through r×r Gram matrices only.

    With `n_probes` > 0 both norms are instead estimated on that many fixed Gaussian input directions
    (E·Ω; the error is full-rank rounding noise, so a few probes give it to a few percent) at a tiny cost:
    the merge reports this estimate, `verify` computes the exact figure.

    u_app/d_app are what the file stores for the LoRA part (columns/rows after the base rank, padding
    included). When they have the LoRA's own shape the error is split as ΔU·D_app + U·ΔD, so nothing
    cancels and fp32 suffices; otherwise (truncated or foreign) the general stacked form runs in fp64."""
    if n_probes:
        omega = probes(f.down.shape[1], n_probes)
        rows = probe_rows(f.up.shape[0])
        err, ref = relative(u_app[rows].float() @ (d_app.float() @ omega), f.up[rows] @ (f.down @ omega))
        return err, ref / n_probes ** 0.5
    r = f.down.shape[0]
    gu = f.up.T @ f.up
    ref = max(float((gu * (f.down @ f.down.T)).sum()), 0.0) ** 0.5
    if ref == 0:
        return 0.0, 0.0
    if u_app.shape[1] >= r and not u_app[:, r:].any() and not d_app[r:].any():
        du, dd, da = u_app[:, :r] - f.up, d_app[:r] - f.down, d_app[:r]
        err2 = float(((du.T @ du) * (da @ da.T)).sum() + (gu * (dd @ dd.T)).sum()
                     + 2 * ((du.T @ f.up) * (da @ dd.T)).sum())
    else:
        left = torch.cat([u_app, -f.up], 1).double()
        right = torch.cat([d_app, f.down], 0).double()
        err2 = float(((left.T @ left) * (right @ right.T)).sum())
    return max(err2, 0.0) ** 0.5 / ref, ref


def truncate(f: Factors, k: int) -> tuple[Factors, float]:
    """Best rank-k approximation of up·down (truncated SVD through two thin QRs); returns it and the
    relative Frobenius error of what was dropped."""
    qu, ru = torch.linalg.qr(f.up.double())
    qd, rd = torch.linalg.qr(f.down.double().T)
    p, sv, vh = torch.linalg.svd(ru @ rd.T)
    total = float((sv ** 2).sum())
    dropped = float((sv[k:] ** 2).sum())
    root = sv[:k].sqrt()
    up = (qu @ p[:, :k]) * root
    down = (root[:, None] * vh[:k]) @ qd.T
    return Factors(down.float(), up.float()), (dropped / total) ** 0.5 if total > 0 else 0.0


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Refuse inf/nan before anything is written (one clear line, not a corrupt layer)."""
    from .errors import MergeError

    # a sum is finite when every element is (barring overflow of the sum itself, then look element-wise)
    if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise MergeError(f"merging produced non-finite values in {name} (a LoRA tensor holds inf/nan, or the "
                         "strength is too large for the checkpoint dtype)")
    return t


def dense_record(w_old: torch.Tensor, w_new: torch.Tensor, dw: torch.Tensor) -> dict:
    """How a stored change w_new − w_old carries ΔW: relative error, next to the floor that storing W+ΔW in
    its dtype imposes, and the applied fraction <got, ΔW>/<ΔW, ΔW>. Used by merge, verify and the tests."""
    got = w_new.double() - w_old.double()
    dw = dw.double()
    ref2 = float((dw * dw).sum())
    if ref2 == 0:
        return {"rel_error": float(got.norm()), "rounding_floor": 0.0, "applied_fraction": 1.0, "delta_norm": 0.0}
    ideal = w_old.double() + dw
    floor = float((ideal.to(w_old.dtype).double() - ideal).norm()) / ref2 ** 0.5
    return {"rel_error": float((got - dw).norm()) / ref2 ** 0.5, "rounding_floor": floor,
            "applied_fraction": float((got * dw).sum()) / ref2, "delta_norm": ref2 ** 0.5}


def svd_truncate(dw: torch.Tensor, k: int, exact_below: int = 1024) -> tuple[Factors, float]:
    """The best rank-k approximation of a dense ΔW (O, I) as factors (scale in `down`), and the captured
    fraction ‖ΔW_k‖ / ‖ΔW‖ (= sqrt of the energy kept). An exact SVD for small matrices; above `exact_below`
    on the smaller side, a randomized range finder with power iterations (Halko et al.), whose ΔW_k is the
    orthogonal projection of ΔW on a k-dimensional subspace, so the captured fraction is still exact for
    what is stored (only its optimality is approximate, to well under 1e-3 on LoRA-like spectra)."""
    dw = dw.float()
    total = float(torch.dot(dw.reshape(-1), dw.reshape(-1)))
    if total == 0 or k == 0:
        return Factors(dw.new_zeros(k, dw.shape[1]), dw.new_zeros(dw.shape[0], k)), 0.0 if total else 1.0
    if min(dw.shape) <= exact_below:
        u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    else:
        u, s, vh = _randomized_svd(dw, k)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    root = s.sqrt()
    kept = float((s.double() ** 2).sum())
    return Factors((root[:, None] * vh).float(), (u * root).float()), min(1.0, kept / total) ** 0.5


def _randomized_svd(a: torch.Tensor, k: int, oversample: int = 32, power: int = 4):
    """Range finder with `power` subspace iterations, then the SVD of the small projection. The O x I products
    are fp32 (they are the whole cost: 2 + 2·power passes over ΔW); orthonormalization and the small SVD are
    fp64 on (O or I) x (k + p) matrices. Fewer iterations would be cheaper but capture less on flat spectra
    (a 12288 x 3072 Gaussian: 0.185 of the energy with one, 0.202 with four), so the figures stay as they were."""
    g = torch.Generator(device=a.device).manual_seed(0)
    omega = torch.randn(a.shape[1], k + oversample, generator=g, device=a.device)
    q = _orthonormal(a @ omega)
    for _ in range(power):  # subspace iteration, re-orthonormalized each half step
        q = _orthonormal((q.float().T @ a).T)  # qᵀ·a, not aᵀ·q: no transposed pass over a
        q = _orthonormal(a @ q.float())
    proj = (q.float().T @ a).double()  # (k + p, I)
    proj_q, proj_r = torch.linalg.qr(proj.T)  # proj = rᵀqᵀ: the SVD of the small square rᵀ gives proj's
    ub, s, vh = torch.linalg.svd(proj_r.T)
    return q @ ub, s, vh @ proj_q.T


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (fp64) of the columns of a tall y: Cholesky QR, twice (a Gram and a triangular
    solve instead of a Householder QR of the tall matrix). It is exact to fp64 while y's condition number
    stays below ~1e7; a y that is (nearly) rank-deficient falls back to Householder."""
    basis = y.double()
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(basis.T @ basis)
        pivots = chol.diagonal()
        if bool(info) or float(pivots.min()) <= 1e-7 * float(pivots.max()):
            return torch.linalg.qr(y.double())[0]
        basis = torch.linalg.solve_triangular(chol, basis.T, upper=False).T
    return basis


def dense_error(up: torch.Tensor, down: torch.Tensor, dw: torch.Tensor) -> float:
    """‖up·down − ΔW‖ / ‖ΔW‖ without forming up·down: ‖ΔW‖² − 2⟨up·down, ΔW⟩ + ‖up·down‖². The one pass over
    ΔW (O x I) is an fp32 product (uᵀ·ΔW, k x I) and an fp32 sum of squares; the k x I sums that follow are fp64
    (a relative error of ~1e-7 on ‖ΔW‖²: it floors the figure near 3e-4, far below a truncation's error)."""
    w = dw.float()
    u = up.to(w.device, torch.float32)
    ref2 = float(torch.linalg.vector_norm(w)) ** 2
    if ref2 == 0:
        return 0.0
    d = down.to(w.device).double()
    cross = float(((u.T @ w).double() * d).sum())
    own = float(((u.double().T @ u.double()) * (d @ d.T)).sum())
    return max(ref2 - 2 * cross + own, 0.0) ** 0.5 / ref2 ** 0.5

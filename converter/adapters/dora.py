"""DoRA: a weight update (LoRA, LoKr or LoHa) whose merged weight is re-normalised,
W' = m ⊙ V / ‖V‖ with V = W + ΔV, the norm per output row (PEFT's `lora_magnitude_vector` (O,), LyCORIS's
`dora_scale` (O, 1), the default since 2025) or per input column (LyCORIS `dora_scale` (1, I), older files).

Strength, as each trainer defines it (they differ): LyCORIS (`dora_scale`) interpolates the magnitude ratio,
W'' = V·(k·(m/(‖V‖+eps) − 1) + 1) with ΔV at its own scale; PEFT (`lora_magnitude_vector`) scales ΔV inside
V and the norm, no eps. Either way the update ΔW = W'' − W needs the base weight and is not low-rank (it
rescales W), so dense layers take it exactly and 4-bit layers by truncated SVD."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ADAPTER_NAME, Adapter, KeyPattern

if TYPE_CHECKING:
    import torch

LYCORIS_EPS = 2.0 ** -23  # LyCORIS adds finfo(dtype).eps of its fp32 dora_scale


class Dora(Adapter, name="dora"):
    title = "DoRA"
    key_patterns = (KeyPattern(r"dora_scale", "dora_scale", "dora"),
                    KeyPattern(r"lora_magnitude_vector" + ADAPTER_NAME + r"(?:\.weight)?", "magnitude_vector", "dora"))
    signature = parts = frozenset({"dora_scale", "magnitude_vector"})
    order = 200  # after the weight update it wraps
    needs_base = True
    wraps = True
    linear = False  # W' renormalises W + ΔV: two copies are not one at the summed strength
    inner: Adapter

    def wrap(self, inner: Adapter) -> None:
        self.inner = inner
        self.peft = "magnitude_vector" in self.keys
        inner.strength = self.strength if self.peft else 1.0  # PEFT scales ΔV itself; LyCORIS keeps it whole
        self.title = f"DoRA ({inner.title})"

    def validate(self) -> None:
        out, inp = self.shape
        m = tuple(self.part_shape(self._part))
        allowed = ((out,),) if self.peft else ((out, 1), (1, inp))
        if m not in allowed:
            raise self.fail(f"has a DoRA magnitude of shape {m}; a {out}x{inp} layer needs "
                            f"{' or '.join(str(a) for a in allowed)}")

    @property
    def _part(self) -> str:
        return "magnitude_vector" if self.peft else "dora_scale"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.inner.shape)

    @property
    def per_row(self) -> bool:
        """Norm per output row (PEFT; LyCORIS wd_on_out), else per input column (only LyCORIS (1, I))."""
        return self.peft or tuple(self.part_shape("dora_scale"))[0] != 1 or self.shape[0] == 1

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = V·s - W = ΔV·s + W·(s - 1), s the per-row (or per-column) rescaling: written that way, nothing
        cancels, so fp32 over the O x I matrices is as good as fp64 was (the norms and s are small vectors)."""
        import torch

        if base is None:
            raise RuntimeError("DoRA needs the base weight")  # the layer kinds pass it (needs_base)
        w0 = base.float()
        # a low-rank inner update is multiplied out where the base lives (the GPU, when the merge runs there)
        delta_v = self.inner.factors().dense(w0.device) if self.inner.rank is not None else \
            self.inner.delta().to(w0.device, torch.float32)
        norm = _norms(w0, delta_v, self.per_row).double()
        m = self.tensor(self._part).to(w0.device, torch.float64).reshape(norm.shape)
        if self.peft:
            scale = m / norm
        else:
            scale = self.strength * (m / (norm + LYCORIS_EPS) - 1) + 1
        # in place on ΔV (the same ops as delta_v * scale + w0 * (scale - 1)): one O x I array fewer at the peak
        return delta_v.mul_(scale.float()).addcmul_(w0, (scale - 1).float())


def _norms(w0: torch.Tensor, delta_v: torch.Tensor, per_row: bool, rows: int = 1024) -> torch.Tensor:
    """‖w0 + ΔV‖ per row (O, 1), or per column (1, I). Per row in blocks of rows: each row's norm is the same
    reduction, without a whole O x I sum alive at once."""
    import torch

    if not per_row:
        return torch.linalg.vector_norm(w0 + delta_v, dim=0, keepdim=True)
    return torch.cat([torch.linalg.vector_norm(w0[r:r + rows] + delta_v[r:r + rows], dim=1, keepdim=True)
                      for r in range(0, w0.shape[0], rows)])

"""Timestep-calibrated requantization of Qwen-Image's AWQ W4A16 modulation layers.

`img_mod.1` / `txt_mod.1` (3072 -> 18432, 4-bit codes, groups of 64, bf16 scales / zeros / bias) have no
low-rank branch, so a LoRA can only enter them by requantization. A LoRA delta is 1-3 % of the weight, about
a twentieth of a quantization step per element, so plain requantization either changes nothing or adds more
noise than the delta. What makes it workable is that these layers only ever see x(sigma) = SiLU(temb(sigma)),
a function of the timestep alone, which the checkpoint lets us compute exactly (`modulation_inputs`). We only
need the layer to be right on that curve.

Figure of merit (`e_mod`), per layer, on held-out sigmas:
    ||Y_new - Y_ideal|| / ||Y_ideal - Y_base||,   Y = W x + b,   W_ideal = dequant(base) + dW, b_ideal = b + db
(skipping the LoRA scores exactly 1.0).

Method ("calibrated"): error-compensating sequential rounding (GPTQ / Babai nearest plane) in the metric of
the calibration inputs, arranged for this problem:
  * variables: the bias (bf16), the 4-bit codes, and one zero-point shift per group (a bf16 value whose
    feature is the group sum of x). The objective is the uncentered output error over calibration sigmas, so
    the constant part of the delta may go to the bias, and the bias' bf16 rounding (coarse: one ulp of a
    modulation bias near 1 is larger than the LoRA's whole effect) is compensated by the codes;
  * only the `tail` code columns with the smallest input variance are re-rounded; every other code keeps its
    base value, and the continuous optimum of the free variables given those fixed errors (-dW on the kept
    columns) is the starting target;
  * the error of sequential rounding is each variable's rounding error weighted by its variance conditional
    on the variables rounded after it, so the order is chosen per layer from the end: a minimum-pivot
    Cholesky of the damped Gram, scaled by each variable's grid step (`ModulationCalibration.rounding_plan`).
    This ordering alone halves the error when x(sigma) has a strong constant part;
  * the bias is rounded first and finally re-fitted (nearest bf16 to its calibration optimum);
  * per row, the new codes are kept only where they beat the bias fold on the calibration objective (exact,
    from the Gram of the free variables: no extra pass over the layer).
Everything that depends only on the calibration inputs (which columns are free, their Gram, the compensation
operator) lives in a `ModulationCalibration`, built once and shared by all 120 layers.

Per layer the result that is written is the best of {calibrated, bias fold, skip} on the held-out sigmas, so
no layer is ever written worse than the base (`ModulationResult.action` says which).

All arrays are in UNPACKED space: codes (O, I) uint8 0..15; scales / zeros (O, I/64) with
W[n, k] = codes[n, k] * scales[n, k // 64] + zeros[n, k // 64]; bias (O,). Row order is whatever the caller
uses (Nunchaku's interleaved order); nothing here depends on it.
"""

from .calibration import DEFAULT_DAMP, DEFAULT_TAIL, ModulationCalibration
from .inputs import (DEFAULT_CALIB_POINTS, DEFAULT_EVAL_POINTS, calibration_sigmas, evaluation_sigmas,
                     modulation_inputs, timestep_sinusoid)
from .merge import MODES, ModulationResult, e_mod, merge_modulation

__all__ = [
    "DEFAULT_CALIB_POINTS",
    "DEFAULT_DAMP",
    "DEFAULT_EVAL_POINTS",
    "DEFAULT_TAIL",
    "MODES",
    "ModulationCalibration",
    "ModulationResult",
    "calibration_sigmas",
    "e_mod",
    "evaluation_sigmas",
    "merge_modulation",
    "modulation_inputs",
    "timestep_sinusoid",
]

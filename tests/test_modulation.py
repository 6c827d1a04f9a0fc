"""Calibrated requantization of the AWQ modulation layers (converter/modulation.py)."""

from __future__ import annotations

import math

import pytest
import torch

from converter.modulation import (
    ModulationCalibration,
    calibration_sigmas,
    e_mod,
    evaluation_sigmas,
    merge_modulation,
    modulation_inputs,
    timestep_sinusoid,
)

G = 64


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _mlp(dim: int, seed: int = 0, const: bool = True) -> tuple[torch.Tensor, ...]:
    """Random timestep MLP (weights N(0, 1/fan_in)); `const` gives SiLU(temb) a strong constant part."""
    g = torch.Generator().manual_seed(seed)
    l1w = torch.randn(dim, 256, generator=g) / 16
    l1b = torch.randn(dim, generator=g) * 0.02
    l2w = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    l2b = torch.randn(dim, generator=g) * (1.0 if const else 0.02)
    return tuple(t.to(torch.bfloat16) for t in (l1w, l1b, l2w, l2b))


def _layer(dim: int, rank: int, rel: float, seed: int):
    """Symmetric zero-7 AWQ base layer (6*dim, dim) like deepcompressor's, and a LoRA (up, down)."""
    g = torch.Generator().manual_seed(seed)
    o, i = 6 * dim, dim
    w = _bf16(torch.randn(o, i, generator=g) * 0.02)
    wg = w.view(o, i // G, G)
    scales = _bf16(wg.abs().amax(-1) / 7)
    zeros = _bf16(-7 * scales)
    codes = (wg / scales[..., None]).round().add(7).clamp(0, 15).to(torch.uint8).view(o, i)
    bias = torch.randn(o, generator=g) * 0.05
    bias[1::6] += 1.0
    bias[4::6] += 1.0
    down = torch.randn(rank, i, generator=g) / math.sqrt(i)
    up = torch.randn(o, rank, generator=g)
    up *= rel * float(torch.linalg.matrix_norm(w)) / float(torch.linalg.matrix_norm(up @ down))
    return codes, scales, zeros, _bf16(bias), (up, down)


def _dequant(codes, scales, zeros):
    o, i = codes.shape
    return (codes.double().view(o, i // G, G) * scales.double()[..., None] + zeros.double()[..., None]).view(o, i)


def _brute_force_e(codes_new, scales_new, zeros_new, bias_new, codes, scales, zeros, bias, dw, db, x_eval) -> float:
    """Reference figure: one sigma at a time, float64, dense weights."""
    w_base = _dequant(codes, scales, zeros)
    w_all = torch.stack([_dequant(codes_new, scales_new, zeros_new), w_base + dw.double(), w_base])
    b_all = torch.stack([bias_new.double(), bias.double() + db.double(), bias.double()])
    num = den = 0.0
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matvecs: threads only add overhead
    try:
        for x in x_eval.double():
            y_new, y_ideal, y_base = torch.mv(w_all.view(-1, x.numel()), x).view(3, -1) + b_all
            num += float(((y_new - y_ideal) ** 2).sum())
            den += float(((y_ideal - y_base) ** 2).sum())
    finally:
        torch.set_num_threads(old_threads)
    return math.sqrt(num / den)


@pytest.fixture(scope="module")
def small():
    """D=256 (256 -> 1536), timestep MLP with a strong constant part."""
    mlp = _mlp(256)
    xc = modulation_inputs(*mlp, calibration_sigmas(513))
    xe = modulation_inputs(*mlp, evaluation_sigmas(200, 513))
    return mlp, xc, xe, ModulationCalibration.build(xc)


@pytest.fixture(scope="module")
def tiny():
    """D=128 (128 -> 768): for the brute-force references."""
    mlp = _mlp(128, seed=1)
    xc = modulation_inputs(*mlp, calibration_sigmas(513))
    xe = modulation_inputs(*mlp, evaluation_sigmas(200, 513))
    return xc, xe, ModulationCalibration.build(xc)


# ---------------------------------------------------------------------------------------------- inputs


def test_sinusoid_matches_straightforward_reference():
    sig = torch.tensor([0.0, 1e-3, 0.0371, 0.25, 0.5, 0.9137, 1.0])
    got = timestep_sinusoid(sig)
    assert got.shape == (7, 256) and got.dtype == torch.float32
    ref = torch.empty(7, 256, dtype=torch.float64)
    for r, s in enumerate(sig.tolist()):
        for k in range(128):
            arg = 1000.0 * s * math.exp(-math.log(10000.0) * k / 128)
            ref[r, k] = math.cos(arg)  # flip_sin_to_cos: cos first
            ref[r, 128 + k] = math.sin(arg)
    # fp32 arguments up to 1000 rad: the reference differs by a few fp32 ulps of the argument
    assert torch.allclose(got.double(), ref, atol=3e-4, rtol=0)
    assert torch.equal(got[0, :128], torch.ones(128)) and torch.equal(got[0, 128:], torch.zeros(128))
    # the product is taken in fp32 whatever the sigma dtype
    assert torch.equal(timestep_sinusoid(sig.to(torch.bfloat16)), timestep_sinusoid(_bf16(sig)))
    assert timestep_sinusoid(sig, dim=7).shape == (7, 7)  # odd dims are zero-padded like diffusers
    assert torch.equal(timestep_sinusoid(sig, dim=7)[:, -1], torch.zeros(7))


def test_modulation_inputs_reference_and_variants():
    mlp = _mlp(128, seed=3, const=False)
    l1w, l1b, l2w, l2b = mlp
    sig = torch.tensor([0.0, 0.3, 1.0])
    x = modulation_inputs(*mlp, sig)
    assert x.shape == (3, 128) and x.dtype == torch.float32
    for r, s in enumerate(sig):
        proj = timestep_sinusoid(s[None])[0].to(torch.bfloat16).double()  # diffusers casts to the model dtype
        h = torch.nn.functional.silu(l1w.double() @ proj + l1b.double())
        temb = l2w.double() @ h + l2b.double()
        assert torch.allclose(x[r].double(), torch.nn.functional.silu(temb), atol=1e-5)
    add = torch.randn(2, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    xa = modulation_inputs(*mlp, sig, addition_t_embedding=add)
    assert xa.shape == (6, 128)
    x0 = modulation_inputs(*mlp, sig, addition_t_embedding=torch.zeros(2, 128))
    assert torch.allclose(x0[:3], x) and torch.allclose(x0[3:], x)
    assert not torch.allclose(xa[:3], xa[3:])


def test_sigma_grids_disjoint_and_covering():
    for nc in (257, 513, 1025, 2049):
        cal = calibration_sigmas(nc)
        assert float(cal[0]) == 0.0 and float(cal[-1]) == 1.0 and cal.numel() == nc
        for ne in (200, 256, 257, 500, 1000):
            ev = evaluation_sigmas(ne, nc)
            assert ev.numel() == ne and torch.equal(ev, evaluation_sigmas(ne, cal))
            assert float(ev.min()) < 1.0 / ne and float(ev.max()) > 1.0 - 1.0 / ne
            assert float(ev.min()) > 0.0 and float(ev.max()) < 1.0
            assert bool((ev[1:] >= ev[:-1]).all())
            gap = (ev.double()[:, None] - cal.double()[None, :]).abs().min()
            assert float(gap) > 0.24 / (nc - 1), (nc, ne)  # at least a quarter calibration step away
    with pytest.raises(ValueError):
        evaluation_sigmas(199)


# ---------------------------------------------------------------------------------------------- figures


def test_e_mod_helper():
    s = torch.randn(5, 7)
    assert e_mod(-s, s) == pytest.approx(1.0, abs=1e-12)
    assert e_mod(0.5 * s, s) == pytest.approx(0.5, rel=1e-6)
    assert e_mod(torch.zeros(3), torch.zeros(3)) == 0.0


@pytest.mark.parametrize("mode", ["calibrated", "biasfold", "requant"])
def test_figures_match_brute_force(tiny, mode):
    """The structured figures equal a per-sigma, float64, dense evaluation of the returned tensors."""
    xc, xe, cal = tiny
    codes, scales, zeros, bias, (up, down) = _layer(128, 16, 0.03, seed=5)
    db = _bf16(torch.randn(bias.shape[0], generator=torch.Generator().manual_seed(9)) * 1e-3)
    dw = up @ down
    res = merge_modulation(codes, scales, zeros, bias, (up, down), db, cal, xe, mode=mode, requant_figure=True)
    assert res.action in (mode, "biasfold", "skip")
    if mode != "requant":
        assert res.action == mode
    ref = _brute_force_e(res.codes, res.scales, res.zeros, res.bias, codes, scales, zeros, bias, dw, db, xe)
    assert res.e_mod == pytest.approx(ref, rel=1e-4)
    if res.action == mode:
        assert res.e_asked == pytest.approx(ref, rel=1e-4)
    if mode == "calibrated":  # the bias fold, rebuilt independently: calibration mean of dY into the bf16 bias
        b_fold = _bf16(bias + db + (dw.double() @ xc.double().mean(0)).float())
        ref_fold = _brute_force_e(codes, scales, zeros, b_fold, codes, scales, zeros, bias, dw, db, xe)
        assert res.e_biasfold == pytest.approx(ref_fold, rel=1e-3)
        dy = (dw.double() @ xe.double().T) + db.double()[:, None]
        ideal = float((dy - dy.mean(1, keepdim=True)).norm() / dy.norm())
        assert res.e_biasfold_ideal == pytest.approx(ideal, rel=1e-4)
    assert res.e_skip == 1.0


def test_skip_mode(tiny):
    _, xe, cal = tiny
    codes, scales, zeros, bias, lora = _layer(128, 16, 0.03, seed=5)
    res = merge_modulation(codes, scales, zeros, bias, lora, None, cal, xe, mode="skip")
    assert res.action == "skip" and res.e_mod == 1.0 and res.e_asked == 1.0
    assert torch.equal(res.codes, codes) and torch.equal(res.zeros, zeros) and torch.equal(res.bias, bias)


def test_plain_figure_brute_force(tiny):
    _, xe, cal = tiny
    codes, scales, zeros, bias, (up, down) = _layer(128, 32, 0.02, seed=6)
    dw = up @ down
    w = _dequant(codes, scales, zeros).float() + dw
    wg = w.view(w.shape[0], -1, G)
    lo, hi = wg.amin(-1), wg.amax(-1)
    sp, zp = _bf16((hi - lo) / 15), _bf16(lo)
    q = ((wg - zp[..., None]) / sp[..., None]).round().clamp(0, 15).to(torch.uint8).view_as(codes)
    ref = _brute_force_e(q, sp, zp, bias, codes, scales, zeros, bias, dw, torch.zeros_like(bias), xe)
    res = merge_modulation(codes, scales, zeros, bias, dw, None, cal, xe, mode="requant")
    assert res.e_requant == pytest.approx(ref, rel=1e-4)
    # fresh-grid RTN is worse than skipping: never written; the bias fold, which beats the base, is
    assert res.e_requant > 1.0 and res.action == "biasfold" and res.e_mod == res.e_biasfold < 1.0
    assert torch.equal(res.codes, codes) and torch.equal(res.zeros, zeros) and not torch.equal(res.bias, bias)


# ---------------------------------------------------------------------------------------------- quality


def test_calibrated_beats_plain_and_biasfold(small):
    """Fixed small case: fails if the calibrated path is disabled (it would score >= bias fold)."""
    _, _, xe, cal = small
    ours, folds, plains = [], [], []
    for k in range(3):
        codes, scales, zeros, bias, lora = _layer(256, 32, 0.03, seed=7 + k)
        res = merge_modulation(codes, scales, zeros, bias, lora, None, cal, xe, requant_figure=True)
        assert res.action == "calibrated" and res.codes_changed > 0.01
        assert res.e_mod == res.e_asked <= 1.0
        ours.append(res.e_asked)
        folds.append(res.e_biasfold_ideal)
        plains.append(res.e_requant)
        assert res.e_asked < 0.25 * res.e_requant  # plain requantization is far worse
        assert res.e_asked < res.e_biasfold  # the bias fold as it can be written (bf16 bias)
    ratio = sorted(o / f for o, f in zip(ours, folds))[1]
    assert ratio <= 0.9, (ours, folds)


@pytest.mark.parametrize("faint_rows", [False, True])
def test_rows_where_the_bias_fold_is_better_keep_their_codes(small, faint_rows):
    """Rows whose LoRA effect is faint score better with the bias fold: they keep their base codes and zeros and
    take the fold's bias, as many as the note says; the others take the rounding (when no row is faint, every row
    does). The figure is the brute-force one, the changed-code fraction is exact, and packed codes give the same
    layer."""
    from converter.codecs.awq_w4a16 import AwqQWeight
    from converter.modulation import merge as M

    _, _, xe, cal = small
    codes, scales, zeros, bias, (up, down) = _layer(256, 32, 0.03, seed=21)
    if faint_rows:
        up = up.clone()
        up[::3] *= 0.1  # faint enough that the fold wins on many rows, strong enough that their codes would move
    res = merge_modulation(codes, scales, zeros, bias, (up, down), None, cal, xe)
    assert res.action == "calibrated"
    assert res.codes_changed == int((res.codes != codes).sum()) / codes.numel() > 0
    ref = _brute_force_e(res.codes, res.scales, res.zeros, res.bias, codes, scales, zeros, bias, up @ down,
                         torch.zeros_like(bias), xe)
    assert res.e_mod == pytest.approx(ref, rel=1e-4)
    p = M.layer_problem(codes, scales, zeros, bias, (up, down), None, cal, xe, mode="calibrated", group_size=G,
                        dev=torch.device("cpu"), tail=None, damp=3e-3)
    fold_bias = M.biasfold(p).bias
    as_base = (res.codes == codes).all(1) & (res.zeros == zeros).all(1) & (res.bias == fold_bias)
    kept = [int(n.split()[0]) for n in res.notes if "rows kept their codes" in n]
    if faint_rows:
        assert kept and kept[0] >= codes.shape[0] // 6 and int(as_base.sum()) >= kept[0]
        assert float(as_base[::3].float().mean()) > 0.5 and float(as_base[1::3].float().mean()) < 0.1
    else:
        assert not kept and float(as_base.float().mean()) < 0.1
    packed = merge_modulation(AwqQWeight.pack(codes), scales, zeros, bias, (up, down), None, cal, xe)
    assert torch.equal(AwqQWeight.unpack(packed.qweight), res.codes) and torch.equal(packed.zeros, res.zeros)
    assert torch.equal(packed.bias, res.bias) and packed.e_mod == res.e_mod
    assert packed.codes_changed == res.codes_changed


def test_calibration_object_and_dense_delta_give_same_result(small):
    _, xc, xe, cal = small
    codes, scales, zeros, bias, (up, down) = _layer(256, 16, 0.03, seed=11)
    a = merge_modulation(codes, scales, zeros, bias, (up, down), None, cal, xe)
    b = merge_modulation(codes, scales, zeros, bias, (up, down), None, xc, xe)  # builds its own calibration
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros) and torch.equal(a.bias, b.bias)
    c = merge_modulation(codes, scales, zeros, bias, up @ down, None, cal, xe)  # dense dW: same maths
    assert c.e_asked == pytest.approx(a.e_asked, abs=2e-3)
    assert float((c.codes != a.codes).float().mean()) < 1e-3
    d = merge_modulation(codes, scales, zeros, bias, (up, down), None, cal, xe)  # deterministic
    assert torch.equal(a.codes, d.codes) and torch.equal(a.bias, d.bias) and a.e_asked == d.e_asked


def test_weighted_calibration_and_rounding_plan(small):
    """Per-sigma weights (e.g. sigma = 0 weighted up for zero_cond_t edit models) and the rounding order."""
    _, xc, xe, _ = small
    w = torch.ones(xc.shape[0])
    w[0] = float(xc.shape[0])  # sigma = 0 (reference tokens) as heavy as the whole curve
    cal = ModulationCalibration.build(xc, weights=w)
    nvar = 1 + cal.tail.numel() + cal.n_groups
    perm, u = cal.rounding_plan(torch.ones(nvar))
    assert perm[0] == 0 and sorted(perm.tolist()) == list(range(nvar))
    assert u.shape == (nvar, nvar) and torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    hp = cal.gram_damped[perm][:, perm]  # U is the upper Cholesky factor of its inverse
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    assert float((u.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    codes, scales, zeros, bias, lora = _layer(256, 32, 0.03, seed=15)
    res = merge_modulation(codes, scales, zeros, bias, lora, None, cal, xe)
    assert res.action == "calibrated" and res.e_asked < res.e_biasfold


def test_outputs_are_storable(small):
    _, _, xe, cal = small
    codes, scales, zeros, bias, lora = _layer(256, 64, 0.03, seed=12)
    for mode in ("calibrated", "biasfold", "skip"):
        res = merge_modulation(codes, scales, zeros, bias, lora, None, cal, xe, mode=mode)
        assert res.codes.dtype == torch.uint8 and res.codes.shape == codes.shape and int(res.codes.max()) <= 15
        for t, ref in ((res.scales, scales), (res.zeros, zeros), (res.bias, bias)):
            assert t.dtype == torch.float32 and t.shape == ref.shape
            assert torch.equal(_bf16(t), t) and bool(torch.isfinite(t).all())
        assert torch.equal(res.scales, scales)  # scales are kept
    assert res.action == "skip" and torch.equal(res.codes, codes) and torch.equal(res.zeros, zeros)


def test_falls_back_to_skip_when_every_option_is_worse():
    """Calibration inputs that do not describe the inputs at run time: every fitted option loses to skip."""
    g = torch.Generator().manual_seed(21)
    dim = 128
    xc = torch.rand(300, dim, generator=g) + 1.0  # calibrated for x around +1.5 ...
    xe = -torch.rand(200, dim, generator=g) - 1.0  # ... used around -1.5
    codes, scales, zeros, bias, lora = _layer(dim, 16, 0.03, seed=22)
    res = merge_modulation(codes, scales, zeros, bias, lora, None, xc, xe)
    assert res.e_asked > 1.0 and res.e_biasfold > 1.0
    assert res.action == "skip" and res.e_mod == 1.0 and res.notes
    assert torch.equal(res.codes, codes) and torch.equal(res.zeros, zeros) and torch.equal(res.bias, bias)
    assert res.codes_changed == 0.0 and res.bias_changed == 0.0


def test_rejects_bad_inputs(small):
    _, _, xe, cal = small
    codes, scales, zeros, bias, lora = _layer(256, 16, 0.02, seed=13)
    with pytest.raises(ValueError):
        merge_modulation(codes, scales + 1e-4, zeros, bias, lora, None, cal, xe)  # not bf16-exact
    with pytest.raises(ValueError):
        merge_modulation(codes, scales, zeros, bias, lora, None, cal, xe, mode="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        merge_modulation(codes[:, :128], scales[:, :2], zeros[:, :2], bias, lora, None, cal, xe)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(small):
    _, xc, xe, cal = small
    codes, scales, zeros, bias, lora = _layer(256, 32, 0.03, seed=14)
    a = merge_modulation(codes, scales, zeros, bias, lora, None, cal, xe)
    calg = ModulationCalibration.build(xc, device="cuda")
    b = merge_modulation(codes, scales, zeros, bias, lora, None, calg, xe, device="cuda")
    assert b.e_asked == pytest.approx(a.e_asked, abs=0.02)
    assert float((a.codes != b.codes).float().mean()) < 0.01


def test_graph_loops_compute_the_same_bits(small, monkeypatch):
    """The CUDA-graph forms of the two sequential loops (converter.modulation.graphs: every step the same kernels)
    give exactly what the loops launched elsewhere give; run here as they are, on the CPU. A layer with zero
    scales is included (its codes are divided by 1)."""
    from converter.modulation import graphs
    from converter.modulation import merge as M
    from converter.modulation.calibration import _pivot_order

    _, _, xe, cal = small
    nvar = 1 + cal.tail.numel() + cal.n_groups
    steps = torch.rand(nvar, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.1
    a = cal.gram_damped[1:, 1:] * steps[1:, None] * steps[None, 1:]
    want = _pivot_order(a.clone())
    assert torch.equal(graphs.pivot_order(a), want) and sorted(want.tolist()) == list(range(nvar - 1))

    launched = M.sequential_round
    compared = []

    def both(*args, **kw):
        got = launched(*args, **kw)
        static = graphs.sequential_round(*args, kw.get("block", 32), kw.get("s_div"))
        compared.append(all(torch.equal(x, y) for x, y in zip(got, static)) and kw.get("s_div") is not None)
        return got

    monkeypatch.setattr(M, "sequential_round", both)
    codes, scales, zeros, bias, lora = _layer(256, 32, 0.03, seed=16)
    scales[::7, 1] = 0.0  # zero scales: their codes are irrelevant
    res = merge_modulation(codes, scales, zeros, bias, lora, None, cal, xe)
    assert compared == [True] and res.action == "calibrated"


def test_compiled_loops_compute_the_same_bits(small, monkeypatch):
    """The CPU's two sequential loops run compiled (TorchScript, no interpreter lock between their ops): the same
    bits as the same functions run from Python, on a layer in two row chunks rounded on two threads at once."""
    from converter.modulation import loops
    from converter.modulation import merge as M

    if hasattr(torch.jit, "script"):  # where torch still has TorchScript, the loops are compiled
        assert isinstance(loops.compiled(loops.round_block), torch.jit.ScriptFunction)
        assert isinstance(loops.compiled(loops.pivot_order), torch.jit.ScriptFunction)
    _, _, xe, cal = small
    codes, scales, zeros, bias, lora = _layer(256, 32, 0.03, seed=18)
    monkeypatch.setattr(M, "_CHUNK_BYTES", 1 << 16)  # several row chunks
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(loops, "ENABLED", enabled)
        p = M.layer_problem(codes, scales, zeros, bias, lora, None, cal, xe, mode="calibrated", group_size=G,
                            dev=torch.device("cpu"), tail=None, damp=3e-3)
        runs.append(M.calibrated(p, M.biasfold(p), workers=2))
    got, want = runs
    assert torch.equal(got.written_codes, want.written_codes) and torch.equal(got.zeros, want.zeros)
    assert torch.equal(got.bias, want.bias) and got.e_mod == want.e_mod and got.codes_changed > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graphs_change_nothing(small, monkeypatch):
    """On a CUDA device the two loops replay captured graphs: the same bits as launching their kernels."""
    from converter.modulation import graphs

    _, xc, xe, _ = small
    calg = ModulationCalibration.build(xc, device="cuda")
    codes, scales, zeros, bias, lora = _layer(256, 32, 0.03, seed=17)
    runs = []
    for enabled in (True, True, False):  # the second replays the graphs the first captured
        monkeypatch.setattr(graphs, "ENABLED", enabled)
        runs.append(merge_modulation(codes, scales, zeros, bias, lora, None, calg, xe, device="cuda"))
    for res in runs[1:]:
        assert torch.equal(res.codes, runs[0].codes) and torch.equal(res.zeros, runs[0].zeros)
        assert torch.equal(res.bias, runs[0].bias) and res.e_mod == runs[0].e_mod

"""Every codec bit-exact against deepcompressor's packers (a third-party oracle), both directions."""

import pytest
import torch
from deepcompressor.backend.nunchaku.utils import NunchakuWeightPacker
from deepcompressor.backend.tinychat.utils import pack_w4

from converter.codecs import LAYER_CODECS, layer_codec
from converter.codecs.awq_w4a16 import AwqQWeight, dequantize
from converter.codecs.lowrank import LowRankDown, LowRankUp, pad_rank
from converter.codecs.svdq_scales import PackedVector, WScalesInt4, WScalesNvfp4
from converter.codecs.svdq_weight import SvdqQWeightInt4, SvdqQWeightNvfp4
from converter.errors import CodecError
from converter.layout import Layout

pytestmark = pytest.mark.oracle
PACKER = NunchakuWeightPacker(bits=4)
# (out, in): small, and the real Qwen-Image / Z-Image shapes
SHAPES = [(128, 128), (256, 512), (384, 256), (3072, 3072), (1024, 3840)]
BIG = [(9216, 3072), (3072, 12288)]


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("o,i", SHAPES + BIG)
def test_qweight_int4(o, i):
    g = torch.Generator().manual_seed(o + i)
    q = torch.randint(-8, 8, (o, i), generator=g, dtype=torch.int32)
    ref = PACKER.pack_weight(q.clone())
    _same(SvdqQWeightInt4.pack(q), ref)
    assert torch.equal(SvdqQWeightInt4.unpack(ref).to(torch.int32), q)


@pytest.mark.parametrize("o,i", SHAPES)
def test_qweight_nvfp4_codes(o, i):
    g = torch.Generator().manual_seed(7 * o + i)
    q = torch.randint(0, 16, (o, i), generator=g, dtype=torch.int32)
    ref = PACKER.pack_weight(q.clone())
    _same(SvdqQWeightNvfp4.pack(q), ref)
    assert torch.equal(SvdqQWeightNvfp4.unpack(ref).to(torch.int32), q)


@pytest.mark.parametrize("n", [128, 768, 3072, 9216, 12288])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vector(n, dtype):
    v = torch.randn(n).to(dtype)
    ref = PACKER.pack_scale(v.view(-1, 1).clone(), group_size=-1)
    _same(PackedVector.pack(v), ref.view(-1))
    _same(PackedVector.unpack(ref.view(-1)), v)


@pytest.mark.parametrize("o,i", SHAPES + BIG)
def test_wscales_int4(o, i):
    ng = i // 64
    s = torch.rand(o, ng).add(0.1).to(torch.bfloat16)
    ref = PACKER.pack_scale(s.view(o, 1, ng, 1).clone(), group_size=64)
    _same(WScalesInt4.pack(s), ref)
    _same(WScalesInt4.unpack(ref), s)


@pytest.mark.parametrize("o,i", SHAPES)
def test_wscales_nvfp4(o, i):
    ng = i // 16
    s = (torch.rand(o, ng) * 400 + 0.01).to(torch.bfloat16)
    ref = PACKER.pack_scale(s.view(o, 1, ng, 1).clone(), group_size=16)
    assert ref.dtype == torch.float8_e4m3fn
    s8 = s.to(torch.float8_e4m3fn)
    _same(WScalesNvfp4.pack(s8), ref)
    _same(WScalesNvfp4.unpack(ref), s8)


@pytest.mark.parametrize("r,c", [(16, 128), (32, 3072), (128, 3072), (48, 256), (64, 12288)])
def test_lowrank(r, c):
    down = torch.randn(r, c).to(torch.bfloat16)
    up = torch.randn(c, r).to(torch.bfloat16)
    ref_d = PACKER.pack_lowrank_weight(down.clone(), down=True)
    ref_u = PACKER.pack_lowrank_weight(up.clone(), down=False)
    _same(LowRankDown.pack(down), ref_d)
    _same(LowRankUp.pack(up), ref_u)
    _same(LowRankDown.unpack(ref_d), PACKER.unpack_lowrank_weight(ref_d, down=True))
    _same(LowRankUp.unpack(ref_u), PACKER.unpack_lowrank_weight(ref_u, down=False))
    _same(LowRankDown.unpack(ref_d), down)
    _same(LowRankUp.unpack(ref_u), up)


@pytest.mark.parametrize("o,i", [(256, 128), (1536, 256), (18432, 3072)])
def test_awq_qweight(o, i):
    q = torch.randint(0, 16, (o, i), dtype=torch.int32)
    ref = pack_w4(q.clone()).view(torch.int32)
    _same(AwqQWeight.pack(q), ref)
    assert torch.equal(AwqQWeight.unpack(ref).to(torch.int32), q)


def test_awq_dequantize_matches_deepcompressor_layer():
    from deepcompressor.backend.nunchaku.utils import convert_to_nunchaku_w4x16_linear_weight

    o, i = 1536, 1024
    w = (torch.randn(o, i) * 0.02).to(torch.bfloat16)
    scale = (w.float().view(o, 1, i // 64, 64).abs().amax(-1, keepdim=True) / 7).clamp_min(1e-6).to(torch.bfloat16)
    qw, ws, wz, _ = convert_to_nunchaku_w4x16_linear_weight(w, scale.view(o, 1, i // 64, 1))
    deq = dequantize(qw, ws, wz)
    # deepcompressor interleaves nothing here (adanorm_splits=1); the dequantized weight is the 4-bit grid of w
    err = (deq - w.float()).norm() / w.float().norm()
    assert err < 0.12
    codes = AwqQWeight.unpack(qw).float()
    expect = torch.round(w.float().view(o, i // 64, 64) / scale.float().view(o, i // 64, 1) + 7).clamp(0, 15)
    assert torch.equal(codes.view(o, i // 64, 64), expect)


def test_pad_rank_and_errors():
    d = torch.randn(32, 128)
    assert pad_rank(d, 48, down=True).shape == (48, 128)
    assert torch.equal(pad_rank(d, 48, down=True)[32:], torch.zeros(16, 128))
    with pytest.raises(CodecError):
        pad_rank(d, 16, down=True)
    with pytest.raises(CodecError):
        SvdqQWeightInt4.pack(torch.zeros(100, 128, dtype=torch.int32))
    with pytest.raises(CodecError):
        LowRankDown.pack(torch.zeros(10, 128))


def test_registry_complete():
    """Every quantized layout has the layer codec that merge, verify and the export dispatch to."""
    assert set(LAYER_CODECS) == {layout for layout in Layout if layout not in (Layout.DENSE, Layout.VECTOR)}
    for layout, codec in LAYER_CODECS.items():
        assert layer_codec(layout) is codec and codec.layout is layout


def test_dense_record_figures():
    """The dense-layer figures (merge report, verify, the tests' checks) against a hand computation."""
    from converter.factors import dense_record

    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    dw = torch.tensor([[0.5, 0.0], [0.0, -0.25]])
    new = (w.float() + dw).to(torch.bfloat16)  # exact in bf16: no rounding
    rec = dense_record(w, new, dw)
    assert rec["rel_error"] == 0.0 and rec["rounding_floor"] == 0.0 and rec["applied_fraction"] == 1.0
    half = (w.float() + dw / 2).to(torch.bfloat16)  # half the delta stored
    rec = dense_record(w, half, dw)
    assert rec["applied_fraction"] == pytest.approx(0.5) and rec["rel_error"] == pytest.approx(0.5)
    tiny = torch.full((2, 2), 1e-3)  # below bf16's resolution at these magnitudes: nothing can be stored
    rec = dense_record(w, (w.float() + tiny).to(torch.bfloat16), tiny)
    assert rec["rel_error"] == pytest.approx(1.0) and rec["rounding_floor"] == pytest.approx(1.0)


# -- row splits and row permutations in packed space (the diffusers export), against the packers of the parts -----
SPLITS = [(384, 256, (0, 128, 256, 384)), (768, 512, (0, 256, 512, 768)), (1024, 384, (0, 512, 1024))]


@pytest.mark.parametrize("o,i,cuts", SPLITS)
@pytest.mark.parametrize("nvfp4", [False, True])
def test_qweight_rows_is_packing_of_the_rows(o, i, cuts, nvfp4):
    from converter.codecs.svdq_weight import qweight_rows

    g = torch.Generator().manual_seed(o + i + nvfp4)
    q = torch.randint(0, 16, (o, i), generator=g, dtype=torch.int32) - (0 if nvfp4 else 8)
    packed = PACKER.pack_weight(q.clone())
    for a, b in zip(cuts, cuts[1:]):
        _same(qweight_rows(packed, a, b), PACKER.pack_weight(q[a:b].clone()))


@pytest.mark.parametrize("o,i,cuts", SPLITS)
@pytest.mark.parametrize("gs", [64, 16])
def test_wscales_rows_is_packing_of_the_rows(o, i, cuts, gs):
    from converter.codecs.svdq_scales import wscales_rows

    ng = i // gs
    s = (torch.rand(o, ng) * (400 if gs == 16 else 4) + 0.01).to(torch.bfloat16)
    packed = PACKER.pack_scale(s.view(o, 1, ng, 1).clone(), group_size=gs)  # fp8 for gs 16 (nvfp4)
    for a, b in zip(cuts, cuts[1:]):
        want = PACKER.pack_scale(s[a:b].contiguous().view(b - a, 1, ng, 1), group_size=gs)
        _same(wscales_rows(packed, a, b), want)
        assert not torch.equal(packed[:, a:b].contiguous().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("o,i,cuts", SPLITS)
def test_vector_and_up_rows_are_packing_of_the_rows(o, i, cuts):
    from converter.codecs.lowrank import up_rows
    from converter.codecs.svdq_scales import vector_rows

    v = torch.randn(o).to(torch.bfloat16)
    up = torch.randn(o, 32).to(torch.bfloat16)
    pv = PACKER.pack_scale(v.view(-1, 1).clone(), group_size=-1).view(-1)
    pu = PACKER.pack_lowrank_weight(up.clone(), down=False)
    for a, b in zip(cuts, cuts[1:]):
        _same(vector_rows(pv, a, b), PACKER.pack_scale(v[a:b].view(-1, 1).clone(), group_size=-1).view(-1))
        _same(up_rows(pu, a, b), PACKER.pack_lowrank_weight(up[a:b].clone(), down=False))


def test_row_ranges_off_the_tiles_are_refused():
    from converter.codecs.lowrank import up_rows
    from converter.codecs.svdq_scales import vector_rows, wscales_rows
    from converter.codecs.svdq_weight import qweight_rows

    with pytest.raises(CodecError):
        qweight_rows(torch.zeros(256, 64, dtype=torch.int8), 0, 64)
    with pytest.raises(CodecError):
        wscales_rows(torch.zeros(2, 256, dtype=torch.bfloat16), 128, 320)
    with pytest.raises(CodecError):
        vector_rows(torch.zeros(256), 64, 256)
    with pytest.raises(CodecError):
        up_rows(torch.zeros(256, 16), 8, 24)


@pytest.mark.parametrize("o,i", [(6 * 128, 256), (6 * 256, 512)])
def test_awq_row_permutation_is_packing_of_the_permuted_codes(o, i):
    from converter.codecs.awq_w4a16 import permute_group_params, permute_qweight_rows

    q = torch.randint(0, 16, (o, i), dtype=torch.int32)
    perm = torch.randperm(o)
    packed = pack_w4(q.clone()).view(torch.int32)
    _same(permute_qweight_rows(packed, perm), pack_w4(q[perm].clone()).view(torch.int32))
    _same(permute_qweight_rows(packed, perm), AwqQWeight.pack(AwqQWeight.unpack(packed)[perm]))
    other = torch.randperm(o)  # same shape, another permutation: the cached chunk map must not be reused
    _same(permute_qweight_rows(packed, other), pack_w4(q[other].clone()).view(torch.int32))
    p = torch.randn(i // 64, o).to(torch.bfloat16)
    _same(permute_group_params(p, perm), p.t()[perm].t().contiguous())


def test_awq_deinterleave_equals_deepcompressor_without_splits():
    """deepcompressor's W4A16 converter with adanorm_splits=6 (Nunchaku's interleaved modulation rows, +1 folded
    into the two scale chunks) and with adanorm_splits=1 (diffusers' chunk order) on the same weight: the row
    permutation maps the first onto the second bit for bit, and the bias differs by exactly the folded +1."""
    from deepcompressor.backend.nunchaku.utils import convert_to_nunchaku_w4x16_linear_weight

    from converter.codecs.awq_w4a16 import permute_group_params, permute_qweight_rows
    from mappings.qwen_image import ModulationInterleave

    d, i = 128, 256
    w = (torch.randn(6 * d, i) * 0.05).to(torch.bfloat16)
    b = (torch.randn(6 * d) * 0.02).to(torch.bfloat16)
    scale = (w.float().view(6 * d, 1, i // 64, 64).abs().amax(-1, keepdim=True) / 7).clamp_min(1e-6).to(torch.bfloat16)
    inter = convert_to_nunchaku_w4x16_linear_weight(w.clone(), scale.clone(), bias=b.clone(), adanorm_splits=6)
    plain = convert_to_nunchaku_w4x16_linear_weight(w.clone(), scale.clone(), bias=b.clone(), adanorm_splits=1)
    perm = ModulationInterleave().to_lora(torch.arange(6 * d))
    _same(permute_qweight_rows(inter[0], perm), plain[0])
    _same(permute_group_params(inter[1], perm), plain[1])
    _same(permute_group_params(inter[2], perm), plain[2])
    unfolded = inter[3][perm].float()
    unfolded[d:2 * d] -= 1
    unfolded[4 * d:5 * d] -= 1
    assert (unfolded - plain[3].float()).abs().max() <= 2.0 ** -8  # b, up to the rounding of bf16(b + 1)
    folded_back = unfolded.to(torch.bfloat16).float()
    folded_back[d:2 * d] += 1
    folded_back[4 * d:5 * d] += 1
    _same(folded_back.to(torch.bfloat16), inter[3][perm])


@pytest.mark.parametrize("o,i", [(128, 128), (384, 512), (256, 3072), (128, 1280)])  # 1280: a partial last step
def test_group_dots_in_packed_space(o, i):
    """Per-group dot products of the int4 codes with an input vector, read in packed order: the same numbers as
    from the logical codes deepcompressor packed (exact here; fp64 sums in another order in general)."""
    from converter.codecs.svdq_weight import group_dots

    g = torch.Generator().manual_seed(o * i)
    q = torch.randint(-8, 8, (o, i), generator=g, dtype=torch.int32)
    v = torch.rand(i, generator=g, dtype=torch.float64) + 0.5
    want = (q.double().view(o, i // 64, 64) * v.view(i // 64, 64)).sum(-1)
    assert torch.allclose(group_dots(PACKER.pack_weight(q.clone()), v), want, rtol=1e-14, atol=1e-12)


def test_group_dots_same_bits_without_int8_products(monkeypatch):
    """Where torch has no int8 matrix product on the CPU, the fp32 product stands in: the same integer sums, so
    the same bits; and the pieces carry v to fp64 accuracy even when a group's values span many octaves."""
    from converter.codecs import svdq_weight
    from converter.codecs.svdq_weight import group_dots

    g = torch.Generator().manual_seed(7)
    q = torch.randint(-8, 8, (256, 512), generator=g, dtype=torch.int32)
    v = torch.exp(torch.randn(512, generator=g, dtype=torch.float64) * 6)  # e^-20 .. e^20 within a group
    v[64:128] = 0.0  # a group of zeros
    packed = PACKER.pack_weight(q.clone())
    fast = group_dots(packed, v)
    monkeypatch.setattr(svdq_weight, "_INT8_MM", [False])
    assert torch.equal(group_dots(packed, v), fast)
    exact = (q.double().view(256, 8, 64) * v.view(8, 64)).sum(-1)
    scale = (q.double().abs().view(256, 8, 64) * v.view(8, 64)).sum(-1)
    assert ((fast - exact).abs() <= 1e-15 * scale).all()
    v[5] = float("inf")  # 1 / a zero smoothing factor: refused, never turned into finite garbage
    with pytest.raises(CodecError, match="inf or NaN"):
        group_dots(packed, v)


@pytest.mark.parametrize("o, i", [(8, 64), (64, 256), (1536, 3072)])
def test_awq_column_read_and_write_in_packed_space(o, i):
    """The modulation merge reads and rewrites only the code columns that may change, in the packed nibbles:
    the same as unpacking, replacing those columns and packing (columns that share a byte or an int16 word
    included: all of a group's columns in one case)."""
    from converter.codecs.awq_w4a16 import qweight_columns, replace_qweight_columns

    g = torch.Generator().manual_seed(o + i)
    codes = torch.randint(0, 16, (o, i), generator=g, dtype=torch.uint8)
    packed = AwqQWeight.pack(codes)
    for idx in (torch.randperm(i, generator=g)[: max(1, i // 6)], torch.arange(64), torch.tensor([i - 1, 0, 8]),
                torch.arange(0), torch.tensor([i - 2, i - 1, 1, 0, 32, 40])):  # none; byte-sharing pairs
        assert torch.equal(qweight_columns(packed, idx), codes[:, idx].T)  # a column per row
        new = torch.randint(0, 16, (idx.numel(), o), generator=g, dtype=torch.uint8)
        want = codes.clone()
        want[:, idx] = new.T
        got = replace_qweight_columns(packed, idx, new)
        assert torch.equal(got, AwqQWeight.pack(want)) and torch.equal(packed, AwqQWeight.pack(codes))
        into = packed.clone()  # or written into a copy the caller holds (the merge's rows of its output)
        assert replace_qweight_columns(packed, idx, new, out=into) is into and torch.equal(into, got)


def test_randomized_svd_of_an_exactly_low_rank_update(monkeypatch):
    """A dense update of lower rank than the sketch (a zero Gram pivot in the Cholesky QR) falls back to a
    Householder QR: the truncation still captures all of it."""
    from converter.factors import svd_truncate

    householder = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: householder.append(1) or qr(*a, **k))
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(1536, 8, generator=g) @ torch.randn(8, 1280, generator=g)
    f, captured = svd_truncate(dw, 64)
    assert len(householder) > 1  # the sketches fell back (one QR is the small projection's own)
    assert captured == pytest.approx(1.0, abs=1e-6)
    assert float((f.up @ f.down - dw).norm() / dw.norm()) < 1e-4

"""Property-based fuzzing of every parser of user input: the safetensors header reader, the checkpoint inventory
(layers, family and quantization_config from a base's header), the LoRA key parser, the `LORA[:STRENGTH]`
argument and the batch plan file. No input may raise anything but the tool's own error type
(MergeError, which the CLI turns into one `error:` line and exit 2); what is accepted must be sound.

Bounded and deterministic by default (derandomized, a few seconds per test); a longer, random run:

    QWENLORA_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz.py -p no:cacheprovider

The @example inputs run first, every time: each broke a parser on some commit (a traceback instead of one `error:`
line, or a file accepted that must not be). A property known to fail is marked
xfail(strict=True) with its failing input among the examples, so that the mark cannot flip by chance; none is now.
Hypothesis is a test-only dependency; without it these tests are skipped.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_builders import FORMATS, lora_keys  # noqa: E402

# converter internals used here, in one place: the parsers (header, checkpoint inventory, LoRA
# keys, LORA argument, batch plan) and the error type. The properties also read: Checkpoint .tensors (TensorInfo
# .dtype .shape .start .nbytes), .read_bytes, .metadata, .keys; LoraFile .ckpt .modules (LoraModule .name .keys
# .adapters) .ignored .unsupported; Adapter .rank .shape .scale .title; Model .rank
from converter.batchfile import read_batch_file  # noqa: E402
from converter.errors import MergeError  # noqa: E402
from converter.lorafile import LoraSpec, open_lora  # noqa: E402
from converter.lorapaths import parse_spec  # noqa: E402
from converter.model import load_model  # noqa: E402
from converter.st_reader import Checkpoint  # noqa: E402

LONG = int(os.environ.get("QWENLORA_FUZZ_EXAMPLES", "0") or 0)

# Hypothesis writes nothing in the checkout: conftest.py points its storage into pytest's temp folder, and the
# examples database is off (database=None below).


def fuzz(ci_examples: int):
    """Hypothesis settings: `ci_examples` derandomized examples, or QWENLORA_FUZZ_EXAMPLES random ones."""
    return settings(max_examples=LONG or ci_examples, derandomize=not LONG, deadline=None, database=None,
                    print_blob=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -- safetensors files ---------------------------------------------------------------------------------------
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
         "F8_E4M3": 1, "F8_E5M2": 1}
KNOWN = sorted(SIZES)


def st_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=6))
json_any = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                        max_size=3), max_leaves=8)
any_dtype = st.one_of(st.sampled_from(KNOWN + ["F8_E8M0", "C64", "bf16", "", "F4"]), json_any)
any_dim = st.one_of(st.integers(-3, 5), st.sampled_from([2 ** 31, 2 ** 63, -2 ** 63, 2 ** 64]), json_scalar)
any_shape = st.one_of(st.lists(any_dim, max_size=4), json_any)
any_offsets = st.one_of(st.lists(st.one_of(st.integers(-16, 200), json_scalar), max_size=3), json_any)
names = st.one_of(st.sampled_from(["a", "b", "w.weight", "__metadata__", "x.lora_A.weight"]), st.text(max_size=8))


@st.composite
def header_files(draw) -> bytes:
    """A header of well-formed, bent or junk entries; then duplicated keys, bad UTF-8, a wrong length field or
    a wrong data size, now and then."""
    parts, pos = [], 0
    for _ in range(draw(st.integers(0, 4))):
        name = draw(names)
        kind = draw(st.sampled_from(["good", "good", "good", "bent", "junk"]))
        if kind == "junk":
            parts.append((name, draw(json_any)))
            continue
        dtype = draw(st.sampled_from(KNOWN))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = math.prod(shape) * SIZES[dtype]
        e: dict = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
        if kind == "bent":
            what = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra"]))
            if what == "dtype":
                e["dtype"] = draw(any_dtype)
            elif what == "shape":
                e["shape"] = draw(any_shape)
            elif what == "data_offsets":
                e["data_offsets"] = draw(any_offsets)
            elif what == "drop":
                del e[draw(st.sampled_from(sorted(e)))]
            else:
                e[draw(st.text(max_size=4))] = draw(json_any)
        parts.append((name, e))
    if draw(st.booleans()):
        meta = draw(st.one_of(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3), json_any))
        parts.insert(draw(st.integers(0, len(parts))), ("__metadata__", meta))
    if parts and draw(st.integers(0, 4)) == 0:  # a key twice (json.dumps of a dict could not say it)
        parts.append(draw(st.sampled_from(parts)))
    body = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in parts) + "}"
    raw = body.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 6)) == 0 and len(raw) > 2:  # a byte that is not UTF-8
        i = draw(st.integers(1, len(raw) - 1))
        raw = raw[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9", b"\x80"])) + raw[i:]
    data_len = max(0, pos + draw(st.sampled_from([0, 0, 0, -1, 1, -8, 8])))
    length = None if draw(st.integers(0, 5)) else draw(st.integers(0, len(raw) + 16))
    return st_file(raw, bytes(data_len), length)


@st.composite
def mutated_files(draw) -> bytes:
    """A valid file with a few bytes replaced, inserted or deleted, or cut short."""
    shapes = draw(st.lists(st.tuples(st.sampled_from(KNOWN), st.lists(st.integers(0, 3), max_size=3)), max_size=3))
    head, pos = {}, 0
    for i, (dtype, shape) in enumerate(shapes):
        n = math.prod(shape) * SIZES[dtype]
        head[f"t{i}.weight"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    if draw(st.booleans()):
        head["__metadata__"] = {"k": "v"}
    buf = bytearray(st_file(head, bytes(pos)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        i = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "set" and buf:
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif op == "delete" and buf:
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


any_file = st.one_of(header_files(), header_files(), header_files(), mutated_files(), st.binary(max_size=256),
                     st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b))

GOOD = {"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]}}
# inputs that broke the reader before (each kept as a regression example)
STR_OFFSETS = st_file({"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": ["0", "8"]}}, bytes(8))
LIST_DTYPE = st_file({"a": {"dtype": ["BF16"], "shape": [2, 2], "data_offsets": [0, 8]}}, bytes(8))
FLOAT_OFFSETS = st_file({"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0.0, 8.0]}}, bytes(8))
NEGATIVE_DIM = st_file({"a": {"dtype": "BF16", "shape": [-4, 1], "data_offsets": [8, 0]}}, bytes(8))
DEEP_JSON = st_file(b"[" * 50_000 + b"]" * 50_000)
OVERLAP = st_file({"a": GOOD["a"], "b": {**GOOD["b"], "data_offsets": [4, 12]}}, bytes(16))
DUPLICATE = st_file(('{"a":' + json.dumps(GOOD["a"]) + ',"a":' + json.dumps(GOOD["b"]) + "}").encode(), bytes(16))
NEG_PAIR = st_file({"a": {"dtype": "BF16", "shape": [-2, -2], "data_offsets": [0, 8]}}, bytes(8))


def _open(scratch: Path, data: bytes):
    p = scratch / "fuzz.safetensors"
    p.write_bytes(data)
    try:
        return Checkpoint(p)
    except MergeError:
        return None


def _duplicate_top_keys(data: bytes) -> bool:
    """Oracle: whether the header is UTF-8 JSON with a key twice at the top level."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        pairs = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=lambda kv: kv)
    except (ValueError, struct.error, RecursionError):
        return False
    return isinstance(pairs, list) and len({k for k, _ in pairs}) != len(pairs)


@fuzz(250)
@given(data=any_file)
@example(data=STR_OFFSETS)
@example(data=LIST_DTYPE)
@example(data=FLOAT_OFFSETS)
@example(data=NEGATIVE_DIM)
@example(data=DEEP_JSON)
def test_header_reader_raises_only_merge_error(scratch, data):
    c = _open(scratch, data)
    if c is None:
        return
    with c:
        for name in c.keys():  # what was accepted can be read, or fails as a MergeError
            try:
                c.read_bytes(name)
            except MergeError:
                pass


@fuzz(250)
@given(data=any_file)
@example(data=OVERLAP)
@example(data=DUPLICATE)
@example(data=NEG_PAIR)
def test_header_reader_accepts_only_sound_files(scratch, data):
    c = _open(scratch, data)
    if c is None:
        return
    with c:
        assert not _duplicate_top_keys(data), "a header with a key twice was accepted"
        size, data_start = len(data), 8 + struct.unpack("<Q", data[:8])[0]
        spans = []
        for name, info in c.tensors.items():
            assert info.dtype in SIZES, (name, info.dtype)
            assert all(type(d) is int and d >= 0 for d in info.shape), (name, info.shape)
            assert info.nbytes == math.prod(info.shape) * SIZES[info.dtype], name
            assert data_start <= info.start and info.start + info.nbytes <= size, (name, info.start, info.nbytes)
            if info.nbytes:
                spans.append((info.start, info.start + info.nbytes, name))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            assert a1 <= b0, f"tensors {an!r} and {bn!r} overlap"


tensors = st.lists(st.tuples(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I32", "I64", "F64", "BOOL"]),
                             st.lists(st.integers(0, 3), max_size=3)), max_size=5)


@fuzz(60)
@given(specs=tensors, meta=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
       names=st.lists(st.text(min_size=1, max_size=10), min_size=5, max_size=5, unique=True))
def test_header_reader_reads_what_safetensors_writes(scratch, specs, meta, names):
    """Files written by the reference writer (zero-size tensors, unicode names and metadata) are read as written."""
    import torch
    from safetensors.torch import save_file

    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8,
          "I32": torch.int32, "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool}
    g = torch.Generator().manual_seed(len(specs))
    want = {}
    for name, (dtype, shape) in zip(names, specs):
        x = torch.randint(0, 100, tuple(shape), generator=g, dtype=torch.int64)
        want[name] = x.to(dt[dtype])
    p = scratch / "ref.safetensors"
    save_file(want, str(p), metadata=meta or None)
    with Checkpoint(p) as c:
        assert c.metadata == meta
        assert set(c.keys()) == set(want)
        for name, x in want.items():
            assert c.tensors[name].shape == tuple(x.shape)
            assert bytes(c.read_bytes(name)) == x.reshape(-1).view(torch.uint8).numpy().tobytes()


# -- the checkpoint inventory (a base's header: layers, family, quantization_config) --------------------------
TARGETS = ["attn.to_qkv.qweight", "attn.to_qkv.proj_down", "attn.to_qkv.proj_up", "attn.to_qkv.wscales",
           "attn.to_qkv.smooth_factor", "attn.to_qkv.smooth_factor_orig", "attn.to_qkv.bias", "img_mod.1.qweight",
           "img_mod.1.wscales", "img_mod.1.wzeros", "img_mod.1.bias", "norm_out.linear.weight", "img_in.weight",
           ".weight", ".bias", ""]
PARTS = ["qweight", "wscales", "wzeros", "proj_down", "proj_up", "smooth_factor", "weight", "bias", "wcscales", "x"]
base_edit = st.tuples(st.sampled_from(["drop_dim", "add_dim", "set_dim", "dtype", "delete", "rename", "copy"]),
                      st.sampled_from(TARGETS), st.integers(0, 1000), st.integers(0, 5))
meta_edit = st.tuples(st.sampled_from(["quantization_config", "model_class", "comfy_config", "config"]),
                      st.one_of(st.none(), st.text(max_size=20), json_any.map(json.dumps),
                                st.sampled_from(['{"rank": -16}', '{"rank": "32"}', '{"rank": 1e999}', "[" * 5000])))


def _edit_base(head: dict, edits, meta_edits) -> tuple[dict, int]:
    head = json.loads(json.dumps(head))
    meta = head.pop("__metadata__", {})
    for op, target, i, v in edits:
        names = sorted(n for n in head if n.endswith(target) or target in n)
        if not names:
            continue
        name = names[i % len(names)]
        e = head[name]
        if op == "drop_dim":
            e["shape"] = e["shape"][:-1]
        elif op == "add_dim":
            e["shape"] = e["shape"] + [v]
        elif op == "set_dim" and e["shape"]:
            e["shape"][i % len(e["shape"])] = v
        elif op == "dtype":
            e["dtype"] = KNOWN[(i + v) % len(KNOWN)]
        elif op == "delete":
            del head[name]
        elif op == "rename":
            head[name.rpartition(".")[0] + "." + PARTS[(i + v) % len(PARTS)]] = head.pop(name)
        elif op == "copy":
            head[name.replace(".0.", f".{v + 1}.", 1) if ".0." in name else name + f".{v}"] = dict(e)
    for key, value in meta_edits:
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    out, pos = {"__metadata__": meta}, 0
    for name, e in head.items():
        n = math.prod(e["shape"]) * SIZES[e["dtype"]]
        out[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [pos, pos + n]}
        pos += n
    return out, pos


@pytest.fixture(scope="module")
def base_header(qwen_int4) -> dict:
    with open(qwen_int4.path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


QWEIGHT_1D = [("drop_dim", "attn.to_qkv.qweight", 0, 0)]
PROJ_DOWN_1D = [("drop_dim", "attn.to_qkv.proj_down", 0, 0)]
AWQ_1D = [("drop_dim", "img_mod.1.qweight", 0, 0)]


@fuzz(150)
@given(edits=st.lists(base_edit, max_size=4), meta_edits=st.lists(meta_edit, max_size=2))
@example(edits=QWEIGHT_1D, meta_edits=[])
@example(edits=PROJ_DOWN_1D, meta_edits=[])
@example(edits=AWQ_1D, meta_edits=[])
@example(edits=[], meta_edits=[("quantization_config", "[" * 50_000 + "]" * 50_000)])
def test_checkpoint_inventory_raises_only_merge_error(scratch, base_header, edits, meta_edits):
    """A base whose header was edited (dimensions dropped, added or changed, dtypes swapped, tensors deleted,
    renamed or copied, metadata replaced): load_model takes it or refuses it with a MergeError."""
    head, nbytes = _edit_base(base_header, edits, meta_edits)
    p = scratch / "base.safetensors"
    raw = st_file(head)
    with open(p, "wb") as f:  # sparse: the data section is zeros
        f.write(raw)
        f.truncate(len(raw) + nbytes)
    try:
        c = Checkpoint(p)
    except MergeError:
        return
    with c:
        try:
            model = load_model(c)
        except MergeError:
            return
        assert model.rank >= 0


# -- LoRA keys -----------------------------------------------------------------------------------------------
PREFIXES = ["", "", "base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "unet.",
            "lora_unet_", "lora_transformer_", "lycoris_", "lora_te_", "lora_te1_", "text_encoder.", "te1.",
            "transformer.transformer."]
SEGMENTS = ["transformer_blocks", "layers", "0", "1", "10", "attn", "attention", "to_q", "to_k", "to_v", "to_out",
            "add_q_proj", "img_mod", "txt_mlp", "net", "2", "feed_forward", "w1", "w3", "qkv", "adaLN_modulation",
            "lora", "lora_A", "alpha", "weight", "default", "ü", "", "x y"]
SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".lora_A.default.weight",
            ".lora_B.default.weight", ".lora_A.other.weight", ".lora.down.weight", ".lora.up.weight",
            ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", ".alpha", ".lora_alpha", ".diff",
            ".diff_b", ".lora_B.bias", ".lora_up.bias", ".lora_A.bias", ".dora_scale", ".lora_magnitude_vector",
            ".lora_magnitude_vector.default.weight", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a",
            ".lokr_w2_b", ".lokr_t2", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
            ".lora_mid.weight", ".ia3_w", ".oft_blocks", ".weight", ""]
module_name = st.builds(lambda segs, sep: sep.join(segs), st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5),
                        st.sampled_from([".", "_"]))
any_shape_small = st.one_of(st.tuples(st.integers(0, 3), st.integers(0, 4)).map(list),
                            st.lists(st.integers(0, 3), max_size=4))
alpha_dtype = st.sampled_from(["F32", "BF16", "F16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3"])


PAIRS = [(".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
         (".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
         (".lora_A.default.weight", ".lora_B.default.weight"), (".lokr_w1", ".lokr_w2"),
         (".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b"),
         (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"),
         (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"),
         (".lora_down.weight", ".lora_up.weight", ".diff_b"), (".diff",)]
_DOWN = (".lora_A.", ".lora_down.", ".lora.down.", ".lora_linear_layer.down.", "_a", ".hada_w1_a", ".hada_w2_a")
_UP = (".lora_B.", ".lora_up.", ".lora.up.", ".lora_linear_layer.up.", "_b")
_FLOAT_FORMATS = {"F32": "<f", "F16": "<e", "F64": "<d"}


def _scalar_bytes(dtype: str, value: float, raw: bytes) -> bytes:
    if dtype in _FLOAT_FORMATS:
        try:
            return struct.pack(_FLOAT_FORMATS[dtype], value)
        except OverflowError:
            pass
    if dtype == "BF16":
        return struct.pack("<f", value)[2:]
    return raw


@st.composite
def lora_files(draw) -> tuple[bytes, str]:
    """A valid safetensors file of LoRA-ish keys: a few module names, each with random parts (so that modules
    of every adapter type come together, or half) of mostly matching shapes (rank 0 included), alphas of any
    float value (NaN and inf included), now and then a random key, a random shape or a lora_adapter_metadata;
    and a strength suffix for the LORA argument."""
    modules = draw(st.lists(module_name, min_size=1, max_size=3))
    dims = {m: (draw(st.integers(0, 3)), draw(st.integers(0, 4)), draw(st.integers(0, 4))) for m in modules}
    prefix = draw(st.sampled_from(PREFIXES))
    pick_prefix = lambda: prefix if draw(st.integers(0, 3)) else draw(st.sampled_from(PREFIXES))  # noqa: E731
    keys = []
    for m in modules:
        if draw(st.booleans()):  # a whole module: both halves (and an alpha) of one spelling
            for suffix in draw(st.sampled_from(PAIRS)) + ((".alpha",) if draw(st.booleans()) else ()):
                keys.append((prefix + m + suffix, m))
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 7)) == 0:
            keys.append((draw(st.text(max_size=20)), None))
        else:
            m = draw(st.sampled_from(modules))
            keys.append((pick_prefix() + m + draw(st.sampled_from(SUFFIXES)), m))
    head, chunks, pos = {}, [], 0
    for key, m in dict(keys).items():
        if key == "__metadata__":
            continue
        data = None
        if key.endswith("alpha"):
            dtype, shape = draw(alpha_dtype), draw(st.sampled_from([[], [], [1], [2], [1, 1]]))
            if math.prod(shape) == 1:
                raw = draw(st.binary(min_size=SIZES[dtype], max_size=SIZES[dtype]))
                data = _scalar_bytes(dtype, draw(st.floats(width=32)), raw)
        else:
            dtype = draw(st.sampled_from(["BF16", "F32", "F16"]))
            rank, fan_in, fan_out = dims.get(m) or (1, 1, 1)
            if m is not None and draw(st.integers(0, 3)) and any(t in key for t in _DOWN):
                shape = [rank, fan_in]
            elif m is not None and draw(st.integers(0, 3)) and any(t in key for t in _UP):
                shape = [fan_out, rank]
            else:
                shape = draw(any_shape_small)
        n = math.prod(shape) * SIZES[dtype]
        head[key] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        chunks.append(data if data is not None else draw(st.binary(min_size=n, max_size=n)))
        pos += n
    meta = draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(["lora_adapter_metadata", "ss_network_alpha"]),
                                                     st.one_of(st.text(max_size=12), json_any.map(json.dumps)))))
    if meta:
        head["__metadata__"] = meta
    strength = draw(st.one_of(st.just(""), st.floats().map(lambda f: f":{f!r}"), st.sampled_from([":", ":x", ":1:2"])))
    return st_file(head, b"".join(chunks)), strength


def _lora(a_shape, b_shape, alpha: bytes | None = None, meta: dict | None = None) -> tuple[bytes, str]:
    head = {"m.lora_A.weight": {"dtype": "F32", "shape": a_shape, "data_offsets": [0, 4 * math.prod(a_shape)]}}
    pos = 4 * math.prod(a_shape)
    head["m.lora_B.weight"] = {"dtype": "F32", "shape": b_shape, "data_offsets": [pos, pos + 4 * math.prod(b_shape)]}
    pos += 4 * math.prod(b_shape)
    data = bytes(pos)
    if alpha is not None:
        head["m.alpha"] = {"dtype": "F32", "shape": [], "data_offsets": [pos, pos + 4]}
        data += alpha
    if meta:
        head["__metadata__"] = meta
    return st_file(head, data), ""


RANK0_ALPHA = _lora([0, 4], [4, 0], struct.pack("<f", 4.0))
NAN_ALPHA = _lora([2, 4], [4, 2], struct.pack("<f", float("nan")))
DEEP_ADAPTER_META = _lora([2, 4], [4, 2], meta={"lora_adapter_metadata": "[" * 50_000 + "]" * 50_000})
LOKR_SCALAR_FACTOR = (st_file({f"m.lokr_w{i}_{ab}": {"dtype": "BF16", "shape": [1, 1] if ab == "a" else [],
                                                     "data_offsets": [2 * k, 2 * k + 2]}
                               for k, (i, ab) in enumerate([(1, "a"), (1, "b"), (2, "a"), (2, "b")])}, bytes(8)), "")


@fuzz(200)
@given(case=lora_files())
@example(case=LOKR_SCALAR_FACTOR)
@example(case=RANK0_ALPHA)
@example(case=NAN_ALPHA)
@example(case=DEEP_ADAPTER_META)
def test_lora_parser_raises_only_merge_error_and_accounts_every_key(scratch, case):
    data, strength = case
    p = scratch / "lora.safetensors"
    p.write_bytes(data)
    try:
        lf = open_lora(f"{p}{strength}")
    except MergeError:
        return
    try:
        keys = sorted(lf.ckpt.keys())
        accounted = sorted([k for m in lf.modules.values() for k in m.keys.values()]
                           + [k for k, _ in lf.ignored] + [k for k, _ in lf.unsupported])
        assert accounted == keys, "every key ends in exactly one bucket"
        for mod in lf.modules.values():
            for a in mod.adapters:  # what the planner asks of an adapter: a MergeError or sound figures
                try:
                    shape, rank, scale = a.shape, a.rank, getattr(a, "scale", 1.0)
                except MergeError:
                    continue
                assert all(type(d) is int and d >= 0 for d in shape), f"{mod.name}: {a.title} of shape {shape}"
                assert rank is None or rank >= 1, f"{mod.name}: a rank-{rank} {a.title} module was accepted"
                assert math.isfinite(scale), f"{mod.name}: scale {scale}"
    finally:
        lf.ckpt.close()


MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.12.attn.add_k_proj", "transformer_blocks.3.img_mod.1",
           "transformer_blocks.7.txt_mlp.net.0.proj", "layers.2.attention.to_out.0", "layers.0.feed_forward.w1",
           "noise_refiner.1.attention.qkv", "img_in", "time_text_embed.timestep_embedder.linear_1"]


@fuzz(100)
@given(modules=st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True),
       fmt=st.sampled_from(FORMATS), rank=st.integers(1, 3), with_alpha=st.booleans())
def test_lora_parser_finds_every_module_of_every_format(scratch, modules, fmt, rank, with_alpha):
    head, pos = {}, 0
    for m in modules:
        ka, kb, kalpha = lora_keys(m, fmt)
        for k, shape in ((ka, [rank, 8]), (kb, [8, rank])) + (((kalpha, []),) if with_alpha else ()):
            n = 4 * math.prod(shape)
            head[k] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
    p = scratch / "fmt.safetensors"
    p.write_bytes(st_file(head, struct.pack("<f", 1.0) * (pos // 4)))
    lf = open_lora(str(p))
    try:
        assert not lf.unsupported and not lf.ignored
        underscore = fmt in ("kohya", "lycoris")
        want = {(m.replace(".", "_") if underscore else m, underscore) for m in modules}
        assert set(lf.modules) == want
        for mod in lf.modules.values():
            assert set(mod.keys) == ({"A", "B", "alpha"} if with_alpha else {"A", "B"})
            assert [a.rank for a in mod.adapters] == [rank]
            assert mod.adapters[0].scale == pytest.approx(1.0 / rank if with_alpha else 1.0)
    finally:
        lf.ckpt.close()


# -- the LORA[:STRENGTH] argument ----------------------------------------------------------------------------
def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


spec_text = st.one_of(
    st.text(max_size=30),
    st.builds(lambda *p: "".join(p), st.sampled_from(["", "C:", "c:", "\\\\server\\share\\", "/", "./", "~/"]),
              st.text(alphabet="ab\\/:.ü 0123456789-e+", max_size=20),
              st.sampled_from(["", ".safetensors", ":", "::", ":0.5", ":-1", ":1e3", ":nan", ":inf", ":1_0", ": 2"])))


@fuzz(500)
@given(spec=spec_text)
@example(spec="C:\\x\\y.safetensors:0.5")
@example(spec="C:\\x\\y.safetensors")
@example(spec="a:b:c")
@example(spec="x:")
@example(spec=":1")
@example(spec=":")
@example(spec="")
@example(spec="lora.safetensors:1e999")
def test_spec_parser_raises_only_merge_error(spec):
    try:
        path, strength = parse_spec(spec)
    except MergeError:
        return
    assert isinstance(path, str) and isinstance(strength, float) and math.isfinite(strength)
    assert path == spec or spec == f"{path}:{spec.rpartition(':')[2]}"


@fuzz(300)
@given(path=st.text(min_size=1, max_size=30), strength=st.floats(allow_nan=False, allow_infinity=False))
def test_spec_parser_round_trips(path, strength):
    """Any path, colons and drive letters included, followed by ':<number>' gives back both."""
    assert parse_spec(f"{path}:{strength!r}") == (path, strength)


@fuzz(300)
@given(spec=st.text(min_size=1, max_size=30))
def test_spec_without_a_number_is_all_path(spec):
    if ":" in spec and _is_float(spec.rpartition(":")[2]) and spec.rpartition(":")[0]:
        return
    assert parse_spec(spec) == (spec, 1.0)


@pytest.mark.parametrize("spec, want", [
    ("C:\\loras\\style.safetensors:0.5", ("C:\\loras\\style.safetensors", 0.5)),
    ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", 1.0)),
    ("C:/loras/style.safetensors:-1", ("C:/loras/style.safetensors", -1.0)),
    ("a:b:c", ("a:b:c", 1.0)),
    ("a:b:2", ("a:b", 2.0)),
    ("style.safetensors:", ("style.safetensors:", 1.0)),
    (":1", (":1", 1.0)),
    ("ünï:côde.safetensors:0.25", ("ünï:côde.safetensors", 0.25)),
])
def test_spec_examples(spec, want):
    assert parse_spec(spec) == want


@pytest.mark.parametrize("spec", ["x.safetensors:nan", "x.safetensors:inf", "x.safetensors:-inf", "x:1e400"])
def test_spec_non_finite_strength_is_refused(spec):
    with pytest.raises(MergeError, match="finite"):
        parse_spec(spec)


# -- batch plan files ----------------------------------------------------------------------------------------
plan_lora = st.one_of(st.text(max_size=12), json_any,
                      st.fixed_dictionaries({"path": st.one_of(st.text(max_size=8), json_scalar)},
                                            optional={"strength": st.one_of(json_scalar, st.floats())}))
plan_entry = st.one_of(json_any, st.fixed_dictionaries(
    {"loras": st.one_of(json_any, st.lists(plan_lora, max_size=3))},
    optional={"output": st.one_of(st.none(), st.text(max_size=8), json_scalar)}))
plan_doc = st.one_of(json_any,
                     st.fixed_dictionaries({"outputs": st.one_of(json_any, st.lists(plan_entry, max_size=3))}))


@fuzz(200)
@given(doc=plan_doc, toml=st.booleans(), text=st.text(max_size=40))
@example(doc={"outputs": [{"output": "o.safetensors", "loras": [{"path": "l.safetensors", "strength": "x"}]}]},
         toml=False, text="")
@example(doc={"outputs": [{"output": 5, "loras": ["l.safetensors"]}]}, toml=False, text="")
@example(doc={"outputs": [{"loras": [{"path": 5}]}]}, toml=False, text="")
@example(doc=None, toml=True, text="a = " + "[" * 5000 + "]" * 5000)
def test_batch_plan_parser_raises_only_merge_error(scratch, doc, toml, text):
    p = scratch / ("plan.toml" if toml else "plan.json")
    p.write_text(text if toml else json.dumps(doc), encoding="utf-8")
    try:
        entries = read_batch_file(str(p))
    except MergeError:
        return
    assert isinstance(entries, list) and entries
    for out, specs in entries:
        assert out is None or isinstance(out, str)
        assert specs and all(isinstance(spec, LoraSpec) and isinstance(spec.path, str)
                             and math.isfinite(spec.strength) for spec in specs)

"""The fault matrix: hostile inputs and faults during the write, each run against the CLI in a subprocess.

Shared by tests/test_faults.py (one test per case) and scripts/faults.sh (a Markdown table for the README's
reliability section, through scripts/faults_table.py). Behaviour is what is tested: nothing here imports the
converter; the command is `python -m converter` from this checkout, or QWENLORA_MERGE_CMD (e.g. the
installed console script `qwenlora-merge`).

What every case asserts (see `problems`): the exit code; exactly one stderr line starting `error:`, naming the
offending file (its path, or its name as a word) and matching the case's cause; no traceback and no `internal
error`; no file at the output path; no temp file (`.<outname>.*.partial`, or any `*.partial`) left anywhere in the
case's folder or beside the inputs; the base and the LoRAs byte-identical before and after (sha256; for the
cases that rewrite an input on purpose, identical to what the case itself left there).

Proposed behaviour after SIGKILL (it cannot be caught): the output path holds nothing and the inputs are
unchanged; one temp file of the dead process may remain (the `sigkill@...` cases allow exactly that), and the
next run writing the same output removes it (case `sigkill-then-rerun`; HEAD tells a stale temp file by the dead
pid in its name and spares a temp file another live process holds a lock on).

A case known to fail gets `today="why"`: tests/test_faults.py marks it xfail(strict=True) until it is fixed. None
has one now.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
MAX_HEADER = 100 << 20  # the reader's header limit (README / st_reader.MAX_HEADER), restated here on purpose
OUT_NAME = "merged.safetensors"
MODULE = "transformer_blocks.0.attn.to_out.0"  # a W4A4 layer of the tiny Qwen base: 256 x 256
DIM = 256
SMALL_BLOCKS, BIG_BLOCKS = 2, 6  # BIG: a merge long enough (~2 s of layers) to be signalled mid-write
CASE_TIMEOUT = 120.0
BIG_ARGS = ("--mod", "skip")  # the write-phase merges: W4A4 and 16-bit layers only (no seconds of modulation maths)


# -- the command -------------------------------------------------------------------------------------------
def cli_command() -> list[str]:
    """QWENLORA_MERGE_CMD (shell words, e.g. `.venv/bin/qwenlora-merge`), else this checkout's module."""
    cmd = os.environ.get("QWENLORA_MERGE_CMD")
    return shlex.split(cmd) if cmd else [sys.executable, "-m", "converter"]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    if not os.environ.get("QWENLORA_MERGE_CMD"):  # the module form tests this checkout, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("QWENLORA_MERGE_DIRECT_IO", None)
    env.update(extra)
    return env


# -- raw safetensors files (any header, even an invalid one) ------------------------------------------------
def st_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def bf16_bytes(n: int, seed: int, scale: float = 0.02) -> bytes:
    rnd = random.Random(seed)
    return b"".join(struct.pack("<f", rnd.gauss(0.0, scale))[2:] for _ in range(n))


def t(dtype: str, shape, start: int, nbytes: int | None = None) -> dict:
    if nbytes is None:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}.get(dtype, 2)
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + nbytes]}


def good_module(rank: int = 4, seed: int = 0) -> tuple[dict, bytes]:
    """lora_A (rank, 256) and lora_B (256, rank) in bf16 for MODULE, diffusers key names."""
    na = rank * DIM * 2
    head = {f"{MODULE}.lora_A.weight": t("BF16", (rank, DIM), 0),
            f"{MODULE}.lora_B.weight": t("BF16", (DIM, rank), na)}
    return head, bf16_bytes(2 * rank * DIM, seed)


# -- inputs -------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    dir: Path
    base: Path  # tiny Qwen-Image int4 base (2 blocks): planning and hostile-input cases
    lora: Path  # a small LoRA on one W4A4 layer of `base`
    big: Path  # 6 blocks: the write-phase cases
    big_alt: Path  # same header as `big`, other values (rewritten in place under a running merge)
    big_lora: Path  # every target of `big`, modulation included (a few seconds of layer work)
    big_lora_alt: Path  # same header as `big_lora`, other values


def make_inputs(folder: Path, base: Path | None = None) -> Inputs:
    """Build the inputs (builders need torch and deepcompressor); `base` reuses an existing tiny base."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from builders import build_qwen_checkpoint
    from lora_builders import random_lora_modules, write_lora

    folder.mkdir(parents=True, exist_ok=True)
    if base is None:
        base = folder / "svdq-int4_r32-tiny.safetensors"
        build_qwen_checkpoint(base, blocks=SMALL_BLOCKS, dim=DIM, rank=32)
    lora = folder / "lora.safetensors"
    head, data = good_module()
    lora.write_bytes(st_bytes(head, data))
    big, big_alt = folder / "svdq-int4_r32-big.safetensors", folder / "big-alt.safetensors"
    truth = build_qwen_checkpoint(big, blocks=BIG_BLOCKS, dim=DIM, rank=32, seed=0)
    build_qwen_checkpoint(big_alt, blocks=BIG_BLOCKS, dim=DIM, rank=32, seed=7)
    big_lora, big_lora_alt = folder / "big-lora.safetensors", folder / "big-lora-alt.safetensors"
    write_lora(big_lora, random_lora_modules(truth["lora_targets"], rank=16, seed=1), "diffusers")
    write_lora(big_lora_alt, random_lora_modules(truth["lora_targets"], rank=16, seed=2), "diffusers")
    for a, b in ((big, big_alt), (big_lora, big_lora_alt)):
        _same_layout(a, b)
    return Inputs(folder, Path(base), lora, big, big_alt, big_lora, big_lora_alt)


def _same_layout(a: Path, b: Path) -> None:
    """Make `b` byte-compatible with `a` for an in-place rewrite: `a`'s header bytes (safetensors writes the
    metadata in no fixed order) followed by `b`'s data; the tensor entries must be the same."""
    ha, hb = _header(a), _header(b)
    ea, eb = json.loads(ha), json.loads(hb)
    ea.pop("__metadata__", None), eb.pop("__metadata__", None)
    assert ea == eb and a.stat().st_size == b.stat().st_size, (a, b)
    data = b.read_bytes()[8 + len(hb):]
    b.write_bytes(struct.pack("<Q", len(ha)) + ha + data)


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else \
                hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


# -- one run of a case --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    rc: int | None = None
    exit_text: str = ""  # for the table (e.g. "0 and 0" for two racing merges)
    stderr: str = ""
    output_left: bool = False
    output_valid: bool | None = None
    temps: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # inputs whose bytes changed
    offender: list[Path] = field(default_factory=list)  # the error line must name one of these
    extra: list[str] = field(default_factory=list)  # case-specific problems
    note: str = ""
    skipped: str | None = None
    seconds: float = 0.0

    @property
    def error_lines(self) -> list[str]:
        return [l for l in self.stderr.splitlines() if l.startswith("error:")]


class Ctx:
    """A case's own folder (output folder inside), the inputs, and the sha256 of every input it uses."""

    def __init__(self, root: Path, inputs: Inputs, case_id: str):
        self.dir = root / re.sub(r"[^\w.-]", "_", case_id)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.outdir = self.dir / "out"
        self.outdir.mkdir(parents=True)
        self.inputs = inputs
        self.out = self.outdir / OUT_NAME
        self.watched: dict[Path, str | None] = {}

    def watch(self, *paths: Path) -> None:
        for p in paths:
            self.watched[Path(p)] = sha256(Path(p))

    def copy(self, src: Path, name: str | None = None) -> Path:
        dst = self.dir / (name or src.name)
        shutil.copyfile(src, dst)
        return dst

    def write(self, name: str, data: bytes) -> Path:
        p = self.dir / name
        p.write_bytes(data)
        return p

    def temps(self) -> list[str]:
        found = {str(p) for p in self.dir.rglob("*.partial")}
        for p in self.watched:
            found |= {str(x) for x in p.parent.glob("*.partial")}
        return sorted(found)

    def finish(self, o: Outcome, output: Path | None = None) -> Outcome:
        output = output or self.out
        o.output_left = os.path.lexists(output)
        if o.output_left:
            o.output_valid = valid_safetensors(output)
        o.temps = self.temps()
        o.changed = [str(p) for p, h in self.watched.items() if sha256(p) != h]
        if o.rc is not None and not o.exit_text:
            o.exit_text = exit_text(o.rc)
        return o


def exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"{rc} ({signal.Signals(-rc).name})"
        except ValueError:
            return str(rc)
    return str(rc)


def valid_safetensors(path: Path) -> bool:
    """Whether `path` is a complete safetensors file (the reference reader; no converter code)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            for k in f.keys():
                f.get_slice(k)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            head = json.loads(fh.read(n))
        end = max([v["data_offsets"][1] for k, v in head.items() if k != "__metadata__"] or [0])
        return os.path.getsize(path) == 8 + n + end
    except Exception:  # noqa: BLE001 - any failure means not valid
        return False


def merge_args(base: Path, loras: list, out: Path, *extra: str) -> list[str]:
    return [str(base), *map(str, loras), "-o", str(out), "-q", *extra]


def run_cli(args: list[str], *, env: dict | None = None, prefix: list[str] | None = None,
            timeout: float = CASE_TIMEOUT) -> Outcome:
    t0 = time.monotonic()
    r = subprocess.run([*(prefix or []), *cli_command(), *args], capture_output=True, text=True,
                       env=env or child_env(), timeout=timeout, stdin=subprocess.DEVNULL)
    return Outcome(rc=r.returncode, stderr=r.stderr, seconds=time.monotonic() - t0)


def spawn(args: list[str], *, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*cli_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or child_env(), stdin=subprocess.DEVNULL)


def collect(proc: subprocess.Popen, timeout: float = CASE_TIMEOUT) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err += "\n[fault matrix: killed after the timeout]"
    return proc.returncode, err


# -- the cases ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    what: str
    run: Callable[[Ctx], Outcome]
    exit: tuple[int, ...] = (2,)
    cause: str = ""  # regex for the error line (case-insensitive); "" with exit (0,) or a SIGKILL
    names: bool = True  # the error line must name the offending file
    allow_temp: bool = False  # SIGKILL: the dead process's temp file may remain
    want_output: bool = False  # success cases: a complete output must exist
    today: str | None = None  # why it fails with today's code (an xfail reason); None: it holds
    heavy: bool = False  # runs a real merge (imports torch: seconds); scheduled first


def _names(line: str, paths: list[Path]) -> bool:
    for p in paths:
        if str(p) in line:
            return True
        if re.search(r"(?<![\w./-])" + re.escape(p.name) + r"(?![\w-]|\.\w)", line):
            return True
    return False


def problems(case: Case, o: Outcome) -> list[str]:
    """Everything in `o` that breaks the case's expectations (empty: the case holds)."""
    out: list[str] = []
    if o.rc not in case.exit:
        out.append(f"exit {o.exit_text or o.rc}, expected {' or '.join(map(str, case.exit))}")
    error_expected = case.exit != (0,) and case.exit != (-signal.SIGKILL,)
    if "Traceback" in o.stderr or "internal error" in o.stderr:
        out.append("a traceback or internal error on stderr")
    if error_expected:
        lines = o.error_lines
        if len(lines) != 1:
            out.append(f"{len(lines)} 'error:' lines, expected exactly one")
        if lines:
            bare = re.sub(r"(?:[A-Za-z]:)?[\\/][^\s:'\"(),]+", "<path>", lines[0])  # the cause, not a folder name
            if case.cause and not re.search(case.cause, bare, re.I):
                out.append(f"the error line does not give the cause /{case.cause}/")
            if case.names and o.offender and not _names(lines[0], o.offender):
                out.append(f"the error line does not name {' or '.join(str(p) for p in o.offender)}")
    elif case.exit == (0,) and o.error_lines:
        out.append("an 'error:' line although the run should succeed")
    if case.want_output:
        if not (o.output_left and o.output_valid):
            out.append("no complete output file" if not o.output_left else "the output file is not a complete "
                       "safetensors file")
    elif o.output_left:
        out.append("a file was left at the output path")
    if o.temps and not (case.allow_temp and len(o.temps) == 1):
        out.append(f"temp files left: {', '.join(os.path.basename(x) for x in o.temps)}")
    if o.changed:
        out.append(f"inputs changed: {', '.join(o.changed)}")
    return out + o.extra


# hostile LoRA files for the tiny base: each is (file bytes); the merge must refuse them (or take them) cleanly
def _lora_with(head: dict, data: bytes, meta: dict | None = None) -> bytes:
    return st_bytes({"__metadata__": meta, **head} if meta else head, data)


def hostile_overlap() -> bytes:
    head, data = good_module()
    head[f"{MODULE}.lora_B.weight"]["data_offsets"] = [0, 2048]  # lora_B aliases lora_A's bytes
    return _lora_with(head, data)


def hostile_out_of_range() -> bytes:
    head, data = good_module()
    return _lora_with(head, data[:3000])  # lora_B ends past the end of the file


def hostile_offsets_strings() -> bytes:
    head, data = good_module()
    head[f"{MODULE}.lora_A.weight"]["data_offsets"] = ["0", "2048"]
    return _lora_with(head, data)


def hostile_duplicate_keys() -> bytes:
    head, data = good_module()
    raw = json.dumps(head, separators=(",", ":"))
    dup = json.dumps({f"{MODULE}.lora_A.weight": t("BF16", (4, DIM), 2048)}, separators=(",", ":"))[1:-1]
    return st_bytes((raw[:-1] + "," + dup + "}").encode(), data)  # lora_A twice: the second silently wins today


def hostile_dtype(dtype) -> Callable[[], bytes]:
    def make() -> bytes:
        head, data = good_module()
        head[f"{MODULE}.lora_A.weight"]["dtype"] = dtype
        return _lora_with(head, data)
    return make


def hostile_rank0(alpha: bool) -> Callable[[], bytes]:
    def make() -> bytes:
        head = {f"{MODULE}.lora_A.weight": t("BF16", (0, DIM), 0), f"{MODULE}.lora_B.weight": t("BF16", (DIM, 0), 0)}
        data = b""
        if alpha:
            head[f"{MODULE}.alpha"] = t("F32", (), 0)
            data = struct.pack("<f", 8.0)
        return _lora_with(head, data)
    return make


def hostile_zero_dim() -> bytes:
    head = {f"{MODULE}.lora_A.weight": t("BF16", (4, 0), 0), f"{MODULE}.lora_B.weight": t("BF16", (DIM, 4), 0)}
    return _lora_with(head, bf16_bytes(DIM * 4, 1))


def hostile_negative(both: bool) -> Callable[[], bytes]:
    def make() -> bytes:
        head, data = good_module()
        # shape (-4, 256) with data_offsets [2048, 0]: end - start = -2048 = prod(shape) * 2, "consistent"
        head[f"{MODULE}.lora_A.weight"] = {"dtype": "BF16", "shape": [-4, DIM], "data_offsets": [2048, 0]}
        if both:
            head[f"{MODULE}.lora_B.weight"] = {"dtype": "BF16", "shape": [DIM, -4], "data_offsets": [4096, 2048]}
        return _lora_with(head, data)
    return make


def hostile_non_utf8_metadata() -> bytes:
    head, data = good_module()
    raw = json.dumps(head, separators=(",", ":")).encode()
    return st_bytes(b'{"__metadata__":{"note":"caf\xe9 \xff"},' + raw[1:], data)  # latin-1 bytes in a value


def hostile_deep_json() -> bytes:
    return st_bytes(b"[" * 100_000 + b"]" * 100_000)


def hostile_adapter_meta_deep() -> bytes:
    head, data = good_module()
    return _lora_with(head, data, {"lora_adapter_metadata": "[" * 50_000 + "]" * 50_000})


def hostile_lokr_scalar_factor() -> bytes:
    head = {f"{MODULE}.lokr_w1_a": t("BF16", (16, 2), 0), f"{MODULE}.lokr_w1_b": t("BF16", (), 64),
            f"{MODULE}.lokr_w2": t("BF16", (16, 16), 66)}
    return _lora_with(head, bf16_bytes(32 + 1 + 256, 3))


def _hostile_lora_case(make: Callable[[], bytes], *extra: str) -> Callable[[Ctx], Outcome]:
    def run(ctx: Ctx) -> Outcome:
        lora = ctx.write("hostile.safetensors", make())
        ctx.watch(ctx.inputs.base, lora)
        o = run_cli(merge_args(ctx.inputs.base, [lora], ctx.out, "--mod", "skip", *extra))
        o.offender = [lora]
        return ctx.finish(o)
    return run


def run_header_over_limit(ctx: Ctx) -> Outcome:
    lora = ctx.dir / "huge-header.safetensors"
    with open(lora, "wb") as f:  # sparse: the length field says MAX_HEADER + 8 and the file is that long
        f.write(struct.pack("<Q", MAX_HEADER + 8))
        f.truncate(8 + MAX_HEADER + 8 + 4096)
    ctx.watch(ctx.inputs.base, lora)
    o = run_cli(merge_args(ctx.inputs.base, [lora], ctx.out, "--mod", "skip"))
    o.offender = [lora]
    return ctx.finish(o)


def run_header_huge_valid(ctx: Ctx) -> Outcome:
    """A valid header just under the limit (the real entries, then ~100 MB of JSON whitespace): accepted."""
    head, data = good_module()
    raw = json.dumps(head, separators=(",", ":")).encode()
    n = MAX_HEADER - 64
    lora = ctx.dir / "big-header.safetensors"
    with open(lora, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.write(raw[:-1])
        f.write(b" " * (n - len(raw)))
        f.write(b"}")
        f.write(data)
    ctx.watch(ctx.inputs.base, lora)
    o = run_cli(merge_args(ctx.inputs.base, [lora], ctx.out, "--mod", "skip", "--dry-run"))
    o.note = f"header {n >> 20} MB, --dry-run"
    return ctx.finish(o)


def run_zero_size(ctx: Ctx) -> Outcome:
    """A zero-size tensor in the base and one in the LoRA (an ignored text-encoder key): merged normally."""
    src = ctx.inputs.base
    with open(src, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
        data = f.read()
    end = max(v["data_offsets"][1] for k, v in head.items() if k != "__metadata__")
    head["zero_size.weight"] = {"dtype": "BF16", "shape": [0, 16], "data_offsets": [end, end]}
    base = ctx.write("base-zero.safetensors", st_bytes(head, data))
    lhead, ldata = good_module()
    lhead["lora_te_text_model_encoder.lora_down.weight"] = t("BF16", (0, 8), len(ldata))
    lora = ctx.write("lora-zero.safetensors", _lora_with(lhead, ldata))
    ctx.watch(base, lora)
    o = run_cli(merge_args(base, [lora], ctx.out, "--mod", "skip"))
    ctx.finish(o)
    if o.output_valid:
        from safetensors import safe_open

        with safe_open(str(ctx.out), "np") as f:
            if "zero_size.weight" not in f.keys() or tuple(f.get_slice("zero_size.weight").get_shape()) != (0, 16):
                o.extra.append("the zero-size base tensor is not in the output as it was")
    return o


def run_bad_spec(spec_suffix: str) -> Callable[[Ctx], Outcome]:
    def run(ctx: Ctx) -> Outcome:
        lora = ctx.copy(ctx.inputs.lora)
        ctx.watch(ctx.inputs.base, lora)
        o = run_cli(merge_args(ctx.inputs.base, [f"{lora}{spec_suffix}"], ctx.out, "--mod", "skip"))
        o.offender = [lora]
        return ctx.finish(o)
    return run


def run_lora_folder(ctx: Ctx) -> Outcome:
    """A folder (holding a LoRA, but not PEFT's save_pretrained pair) given as the LoRA."""
    folder = ctx.dir / "lora-dir"
    folder.mkdir()
    lora = Path(shutil.copyfile(ctx.inputs.lora, folder / "style.safetensors"))
    ctx.watch(ctx.inputs.base, lora)
    o = run_cli(merge_args(ctx.inputs.base, [folder], ctx.out, "--mod", "skip"))
    o.offender = [folder]
    return ctx.finish(o)


def run_swapped(ctx: Ctx) -> Outcome:
    lora = ctx.copy(ctx.inputs.lora)
    ctx.watch(ctx.inputs.base, lora)
    o = run_cli(merge_args(lora, [ctx.inputs.base], ctx.out, "--mod", "skip"))
    o.offender = [lora]
    return ctx.finish(o)


def run_usage_error(ctx: Ctx) -> Outcome:
    """Click's own parsing fails (an option that does not exist): one `error:` line too, exit 2."""
    lora = ctx.copy(ctx.inputs.lora)
    ctx.watch(ctx.inputs.base, lora)
    o = run_cli(merge_args(ctx.inputs.base, [lora], ctx.out, "--strength", "0.8"))
    if len([l for l in o.stderr.splitlines() if l.strip()]) != 1:
        o.extra.append("more than one line on stderr")
    return ctx.finish(o)


def run_batch_bad_strength(ctx: Ctx) -> Outcome:
    lora = ctx.copy(ctx.inputs.lora)
    plan = ctx.write("plan.json", json.dumps({"outputs": [{"output": str(ctx.out), "loras": [
        {"path": str(lora), "strength": "strong"}]}]}).encode())
    ctx.watch(ctx.inputs.base, lora, plan)
    o = run_cli(["batch", str(ctx.inputs.base), str(plan), "-q", "--mod", "skip"])
    o.offender = [plan]
    return ctx.finish(o)


_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
          "F8_E4M3": 1, "F8_E5M2": 1}


def hostile_base(src: Path, dst: Path, mutate: Callable[[dict], None]) -> Path:
    """`src`'s header, changed by `mutate(header)`, offsets recomputed, over a sparse all-zero data section."""
    head = json.loads(_header(src))
    mutate(head)
    meta, entries, pos = head.pop("__metadata__", None), {}, 0
    for name, e in head.items():
        n = _SIZES[e["dtype"]]
        for d in e["shape"]:
            n *= d
        entries[name] = {**e, "data_offsets": [pos, pos + n]}
        pos += n
    raw = st_bytes({"__metadata__": meta, **entries} if meta is not None else entries)
    with open(dst, "wb") as f:
        f.write(raw)
        f.truncate(len(raw) + pos)
    return dst


def _set_quant_config(text: str) -> Callable[[dict], None]:
    return lambda h: h["__metadata__"].__setitem__("quantization_config", text)


def _flatten_qweight(h: dict) -> None:
    e = h["transformer_blocks.0.attn.to_qkv.qweight"]
    e["shape"] = [e["shape"][0] * e["shape"][1]]  # the same bytes as one row


def run_hostile_base(mutate: Callable[[dict], None]) -> Callable[[Ctx], Outcome]:
    def run(ctx: Ctx) -> Outcome:
        base = hostile_base(ctx.inputs.base, ctx.dir / "hostile-base.safetensors", mutate)
        ctx.watch(base, ctx.inputs.lora)
        o = run_cli(merge_args(base, [ctx.inputs.lora], ctx.out, "--mod", "skip"))
        o.offender = [base]
        return ctx.finish(o)
    return run


def run_base_truncated(ctx: Ctx) -> Outcome:
    base = ctx.copy(ctx.inputs.base, "truncated-base.safetensors")
    with open(base, "r+b") as f:
        f.truncate(base.stat().st_size // 2)
    ctx.watch(base, ctx.inputs.lora)
    o = run_cli(merge_args(base, [ctx.inputs.lora], ctx.out, "--mod", "skip"))
    o.offender = [base]
    return ctx.finish(o)


# -- output folder and output path ------------------------------------------------------------------------
def _mount_tmpfs(where: Path, opts: str) -> str | None:
    """Mount a tmpfs at `where`; None on success, else why not (the case is then skipped)."""
    if os.name != "posix" or not shutil.which("mount"):
        return "no mount(8) here"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CAP_SYS_ADMIN); not root here"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs refused here: {r.stderr.strip() or r.returncode}"


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)
    if os.path.ismount(where):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def run_disk_full(ctx: Ctx) -> Outcome:
    mnt = ctx.dir / "small-disk"
    mnt.mkdir()
    why = _mount_tmpfs(mnt, "size=4m")
    if why:
        return Outcome(skipped=f"disk full needs a size-limited tmpfs: {why}")
    try:
        out = mnt / OUT_NAME
        ctx.watch(ctx.inputs.big, ctx.inputs.big_lora)
        o = run_cli(merge_args(ctx.inputs.big, [ctx.inputs.big_lora], out, *BIG_ARGS))
        o.offender = [out]
        o.note = "output on a 4 MB tmpfs; the merge writes ~16 MB"
        leftovers = [str(p) for p in mnt.iterdir()]
        ctx.finish(o, output=out)
        o.temps = sorted(set(o.temps) | {p for p in leftovers if p.endswith(".partial")})
        return o
    finally:
        _umount(mnt)


def run_read_only(ctx: Ctx) -> Outcome:
    ro = ctx.dir / "read-only"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is needed
        why = _mount_tmpfs(ro, "ro,size=1m")
        if why:
            return Outcome(skipped=f"read-only folder as root needs a read-only mount: {why}")
        mounted = True
    else:
        ro.chmod(0o555)
    try:
        out = ro / OUT_NAME
        ctx.watch(ctx.inputs.base, ctx.inputs.lora)
        o = run_cli(merge_args(ctx.inputs.base, [ctx.inputs.lora], out, "--mod", "skip"))
        o.offender = [out]
        return ctx.finish(o, output=out)
    finally:
        if mounted:
            _umount(ro)
        else:
            ro.chmod(0o755)


def run_ulimit(ctx: Ctx) -> Outcome:
    limit = 4 << 20
    wrapper = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
               f"({limit}, {limit})); os.execvp(sys.argv[1], sys.argv[1:])"]  # = `ulimit -f 4096; exec ...`
    ctx.watch(ctx.inputs.big, ctx.inputs.big_lora)
    o = run_cli(merge_args(ctx.inputs.big, [ctx.inputs.big_lora], ctx.out, *BIG_ARGS), prefix=wrapper)
    o.offender = [ctx.out]
    o.note = "RLIMIT_FSIZE 4 MB; the merge writes ~16 MB"
    return ctx.finish(o)


def run_symlink(target: str) -> Callable[[Ctx], Outcome]:
    def run(ctx: Ctx) -> Outcome:
        base, lora = ctx.copy(ctx.inputs.base), ctx.copy(ctx.inputs.lora)
        victim = base if target == "base" else lora
        link = ctx.outdir / OUT_NAME
        link.symlink_to(victim)
        ctx.watch(base, lora)
        o = run_cli(merge_args(base, [lora], link, "--mod", "skip", "--overwrite"))
        o.offender = [link, victim]
        ctx.finish(o)
        o.output_left = False  # the link was there before; it must still be the same link onto the input
        if not (link.is_symlink() and os.readlink(link) == str(victim)):
            o.extra.append("the symlink at the output path was replaced")
        return o
    return run


# -- signals and inputs changing under a running merge -----------------------------------------------------
# A merge of the 6-block base spends ~2.5 s importing torch (while the unchanged tensors are copied) and then
# writes its layers in a fraction of a second. To land exactly at a point of the write on any machine, the
# merge is run in short slices once its temp file exists (SIGCONT, a few ms, SIGSTOP) and signalled while
# stopped, as soon as its temp file holds the point's bytes.
POINTS = {  # where the signal lands: bytes in the temp file, as a fraction of the base (buffered writer: the temp
    # file grows tensor by tensor); None: the header and 4 KiB more, i.e. the writer's threads have started copying
    "start": None,  # base copies running, torch still loading
    "mid": 0.5,  # half the base's size written
    "late": 1.0,  # the base's size written (the output is ~1.4x the base): the last layers
}
SLICE = 0.004  # seconds a stepped merge runs between two looks at its temp file


def _stop(proc: subprocess.Popen) -> None:
    """SIGSTOP and wait until every thread is stopped (Linux: /proc state T), so the file sizes hold still."""
    os.kill(proc.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X"):
                return
        except (OSError, IndexError):
            time.sleep(0.01)
            return
        time.sleep(0.0002)


def _temp(ctx: Ctx, min_bytes: int = 0, skip: tuple[Path, ...] = ()) -> Path | None:
    for p in ctx.outdir.glob(f".{OUT_NAME}.*.partial"):
        try:
            if p not in skip and p.stat().st_size >= min_bytes:
                return p
        except FileNotFoundError:
            pass
    return None


def stop_at(ctx: Ctx, proc: subprocess.Popen, min_bytes: int = 0, skip: tuple[Path, ...] = (),
            timeout: float = 60.0) -> Path | None:
    """Run `proc` until its temp file exists and holds `min_bytes`; return it with `proc` STOPPED (SIGCONT it
    after). None (and `proc` running) if the merge ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None and _temp(ctx, 0, skip) is None:
        time.sleep(0.002)  # free-running until the temp file exists
    stepping = False
    while time.monotonic() < end and proc.poll() is None:
        if stepping:
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(SLICE)
        _stop(proc)
        stepping = True
        tmp = _temp(ctx, min_bytes, skip)
        if tmp is not None:
            return tmp
    if proc.poll() is None and stepping:
        os.kill(proc.pid, signal.SIGCONT)
    return None


def _signal_at(ctx: Ctx, point: str, sig: int) -> Outcome:
    base, lora = ctx.inputs.big, ctx.inputs.big_lora
    frac = POINTS[point]
    min_bytes = 8 + len(_header(base)) + 4096 if frac is None else int(base.stat().st_size * frac)
    t0 = time.monotonic()
    proc = spawn(merge_args(base, [lora], ctx.out, *BIG_ARGS), env=child_env(QWENLORA_MERGE_DIRECT_IO="0"))
    tmp = stop_at(ctx, proc, min_bytes)
    o = Outcome()
    if tmp is None:
        o.rc, o.stderr = collect(proc)
        o.extra.append(f"the merge ended (exit {o.rc}) before the {point} point: no signal sent")
        return o
    size = tmp.stat().st_size
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    o.note = f"signalled at {size / 1e6:.1f} MB written (base {base.stat().st_size / 1e6:.1f} MB)"
    o.rc, o.stderr = collect(proc)
    o.seconds = time.monotonic() - t0
    return o


def run_signal(point: str, sig: int) -> Callable[[Ctx], Outcome]:
    def run(ctx: Ctx) -> Outcome:
        ctx.watch(ctx.inputs.big, ctx.inputs.big_lora)
        o = _signal_at(ctx, point, sig)
        o.offender = [ctx.out]
        return ctx.finish(o)
    return run


# Signals in the first second: while the tool imports its modules, reads the headers and plans, before any temp
# file exists. Each instant is counted from the moment the tool's handler is in place, read from the kernel's
# /proc/<pid>/status SigCgt mask (before that the interpreter itself is starting: Python's own defaults apply).
EARLY_STEP, EARLY_END = 0.05, 1.0


def _handler_installed(pid: int, timeout: float = 30.0) -> bool:
    """Wait until `pid` catches SIGHUP (its SigCgt bit is set), the last of the three signals the tool's handler
    takes (SIGINT alone would not do: the interpreter catches it from its start); False if it exited first."""
    status, bit = Path(f"/proc/{pid}/status"), 1 << (signal.SIGHUP - 1)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            line = next(l for l in status.read_text().splitlines() if l.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return False
        if int(line.split()[1], 16) & bit:
            return True
        time.sleep(0.0005)
    return False


def run_signal_early(sig: int, step: float = EARLY_STEP) -> Callable[[Ctx], Outcome]:
    """One merge per instant 0, step, 2 step, ... EARLY_END s after the handler is in place, each signalled then.
    A merge that already finished (on a fast machine the last instants can come after the output was published)
    must say so and leave a complete output, which is then removed for the next instant. The outcome is the first
    run that broke a rule (or the last run); the note counts the exits."""
    def run(ctx: Ctx) -> Outcome:
        if not Path("/proc/self/status").exists():
            return Outcome(skipped="needs /proc/<pid>/status (Linux) to know when the handler is in place")
        ctx.watch(ctx.inputs.big, ctx.inputs.big_lora)
        instants = [round(i * step, 3) for i in range(int(round(EARLY_END / step)) + 1)]
        exits: dict[str, int] = {}
        worst, typical, finished = None, None, 0
        for at in instants:
            one = ctx.finish(_signal_early_once(ctx, sig, at))
            exits[one.exit_text] = exits.get(one.exit_text, 0) + 1
            if one.output_left and _finished_run_ok(one):
                finished += 1
                ctx.out.unlink()
                continue
            typical = one
            if worst is None and _early_broke(one):
                worst, one.note = one, f"at {at:.2f} s after the handler was installed"
        if typical is None:
            typical = Outcome(rc=None, extra=["every merge finished before its signal: nothing was tested"])
        o = worst or typical
        o.exit_text = ", ".join(f"{k} x{v}" for k, v in exits.items())
        o.note = (f"{len(instants)} instants 0-{EARLY_END:.1f} s after the handler was installed"
                  + (f", {finished} after the output was complete (said so)" if finished else "")
                  + (f"; first failure {o.note}" if worst else ""))
        return o
    return run


def _finished_run_ok(o: Outcome) -> bool:
    """A signal after the merge published its output: the output complete and no temp file left, and either one error
    line saying the output is complete (exit 128+n), or none at all (exit 0: it came once the exit code was decided,
    when the signals are blocked)."""
    said_written = len(o.error_lines) == 1 and re.search(r"written|complete", o.error_lines[0]) is not None
    return bool(o.output_valid) and not o.temps and (said_written or (o.rc == 0 and not o.error_lines))


def _early_broke(o: Outcome) -> bool:
    return bool(o.output_left or o.temps or o.extra or len(o.error_lines) != 1 or "Traceback" in o.stderr
                or "internal error" in o.stderr or o.rc not in (130, 143, 129))


def _signal_early_once(ctx: Ctx, sig: int, at: float) -> Outcome:
    proc = spawn(merge_args(ctx.inputs.big, [ctx.inputs.big_lora], ctx.out, *BIG_ARGS))
    o = Outcome(offender=[ctx.out])
    if not _handler_installed(proc.pid):
        o.extra.append("the handler was never installed (or the merge ended first)")
    else:
        time.sleep(at)
        if proc.poll() is None:
            proc.send_signal(sig)
        else:
            o.extra.append(f"the merge ended before {at:.2f} s: no signal sent")
    o.rc, o.stderr = collect(proc)
    o.exit_text = exit_text(o.rc)
    return o


# A separate process (no GIL shared with the test's threads) blocks on inotify and SIGSTOPs the merge the moment
# its temp file is created: the merge is then stopped microseconds after mkstemp(), before its writer exists.
_WATCHER = r"""
import ctypes, ctypes.util, os, signal, struct, sys
folder, prefix = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
fd = libc.inotify_init1(os.O_CLOEXEC)
if fd < 0 or libc.inotify_add_watch(fd, folder.encode(), 0x100 | 0x80) < 0:  # IN_CREATE | IN_MOVED_TO
    print("no-inotify", flush=True)
    sys.exit(0)
print("ready", flush=True)
pid = int(sys.stdin.readline())
while True:
    buf = os.read(fd, 65536)
    while buf:
        n = struct.unpack_from("iIII", buf)[3]
        name = buf[16:16 + n].rstrip(b"\0").decode(errors="replace")
        buf = buf[16 + n:]
        if name.startswith(prefix) and name.endswith((".partial", ".creating")):
            os.kill(pid, signal.SIGSTOP)
            print(name, flush=True)
            sys.exit(0)
"""


def run_signal_at_create(sig: int, attempts: int = 6) -> Callable[[Ctx], Outcome]:
    """The signal the moment the temp file is created: stopped by an inotify watcher process within microseconds
    of mkstemp(), then signalled. The writer does not exist yet for its caller there, so a handler that raises
    leaves the temp file behind. A few attempts, each into its own folder; the first that goes wrong is
    reported."""
    def run(ctx: Ctx) -> Outcome:
        if not sys.platform.startswith("linux"):
            return Outcome(skipped="catching the temp file's creation needs Linux inotify")
        ctx.watch(ctx.inputs.big, ctx.inputs.big_lora)
        results = []
        for i in range(attempts):
            out = ctx.dir / f"try{i}" / OUT_NAME
            out.parent.mkdir()
            watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(out.parent), f".{OUT_NAME}."],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                if watcher.stdout.readline().strip() != "ready":
                    return Outcome(skipped="catching the temp file's creation needs Linux inotify")
                proc = spawn(merge_args(ctx.inputs.big, [ctx.inputs.big_lora], out, *BIG_ARGS),
                             env=child_env(QWENLORA_MERGE_DIRECT_IO="0"))
                watcher.stdin.write(f"{proc.pid}\n")
                watcher.stdin.flush()
                name = None
                end = time.monotonic() + 60
                while time.monotonic() < end and proc.poll() is None and watcher.poll() is None:
                    time.sleep(0.005)
                if watcher.poll() is not None:
                    name = watcher.stdout.readline().strip() or None
                if name is not None:
                    _stop(proc)  # already stopped by the watcher; this waits until it shows
                    os.kill(proc.pid, sig)
                    os.kill(proc.pid, signal.SIGCONT)
                rc, err = collect(proc)
            finally:
                if watcher.poll() is None:
                    watcher.kill()
                watcher.wait()
            left = sorted(str(p) for p in out.parent.iterdir())
            results.append((rc, err, name, left, out))
            if left or name is None:
                break  # the first that goes wrong is the answer
        rc, err, name, left, out = results[-1]
        o = Outcome(rc=rc, stderr=err, offender=[out])
        o.note = f"signalled as the temp file appeared; {len(results)} attempt(s), " + (
            f"the last left {len(left)} file(s)" if left else "nothing left")
        if name is None:
            o.extra.append("the merge ended before its temp file appeared: no signal sent")
        ctx.finish(o, output=out)
        o.output_left = any(r[4].exists() for r in results)
        return o
    return run


def run_kill_then_rerun(ctx: Ctx) -> Outcome:
    """SIGKILL leaves the dead process's temp file; the next run to the same output must clean it up."""
    ctx.watch(ctx.inputs.big, ctx.inputs.big_lora)
    killed = _signal_at(ctx, "start", signal.SIGKILL)
    left = ctx.temps()
    o = run_cli(merge_args(ctx.inputs.big, [ctx.inputs.big_lora], ctx.out, *BIG_ARGS))
    o.extra += killed.extra
    o.note = f"SIGKILL left {len(left)} temp file; then the same merge again"
    return ctx.finish(o)


def run_changed_while_read(which: str, how: str) -> Callable[[Ctx], Outcome]:
    def run(ctx: Ctx) -> Outcome:
        base, lora = ctx.copy(ctx.inputs.big), ctx.copy(ctx.inputs.big_lora)
        victim, other = (base, lora) if which == "base" else (lora, base)
        alt = ctx.inputs.big_alt if which == "base" else ctx.inputs.big_lora_alt
        ctx.watch(other)
        proc = spawn(merge_args(base, [lora], ctx.out, *BIG_ARGS))
        o = Outcome()
        if stop_at(ctx, proc) is None:
            o.extra.append("the merge ended before the input could be changed")
        else:  # stopped after planning, with the writer started; the layers are read after torch has loaded
            with open(victim, "r+b") as f:  # in place (same inode), as an editor or a download would
                if how == "truncated":
                    f.truncate(8 + len(_header(victim)))  # header only: every tensor is gone
                else:
                    f.write(alt.read_bytes())  # same size and header, other values
            os.kill(proc.pid, signal.SIGCONT)
        ctx.watch(victim)  # from here on: what the case left there must stay
        o.rc, o.stderr = collect(proc)
        o.offender = [victim]
        return ctx.finish(o)
    return run


def run_race(ctx: Ctx) -> Outcome:
    """Two merges to one output without --overwrite, both past their start-up checks before either finishes:
    one writes it, the other must refuse (not replace it)."""
    ctx.watch(ctx.inputs.big, ctx.inputs.big_lora)
    args = merge_args(ctx.inputs.big, [ctx.inputs.big_lora], ctx.out, *BIG_ARGS)
    first = spawn(args)
    o = Outcome()
    t1 = stop_at(ctx, first)  # the first has checked that the output does not exist, and started writing
    second = spawn(args)
    if t1 is None:
        o.extra.append("the first merge ended before the second started")
    else:
        t2 = stop_at(ctx, second, skip=(t1,))  # so has the second
        for p in (first, second) if t2 is not None else (first,):
            os.kill(p.pid, signal.SIGCONT)
    (rc1, err1), (rc2, err2) = collect(first), collect(second)
    o.exit_text = f"{rc1} and {rc2}"
    o.rc = max(rc1, rc2)  # the loser's
    o.stderr = err1 + err2
    o.offender = [ctx.out]
    if sorted((rc1, rc2)) == [0, 0]:
        o.extra.append("both merges exited 0: the second replaced the first's output without --overwrite")
    return ctx.finish(o)


# -- the matrix --------------------------------------------------------------------------------------------
_SIG_CAUSE = r"interrupt|terminat|signal"
_POINT_TEXT = (("start", "once the writer's threads have started copying (the temp file past its header)"),
               ("mid", "with half the base's size written"), ("late", "with the base's size written"))
CASES: list[Case] = [
    # hostile inputs (tiny base; refused while planning, before any write)
    Case("lora-header-over-limit", "LoRA header length 100 MB + 8 (the reader's limit is 100 MB)",
         run_header_over_limit, cause=r"header.*(limit|too (large|long|big)|exceeds|MB)"),
    Case("lora-header-100mb-valid", "LoRA with a valid ~100 MB JSON header (just under the limit), --dry-run",
         run_header_huge_valid, exit=(0,)),
    Case("lora-header-deep-nesting", "LoRA header of 100k nested JSON arrays",
         _hostile_lora_case(hostile_deep_json), cause=r"JSON|nest|deep"),
    Case("lora-offsets-overlap", "lora_B's data_offsets alias lora_A's bytes",
         _hostile_lora_case(hostile_overlap), cause=r"overlap"),
    Case("lora-offsets-out-of-range", "lora_B ends past the end of the file",
         _hostile_lora_case(hostile_out_of_range), cause=r"offset|truncated|end of (the )?file|beyond"),
    Case("lora-offsets-not-integers", "data_offsets [\"0\", \"2048\"]",
         _hostile_lora_case(hostile_offsets_strings), cause=r"offset|bad entry"),
    Case("lora-duplicate-keys", "lora_A twice in the header JSON",
         _hostile_lora_case(hostile_duplicate_keys), cause=r"duplicate|twice"),
    Case("lora-unknown-dtype", "dtype F8_E8M0", _hostile_lora_case(hostile_dtype("F8_E8M0")), cause=r"dtype"),
    Case("lora-dtype-not-a-string", "dtype [\"BF16\"]", _hostile_lora_case(hostile_dtype(["BF16"])),
         cause=r"dtype|bad entry"),
    Case("zero-size-tensors", "a [0, 16] tensor in the base and a [0, 8] text-encoder tensor in the LoRA",
         run_zero_size, exit=(0,), want_output=True, heavy=True),
    Case("lora-rank-0", "lora_A [0, 256] and lora_B [256, 0]", _hostile_lora_case(hostile_rank0(False)),
         cause=r"rank 0|rank of 0|zero rank|empty"),
    Case("lora-rank-0-alpha", "lora_A [0, 256], lora_B [256, 0] and an alpha",
         _hostile_lora_case(hostile_rank0(True)), cause=r"rank 0|rank of 0|zero rank|empty"),
    Case("lora-zero-dim", "lora_A [4, 0] for a 256-wide layer", _hostile_lora_case(hostile_zero_dim),
         cause=r"expects|shape|size"),
    Case("lora-negative-dim", "lora_A shape [-4, 256] with data_offsets [2048, 0]",
         _hostile_lora_case(hostile_negative(False)), cause=r"negative"),
    Case("lora-negative-dims-consistent", "lora_A [-4, 256] and lora_B [256, -4], offsets to match",
         _hostile_lora_case(hostile_negative(True)), cause=r"negative"),
    Case("lora-lokr-scalar-factor", "a LoKr module whose lokr_w1_b is 0-D",
         _hostile_lora_case(hostile_lokr_scalar_factor),
         cause=r"matri|shape|factor"),
    Case("lora-non-utf8-metadata", "a metadata value with bytes E9 FF (not UTF-8)",
         _hostile_lora_case(hostile_non_utf8_metadata), cause=r"UTF-?8"),
    Case("lora-adapter-metadata-deep-nesting", "lora_adapter_metadata of 50k nested JSON arrays",
         _hostile_lora_case(hostile_adapter_meta_deep), cause=r"lora_adapter_metadata|JSON"),
    Case("lora-spec-colon-nothing", "LORA argument 'lora.safetensors:' (nothing after the colon)",
         run_bad_spec(":"), cause=r"nothing after ':'.*strength"),
    Case("lora-spec-nan", "LORA argument 'lora.safetensors:nan'", run_bad_spec(":nan"), cause=r"finite|strength"),
    Case("lora-spec-decimal-comma", "LORA argument 'lora.safetensors:0,8' (a decimal comma)", run_bad_spec(":0,8"),
         cause=r"strength '0,8'.*not a number.*:0\.8"),
    Case("lora-spec-not-a-number", "LORA argument 'lora.safetensors:abc'", run_bad_spec(":abc"),
         cause=r"strength 'abc'.*not a number"),
    Case("lora-is-a-folder", "a folder holding a LoRA given as the LoRA", run_lora_folder,
         cause=r"is a folder, not a LoRA file.*style\.safetensors"),
    Case("base-and-lora-swapped", "the LoRA given as BASE and the checkpoint as LORA", run_swapped,
         cause=r"swapped"),
    Case("usage-unknown-option", "an option that does not exist (--strength 0.8)", run_usage_error,
         cause=r"no such option.*usage: qwenlora-merge merge", names=False),
    Case("batch-plan-bad-strength", "batch plan with \"strength\": \"strong\"", run_batch_bad_strength,
         cause=r"strength"),
    Case("base-truncated", "the base cut to half its size (at rest)", run_base_truncated,
         cause=r"offset|truncated|end of (the )?file"),
    Case("base-qweight-1d", "the base's to_qkv.qweight declared 1-D (same bytes)", run_hostile_base(_flatten_qweight),
         cause=r"qweight|shape|dimension|matri"),
    Case("base-quant-config-deep-nesting", "the base's quantization_config metadata: 50k nested JSON arrays",
         run_hostile_base(_set_quant_config("[" * 50_000 + "]" * 50_000)), cause=r"quantization_config|JSON|nest"),
    Case("base-quant-config-not-json", "the base's quantization_config metadata is '{oops'",
         run_hostile_base(_set_quant_config("{oops")), cause=r"quantization_config.*JSON"),
    # the output folder and the output path
    Case("file-size-limit", "ulimit -f (RLIMIT_FSIZE) 4 MB hit mid-write", run_ulimit,
         cause=r"file too large|file.size limit|ulimit", heavy=True),
    Case("disk-full", "output folder on a 4 MB tmpfs", run_disk_full, cause=r"no space|disk.*full", heavy=True),
    Case("read-only-output-folder", "output folder read-only (ro mount as root, else mode 555)", run_read_only,
         cause=r"read-only|permission|not writable"),
    Case("output-symlink-to-base", "-o is a symlink onto the base (--overwrite)", run_symlink("base"),
         cause=r"base|input"),
    Case("output-symlink-to-lora", "-o is a symlink onto the LoRA (--overwrite)", run_symlink("lora"),
         cause=r"LoRA|input"),
    # signals at several points of the write (6-block base, ~16 MB output)
    *[Case(f"sigkill@{p}", f"SIGKILL {d}", run_signal(p, signal.SIGKILL), exit=(-signal.SIGKILL,), names=False,
           allow_temp=True, heavy=True) for p, d in _POINT_TEXT],
    Case("sigkill-then-rerun", "SIGKILL, then the same merge again: the stale temp file must go",
         run_kill_then_rerun, exit=(0,), want_output=True, heavy=True),
    *[Case(f"sigterm@{p}", f"SIGTERM {d}", run_signal(p, signal.SIGTERM), exit=(143,),
           cause=_SIG_CAUSE, names=False, heavy=True) for p, d in _POINT_TEXT],
    Case("sigint@mid", "SIGINT (Ctrl-C) with half the base's size written",
         run_signal("mid", signal.SIGINT), exit=(130,), cause=_SIG_CAUSE, names=False, heavy=True),
    *[Case(f"{name}@create", f"{name.upper()} the moment the temp file is created (an inotify watcher stops the "
           "merge within microseconds; up to 6 attempts)", run_signal_at_create(sig), exit=codes, cause=_SIG_CAUSE,
           names=False, heavy=True) for name, sig, codes in (
        ("sigterm", signal.SIGTERM, (143,)), ("sigint", signal.SIGINT, (130,)))],
    # signals in the first second: imports, headers, plan (before any temp file exists)
    *[Case(f"{name}@first-second", f"{name.upper()} at every {step:.2f} s from 0 to {EARLY_END:.0f} s after the "
           "handler is in place (importing, reading headers, planning, loading torch)", run_signal_early(sig, step),
           exit=(code,), cause=_SIG_CAUSE, names=False, heavy=True) for name, sig, code, step in (
        ("sigint", signal.SIGINT, 130, EARLY_STEP), ("sigterm", signal.SIGTERM, 143, EARLY_STEP),
        ("sighup", signal.SIGHUP, 129, 2 * EARLY_STEP))],
    # inputs changing under a running merge (in place, once the merge has started writing)
    Case("base-truncated-while-read", "the base truncated to its header during the merge",
         run_changed_while_read("base", "truncated"), cause=r"changed|truncated|shr[ai]nk|end of (the )?file",
         heavy=True),
    Case("base-rewritten-while-read", "the base rewritten in place (same size, other values) during the merge",
         run_changed_while_read("base", "rewritten"), cause=r"changed|modified|rewritten", heavy=True),
    Case("lora-truncated-while-read", "the LoRA truncated to its header during the merge",
         run_changed_while_read("lora", "truncated"), cause=r"changed|truncated|shr[ai]nk|end of (the )?file",
         heavy=True),
    Case("lora-rewritten-while-read", "the LoRA rewritten in place (same size, other values) during the merge",
         run_changed_while_read("lora", "rewritten"), cause=r"changed|modified|rewritten", heavy=True),
    Case("race-same-output", "two merges to the same new output at once, no --overwrite", run_race,
         cause=r"exists|another|concurrent|appeared", want_output=True, heavy=True),
]
CASE_BY_ID = {c.id: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES)


def run_case(case: Case, inputs: Inputs, root: Path) -> Outcome:
    ctx = Ctx(root, inputs, case.id)
    t0 = time.monotonic()
    try:
        o = case.run(ctx)
    except subprocess.TimeoutExpired as e:
        o = Outcome(rc=None, extra=[f"timed out after {e.timeout} s"])
    if not o.seconds:
        o.seconds = time.monotonic() - t0
    return o


def run_cases(cases: list[Case], inputs: Inputs, root: Path, workers: int | None = None) -> dict[str, Outcome]:
    """Run cases concurrently (each waits on its subprocesses; the heavy ones first)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    order = sorted(cases, key=lambda c: not c.heavy)
    with ThreadPoolExecutor(workers) as ex:
        futs = {c.id: ex.submit(run_case, c, inputs, root) for c in order}
        return {cid: f.result() for cid, f in futs.items()}

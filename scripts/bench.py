#!/usr/bin/env python
"""Full-size merge benchmark on a synthetic Nunchaku Qwen-Image checkpoint.

    python scripts/bench.py                    # 60 blocks, rank 128 base (~12.7 GB), rank-64 LoRA
    python scripts/bench.py --blocks 2         # quick smoke run
    python scripts/bench.py --rank 32 --cold   # drop the page cache before each job (needs root)

What it does
------------
1. Generates (once; cached in --workdir and reused while the header still matches) a base checkpoint with
   the real key names, shapes, dtypes, key order and metadata of the 60-block
   `NunchakuQwenImageTransformer2DModel` int4 files, filled with random contents: random bits for the
   packed int8/int32 qweights, small bf16 normals for the low-rank branch, positive bf16 scales and smooth
   factors, and a timestep embedder with std 1/sqrt(fan_in) weights so that the modulation layers see a
   sane input. It is written tensor by tensor through `converter.st_io.StreamingWriter` (header first,
   then each tensor): generation never holds more than one tensor in memory.
2. Generates a diffusers-format LoRA (`transformer_blocks.N.<module>.lora_A.weight` / `lora_B.weight`,
   rank --lora-rank, no alpha) on every block: separate attn.to_q/to_k/to_v and add_q/k/v_proj A matrices,
   attn.to_out.0, attn.to_add_out, img/txt_mlp.net.0.proj and net.2, img_mod.1 and txt_mod.1.
3. Runs, each in its own subprocess, one after the other (output deleted and `sync` after each):
     cp          `cp BASE OUT && sync OUT` (the copy is fsync'ed, as the merge fsyncs its output): the
                 baseline of every ratio
     cp-nosync   plain `cp BASE OUT` (informational; --no-cp-nosync drops it)
     merge-skip  `python -m converter.cli BASE LORA -o OUT --mod skip`
     merge-lokr  `python -m converter.cli BASE LOKR -o OUT --mod skip`: a LyCORIS LoKr (w1 4x4 full, w2 rank 16,
                 exact rank 64 like the LoRA) on every attention/MLP module (--no-lokr drops it; its target is
                 <= 1.3x merge-skip)
     export-skip `python -m converter.cli export-diffusers BASE LORA -o DIR --mod skip`: the same merge written as
                 a diffusers folder (--no-export drops it; its target is <= 1.5x merge-skip)
     merge-mod-DEV   `python -m converter.cli BASE LORA -o OUT --device DEV` (default --mod calibrated: all 120
                 modulation layers requantized), DEV = cpu, and cuda where torch sees a GPU (--device picks)
     merge-dora-DEV  a LyCORIS LoRA (rank 16) + DoRA (`dora_scale` (out, 1)) on every W4A4 module (480 layers
                 for 60 blocks: truncated SVD into the low-rank branch), --device DEV (--no-dora drops it)
     merge-diff-DEV  a LyCORIS full weight difference (`.diff`) on every W4A4 module, --device DEV (--no-diff
                 drops it; the file is ~0.45 GB a block and is skipped when the disk lacks the room)
     naive       safetensors.torch.load_file(BASE) + save_file(OUT) (+ fsync), run last, under a memory
                 watchdog (see LAUNCHER); skipped by default when the base is larger than 40 % of RAM
                 (--naive forces it: it then prints "did not fit" if it runs out of memory or is stopped).
   Wall time is measured around the child; CPU time and peak RSS come from the child's own rusage,
   returned by os.wait4() in a small launcher process (ru_maxrss: the high-water mark of its resident set,
   including the children it waited for, e.g. cp under sh; file-backed mmap pages count, page-cache pages
   read with pread do not). --repeat N runs each job N times and keeps the fastest. The machine is shared:
   each row also shows the load average and the CPU pressure (PSI) seen during the job.
4. Warm cache by default: before each job the base and LoRA are read once (untimed) so they sit in the page
   cache. --cold instead runs `sync; echo 3 > /proc/sys/vm/drop_caches` before each job (root only).

Prints the machine (with the date), then a table: job, wall s, ratio to cp, ratio to merge-skip (same run), CPU
s, peak RSS, output size, load, CPU pressure, status; then the targets: merge-skip <= 1.3x cp, export-skip <= 1.5x
merge-skip, merge-lokr <= 1.3x merge-skip, the CPU merges' peak RSS <= 1.5 GB, merge-mod-cpu <= 3x merge-skip,
merge-dora-cpu <= 300 s, merge-mod-cuda <= 1.5x merge-skip, merge-dora-cuda <= 60 s.
--json prints the same as one JSON object instead; every run also saves it as <workdir>/results-*.json.
Generated files: ~12.65 GB (rank 128) or ~11.5 GB (rank 32) base plus a 1.18 GB LoRA; the run needs about
1.3x the base free again for the outputs (one at a time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from converter.st_reader import Checkpoint
from converter.st_writer import OutSpec, StreamingWriter  # noqa: E402

FORMAT_VERSION = 1  # bump when the generated contents change, so cached files are rebuilt

D = 3072
HEADS = 24
HEAD_DIM = 128
TEXT_DIM = 3584
MLP = 4 * D
MOD_OUT = 6 * D
T_DIM = 256
IN_CH = 64
GROUP = 64
BF16 = torch.bfloat16

# (module, in, out) of the SVDQ W4A4 layers of one block
SVDQ_LAYERS = (
    ("attn.to_qkv", D, 3 * D),
    ("attn.add_qkv_proj", D, 3 * D),
    ("attn.to_out.0", D, D),
    ("attn.to_add_out", D, D),
    ("img_mlp.net.0.proj", D, MLP),
    ("txt_mlp.net.0.proj", D, MLP),
    ("img_mlp.net.2", MLP, D),
    ("txt_mlp.net.2", MLP, D),
)
AWQ_LAYERS = ("img_mod.1", "txt_mod.1")
NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
# (module, out, in) of the bf16 linears outside the blocks; all have a bias
DENSE_OUTSIDE = (
    ("img_in", D, IN_CH),
    ("txt_in", D, TEXT_DIM),
    ("time_text_embed.timestep_embedder.linear_1", D, T_DIM),
    ("time_text_embed.timestep_embedder.linear_2", D, D),
    ("norm_out.linear", 2 * D, D),
    ("proj_out", IN_CH, D),
)
# LoRA modules per block: (diffusers module, out, in)
LORA_MODULES = (
    ("attn.to_q", D, D), ("attn.to_k", D, D), ("attn.to_v", D, D),
    ("attn.add_q_proj", D, D), ("attn.add_k_proj", D, D), ("attn.add_v_proj", D, D),
    ("attn.to_out.0", D, D), ("attn.to_add_out", D, D),
    ("img_mlp.net.0.proj", MLP, D), ("img_mlp.net.2", D, MLP),
    ("txt_mlp.net.0.proj", MLP, D), ("txt_mlp.net.2", D, MLP),
    ("img_mod.1", MOD_OUT, D), ("txt_mod.1", MOD_OUT, D),
)

# safetensors' save_file orders tensors by dtype (descending Dtype enum) then by name; stock Nunchaku files
# were written by it, so a real file has all I32 (AWQ qweights) first, then all BF16, then all I8.
_ST_DTYPE_ORDER = {"BOOL": 0, "U8": 1, "I8": 2, "F8_E5M2": 3, "F8_E4M3": 4, "I16": 5, "U16": 6, "F16": 7,
                   "BF16": 8, "I32": 9, "U32": 10, "F32": 11, "F64": 12, "I64": 13, "U64": 14}


def st_order(specs: list[OutSpec]) -> list[OutSpec]:
    return sorted(specs, key=lambda s: (-_ST_DTYPE_ORDER[s.dtype], s.name))


# ------------------------------------------------------------------------------------------ base layout
def qwen_config(blocks: int) -> dict:
    return {
        "_class_name": "QwenImageTransformer2DModel",
        "_diffusers_version": "0.35.0",
        "attention_head_dim": HEAD_DIM,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": False,
        "in_channels": IN_CH,
        "joint_attention_dim": TEXT_DIM,
        "num_attention_heads": HEADS,
        "num_layers": blocks,
        "out_channels": 16,
        "patch_size": 2,
    }


def base_metadata(blocks: int, rank: int) -> dict[str, str]:
    spec = {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    return {
        "config": json.dumps(qwen_config(blocks)),
        "comfy_config": json.dumps({"model_class": "QwenImage",
                                    "model_config": {"image_model": "qwen_image", "scale_shift": 0}}),
        "model_class": "NunchakuQwenImageTransformer2DModel",
        "quantization_config": json.dumps({"method": "svdquant", "weight": dict(spec), "activation": dict(spec),
                                           "rank": rank}),
    }


def base_specs(blocks: int, rank: int) -> list[OutSpec]:
    s: list[OutSpec] = []
    add = lambda name, dtype, *shape: s.append(OutSpec(name, dtype, tuple(shape)))  # noqa: E731
    for name, o, i in DENSE_OUTSIDE:
        add(f"{name}.weight", "BF16", o, i)
        add(f"{name}.bias", "BF16", o)
    add("txt_norm.weight", "BF16", TEXT_DIM)
    for b in range(blocks):
        p = f"transformer_blocks.{b}"
        for m, i, o in SVDQ_LAYERS:
            q = f"{p}.{m}"
            add(f"{q}.qweight", "I8", o, i // 2)
            add(f"{q}.wscales", "BF16", i // GROUP, o)
            add(f"{q}.smooth_factor", "BF16", i)
            add(f"{q}.smooth_factor_orig", "BF16", i)
            add(f"{q}.proj_down", "BF16", i, rank)
            add(f"{q}.proj_up", "BF16", o, rank)
            add(f"{q}.bias", "BF16", o)
        for m in AWQ_LAYERS:
            q = f"{p}.{m}"
            add(f"{q}.qweight", "I32", MOD_OUT // 4, D // 2)
            add(f"{q}.wscales", "BF16", D // GROUP, MOD_OUT)
            add(f"{q}.wzeros", "BF16", D // GROUP, MOD_OUT)
            add(f"{q}.bias", "BF16", MOD_OUT)
        for n in NORMS:
            add(f"{p}.attn.{n}.weight", "BF16", HEAD_DIM)
    return st_order(s)


def lora_specs(blocks: int, r: int) -> list[OutSpec]:
    s = []
    for b in range(blocks):
        for m, o, i in LORA_MODULES:
            s.append(OutSpec(f"transformer_blocks.{b}.{m}.lora_A.weight", "BF16", (r, i)))
            s.append(OutSpec(f"transformer_blocks.{b}.{m}.lora_B.weight", "BF16", (o, r)))
    return st_order(s)


LOKR_FACTOR = 4  # w1 (4, 4) full, w2 low-rank: the exact rank of kron is 4·r (64 for r = 16, as the LoRA)
LOKR_RANK = 16


def lokr_specs(blocks: int, r: int) -> list[OutSpec]:
    """A LyCORIS LoKr (kohya/LyCORIS key names, lycoris_ prefix) of rank r on every attention and MLP module."""
    s = []
    for b in range(blocks):
        for m, o, i in LORA_MODULES:
            if m.endswith("_mod.1"):
                continue
            k = f"lycoris_transformer_blocks_{b}_{m.replace('.', '_')}"
            s += [OutSpec(f"{k}.lokr_w1", "BF16", (LOKR_FACTOR, LOKR_FACTOR)),
                  OutSpec(f"{k}.lokr_w2_a", "BF16", (o // LOKR_FACTOR, r)),
                  OutSpec(f"{k}.lokr_w2_b", "BF16", (r, i // LOKR_FACTOR)), OutSpec(f"{k}.alpha", "BF16", ())]
    return st_order(s)


DORA_RANK = 16


def w4a4_modules() -> tuple[tuple[str, int, int], ...]:
    """The LoRA modules that land on the W4A4 layers (to_q/k/v fuse into to_qkv): 480 layers for 60 blocks."""
    return tuple(m for m in LORA_MODULES if not m[0].endswith("_mod.1"))


def dora_specs(blocks: int, r: int) -> list[OutSpec]:
    """A LyCORIS LoRA + DoRA (`dora_scale` (out, 1), the default since 2025) of rank r on every W4A4 module."""
    s = []
    for b in range(blocks):
        for m, o, i in w4a4_modules():
            k = f"lycoris_transformer_blocks_{b}_{m.replace('.', '_')}"
            s += [OutSpec(f"{k}.lora_down.weight", "BF16", (r, i)), OutSpec(f"{k}.lora_up.weight", "BF16", (o, r)),
                  OutSpec(f"{k}.alpha", "BF16", ()), OutSpec(f"{k}.dora_scale", "BF16", (o, 1))]
    return st_order(s)


def diff_specs(blocks: int) -> list[OutSpec]:
    """A LyCORIS full weight difference (`.diff` (out, in)) on every W4A4 module (as large as the dense model)."""
    s = []
    for b in range(blocks):
        for m, o, i in w4a4_modules():
            s.append(OutSpec(f"lycoris_transformer_blocks_{b}_{m.replace('.', '_')}.diff", "BF16", (o, i)))
    return st_order(s)


# ---------------------------------------------------------------------------------------- random fills
class Filler:
    """Random tensor contents; numpy PCG64 for the bulk random bits (~8x faster than torch.randint here)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.g = torch.Generator().manual_seed(seed)

    def bits(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        words = self.rng.integers(0, 2**63, (n + 7) // 8, dtype=np.uint64, endpoint=False)
        words ^= self.rng.integers(0, 2, words.shape, dtype=np.uint64) << np.uint64(63)  # top bit random too
        raw = torch.from_numpy(words.view(np.uint8)[:n].copy())
        return raw.view(dtype).reshape(shape)

    def normal(self, shape, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.g) * std + mean).to(BF16)

    def lognormal(self, shape, scale: float, sigma: float) -> torch.Tensor:
        return (torch.exp(torch.randn(*shape, generator=self.g) * sigma) * scale).to(BF16)


def base_tensor(f: Filler, spec: OutSpec) -> torch.Tensor:
    prefix, _, part = spec.name.rpartition(".")
    shape = spec.shape
    if prefix.endswith(AWQ_LAYERS):  # AWQ W4A16 modulation layer (codes 0..15, w = q*s + z)
        if part == "qweight":
            return f.bits(shape, torch.int32)
        # weights ~ N(0, 1/sqrt(D)): uniform codes have std ~4.6, mean 7.5; wzeros ~ -7.5*wscales, so both
        # are drawn from one per-layer generator
        g = torch.Generator().manual_seed(zlib.crc32(prefix.encode()))
        scale = torch.exp(torch.randn(*shape, generator=g) * 0.1) / math.sqrt(D) / 4.6
        if part == "wscales":
            return scale.to(BF16)
        if part == "wzeros":
            return (-7.5 * scale * (1 + 0.05 * torch.randn(*shape, generator=g))).to(BF16)
        if part == "bias":  # interleaved rows d*6+k, +1 folded into the scale entries k=1 and k=4
            b = torch.randn(shape[0], generator=f.g) * 0.02
            b.view(-1, 6)[:, 1] += 1.0
            b.view(-1, 6)[:, 4] += 1.0
            return b.to(BF16)
    if part == "qweight":
        return f.bits(shape, torch.int8)
    if part == "wscales":  # int4 group scales ~ absmax/7 of N(0, 1/sqrt(I)) groups
        return f.lognormal(shape, 0.35 / math.sqrt(shape[0] * GROUP), 0.2)
    if part in ("smooth_factor", "smooth_factor_orig"):
        # equal in stock files (nothing fused upstream): same seed for both of a layer
        g = torch.Generator().manual_seed(zlib.crc32(prefix.encode()))
        return (torch.exp(torch.randn(*shape, generator=g) * 0.4)).to(BF16)
    if part == "proj_down":  # (I, R)
        return f.normal(shape, 1.0 / math.sqrt(shape[0]))
    if part == "proj_up":  # (O, R)
        return f.normal(shape, 0.1 / math.sqrt(shape[1]))
    if part == "bias":
        return f.normal(shape, 0.02)
    if part == "weight" and len(shape) == 1:  # norms
        return f.normal(shape, 0.05, 1.0)
    if part == "weight":  # dense linear: std 1/sqrt(fan_in)
        return f.normal(shape, 1.0 / math.sqrt(shape[1]))
    raise AssertionError(spec.name)


def lora_tensor(f: Filler, spec: OutSpec, scale: float = 0.05) -> torch.Tensor:
    r_or_o, c = spec.shape
    if ".lora_A." in spec.name:  # (r, in)
        return f.normal(spec.shape, 1.0 / math.sqrt(c))
    # B (out, r): ||B·A||_F ~ scale * sqrt(out), i.e. 5 % of a unit-normalised weight
    return f.normal(spec.shape, scale / math.sqrt(c))


def lokr_tensor(f: Filler, spec: OutSpec, scale: float = 0.05) -> torch.Tensor:
    part = spec.name.rpartition(".")[2]
    if part == "alpha":  # alpha = rank: scale 1
        return torch.tensor(float(LOKR_RANK), dtype=BF16)
    if part == "lokr_w1":  # entries ~1: kron(w1, w2) ~ w2 blocks
        return f.normal(spec.shape, 1.0)
    if part == "lokr_w2_b":  # (r, in/f)
        return f.normal(spec.shape, 1.0 / math.sqrt(spec.shape[1]))
    return f.normal(spec.shape, scale / math.sqrt(spec.shape[1]) / LOKR_FACTOR)  # w2_a (out/f, r)


def dora_tensor(f: Filler, spec: OutSpec, scale: float = 0.05) -> torch.Tensor:
    """dora_scale: row norms of a unit-scale weight (sqrt(in) / sqrt(in) = 1) moved by a few percent."""
    part = spec.name.split(".", 1)[1]
    if part == "alpha":
        return torch.tensor(float(DORA_RANK), dtype=BF16)
    if part == "dora_scale":
        return f.lognormal(spec.shape, 1.0, 0.03)
    if part == "lora_down.weight":
        return f.normal(spec.shape, 1.0 / math.sqrt(spec.shape[1]))
    return f.normal(spec.shape, scale / math.sqrt(spec.shape[1]))


def diff_tensor(f: Filler, spec: OutSpec, scale: float = 0.05) -> torch.Tensor:
    return f.normal(spec.shape, scale / math.sqrt(spec.shape[1]))


def _matches(path: Path, specs: list[OutSpec], meta: dict[str, str]) -> bool:
    try:
        with Checkpoint(path) as c:
            got = [(n, i.dtype, i.shape) for n, i in c.tensors.items()]
            return got == [(s.name, s.dtype, s.shape) for s in specs] and c.metadata == meta
    except Exception:  # noqa: BLE001 - any unreadable cache file is rebuilt
        return False


def generate(path: Path, specs: list[OutSpec], meta: dict[str, str], fill, seed: int, log) -> float:
    """Write `path` tensor by tensor (cached: reused if its header already matches). Returns seconds spent."""
    if path.exists() and _matches(path, specs, meta):
        log(f"reusing {path} ({path.stat().st_size / 1e9:.2f} GB)")
        return 0.0
    total = sum(s.nbytes for s in specs)
    log(f"generating {path.name}: {len(specs)} tensors, {total / 1e9:.2f} GB ...")
    t0 = time.perf_counter()
    f = Filler(seed)
    w = StreamingWriter(path, specs, meta)
    done, last = 0, t0
    try:
        for s in specs:
            w.write_tensor(s.name, fill(f, s))
            done += s.nbytes
            if time.perf_counter() - last > 15:
                last = time.perf_counter()
                log(f"  {done / total * 100:5.1f}%  {done / 1e9:.2f} GB  {last - t0:.0f}s")
        w.commit()
    except BaseException:
        w.abort()
        raise
    dt = time.perf_counter() - t0
    log(f"  wrote {path.stat().st_size / 1e9:.2f} GB in {dt:.0f}s")
    return dt


# ------------------------------------------------------------------------------------------------ jobs
@dataclass
class Result:
    job: str
    status: str = "ok"
    wall_s: float | None = None
    cpu_s: float | None = None
    user_s: float | None = None
    sys_s: float | None = None
    peak_rss: int | None = None  # bytes
    output_bytes: int | None = None
    ratio: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


NAIVE_CODE = r"""
import os, sys
from safetensors import safe_open
from safetensors.torch import load_file, save_file
base, out = sys.argv[1], sys.argv[2]
try:
    with safe_open(base, "pt") as f:
        md = f.metadata()
    sd = load_file(base)
    save_file(sd, out, metadata=md)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
except MemoryError as e:
    print("MemoryError:", e, file=sys.stderr)
    sys.exit(75)
"""


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_pressure_us() -> int | None:
    """PSI 'some' total for the CPU (microseconds), or None where the kernel has no PSI."""
    try:
        with open("/proc/pressure/cpu") as fh:
            return int(fh.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# A tiny launcher between this (large, torch-importing) process and each job. Linux seeds a process's
# ru_maxrss at exec() with the RSS of the image it replaces, so a job forked straight from here would report
# at least this process's RSS (~0.2 GB). The launcher (python -S, ~10 MB) forks and execs the job, waits for it
# with os.wait4 and reports the job's own rusage: peak RSS values have a floor of the launcher's ~10 MB.
# It also polls the job every 50 ms as a memory watchdog: it kills the job when its anonymous memory
# (RssAnon) passes `anon_cap`, or when the machine's MemAvailable falls below 3 % of RAM, so that a job that
# does not fit is stopped before the kernel's OOM killer picks some other process. (An RLIMIT_AS cap is no use
# for the naive job: safetensors 0.8 load_file maps the file lazily, so its address space is ~2x the file
# while almost all of its resident memory is reclaimable page cache.)
LAUNCHER = r"""
import json, os, signal, sys, time
anon_cap, so, se, argv = json.loads(sys.argv[1])
def kib(path, key):
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
floor = kib("/proc/meminfo", "MemTotal:") * 1024 * 0.03
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        o = os.open(so, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        e = os.open(se, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(o, 1); os.dup2(e, 2); os.close(o); os.close(e)
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
killed, anon_peak = None, 0
while True:
    got, status, ru = os.wait4(pid, os.WNOHANG)
    if got:
        break
    anon = kib(f"/proc/{pid}/status", "RssAnon:")
    avail = kib("/proc/meminfo", "MemAvailable:")
    if anon is not None:
        anon_peak = max(anon_peak, anon * 1024)
    if killed is None and anon_cap and anon is not None and anon * 1024 > anon_cap:
        killed = f"anonymous memory passed {anon_cap / 2**30:.1f} GiB"
    elif killed is None and avail is not None and avail * 1024 < floor:
        killed = f"MemAvailable fell below {floor / 2**30:.1f} GiB"
    if killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status, ru = os.wait4(pid, 0)
        break
    time.sleep(0.05)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "rc": os.waitstatus_to_exitcode(status), "utime": ru.ru_utime,
                  "stime": ru.ru_stime, "maxrss_kib": ru.ru_maxrss, "anon_peak": anon_peak, "killed": killed}))
"""


def _remove(out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()


def run_job(name: str, argv: list[str], out: Path, workdir: Path, *, anon_cap: int | None, env=None,
            log=print) -> Result:
    res = Result(name)
    _remove(out)
    stdout_p, stderr_p = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    spec = json.dumps([anon_cap, str(stdout_p), str(stderr_p), argv])
    load0, psi0 = os.getloadavg()[0], cpu_pressure_us()
    p = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, spec], cwd=REPO, env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"launcher failed: {p.stderr.strip()}")
    m = json.loads(p.stdout)
    res.wall_s = m["wall"]
    psi1 = cpu_pressure_us()
    res.extra["load1_before"] = load0
    if psi0 is not None and psi1 is not None and res.wall_s > 0:
        # share of the job's wall time in which some runnable task on the machine waited for a CPU
        res.extra["cpu_pressure"] = round((psi1 - psi0) / 1e6 / res.wall_s, 3)
    rc = m["rc"]
    res.user_s, res.sys_s = m["utime"], m["stime"]
    res.cpu_s = res.user_s + res.sys_s
    res.peak_rss = m["maxrss_kib"] * 1024  # Linux: KiB
    res.extra["anon_peak_polled"] = m["anon_peak"]
    err = stderr_p.read_text(errors="replace")
    if rc != 0:
        sig = -rc if rc < 0 else None
        oom = m["killed"] is not None or sig == signal.SIGKILL or rc == 75 or "MemoryError" in err or "memory allocation" in err.lower() \
            or "Cannot allocate memory" in err
        res.status = "did not fit" if (oom and name == "naive") else (f"OOM? rc={rc}" if oom else f"failed rc={rc}")
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        res.note = (lines[-1] if lines else (f"killed by signal {sig}" if sig else ""))[:300]
        if m["killed"]:
            res.note = f"stopped by the watchdog: {m['killed']}"
        if "cannot import name 'modulation'" in err or "No module named 'converter.modulation'" in err:
            res.status, res.note = "not available", "converter/modulation.py does not exist yet"
    if out.exists():  # a file, or the export's folder
        res.output_bytes = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
        _remove(out)
    os.sync()  # flush whatever the job left dirty before the next one starts (untimed)
    if rc == 0 and name.startswith(("merge", "export")):
        try:
            rep = json.loads(stdout_p.read_text())
            res.extra |= {"merge_seconds": rep.get("seconds"), "write_mode": rep.get("write_mode"), "rank": rep.get("rank"),
                         "expected_output_bytes": rep.get("expected_output_bytes"),
                         "layers_summary": rep.get("layers_summary")}
        except (json.JSONDecodeError, OSError):
            pass
    log(f"  {name}: {res.status}, {res.wall_s:.1f}s wall, {res.cpu_s:.1f}s CPU, peak RSS {res.peak_rss / 1e9:.2f} GB"
        + (f" -- {res.note}" if res.note else ""))
    return res


# --------------------------------------------------------------------------------------------- report
def fmt_gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def render(machine: dict, files: dict, results: list[Result]) -> str:
    lines = ["machine: " + ", ".join(f"{k}={v}" for k, v in machine.items())]
    for k, v in files.items():
        lines.append(f"{k}: {v}")
    hdr = (f"{'job':<16} {'wall s':>8} {'x cp':>6} {'x skip':>6} {'CPU s':>8} {'peak RSS':>10} {'output':>10} "
           f"{'load1':>6} {'cpu-psi':>7}  status")
    lines += ["", hdr, "-" * len(hdr)]
    for r in results:
        wall = "-" if r.wall_s is None else f"{r.wall_s:.1f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        x_skip = "-" if r.extra.get("x_skip") is None else f"{r.extra['x_skip']:.2f}"
        cpu = "-" if r.cpu_s is None else f"{r.cpu_s:.1f}"
        status = r.status + (f" ({r.note})" if r.note else "")
        load = r.extra.get("load1_before")
        psi = r.extra.get("cpu_pressure")
        load = "-" if load is None else f"{load:.1f}"
        psi = "-" if psi is None else f"{psi * 100:.0f}%"
        lines.append(f"{r.job:<16} {wall:>8} {ratio:>6} {x_skip:>6} {cpu:>8} {fmt_gb(r.peak_rss):>10} "
                     f"{fmt_gb(r.output_bytes):>10} {load:>6} {psi:>7}  {status}")
    lines.append("load1 = 1-min load average when the job started; cpu-psi = share of the job's wall time in which "
                 "some task waited for a CPU (/proc/pressure/cpu): high values mean other work shared the cores")
    for r in results:
        if r.extra.get("all_wall_s"):
            lines.append(f"{r.job}: walls of the {len(r.extra['all_wall_s'])} runs {r.extra['all_wall_s']} (fastest shown)")
    for r in results:
        ms = r.extra.get("layers_summary", {}) if r.extra else {}
        if r.extra and r.extra.get("merge_seconds") is not None:
            lines.append(f"{r.job}: tool-reported streaming time {r.extra['merge_seconds']:.1f}s "
                         f"({r.extra.get('write_mode') or '?'} writes), rank "
                         f"{(r.extra.get('rank') or {}).get('from')} -> {(r.extra.get('rank') or {}).get('to')}"
                         + (f", modulation {ms['modulation']}" if ms and "modulation" in ms else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, choices=(32, 128), default=128, help="SVDQ rank of the base (default 128)")
    ap.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (default 64)")
    ap.add_argument("--blocks", type=int, default=60, help="transformer blocks (default 60; e.g. 2 for a smoke run)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "qwenlora-bench",
                    help="where generated files are cached and outputs are written (default /tmp/qwenlora-bench)")
    ap.add_argument("--skip-mod", action="store_true", help="do not run the merge with modulation targets")
    ap.add_argument("--device", default="both", choices=("cpu", "cuda", "both"),
                    help="device of the heavy jobs (merge-mod, merge-dora, merge-diff): cpu, cuda, or both "
                         "(default: cpu, and cuda too where torch sees a GPU)")
    ap.add_argument("--dora", action=argparse.BooleanOptionalAction, default=True,
                    help=f"merge a rank-{DORA_RANK} LyCORIS DoRA on every W4A4 layer (default on)")
    ap.add_argument("--diff", action=argparse.BooleanOptionalAction, default=True,
                    help="merge a full weight difference on every W4A4 layer (default on; its file is ~0.45 GB a "
                         "block, skipped when the disk lacks the room)")
    ap.add_argument("--naive", action=argparse.BooleanOptionalAction, default=None,
                    help="run the load_file/save_file reference (default: only if the base is <= 40%% of RAM)")
    ap.add_argument("--naive-cap", type=float, default=0.75,
                    help="watchdog cap on the naive job's anonymous memory, as a fraction of RAM (default 0.75)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each job (root only)")
    ap.add_argument("--no-cp-nosync", dest="cp_nosync", action="store_false",
                    help="do not also time a plain cp without fsync (informational row)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each job (except naive) N times and report the fastest run (default 1): on a shared "
                         "machine the minimum is the least disturbed measurement")
    ap.add_argument("--lokr", action=argparse.BooleanOptionalAction, default=True,
                    help=f"also merge a rank-{LOKR_RANK} LyCORIS LoKr (factor {LOKR_FACTOR}) on every attention/MLP "
                         "module, --mod skip, against merge-skip (default on)")
    ap.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                    help="also time export-diffusers of the same base and LoRA (--mod skip), a folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate-only", action="store_true", help="only generate (or check) the cached files")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    a = ap.parse_args(argv)

    if a.blocks < 1 or a.lora_rank < 1 or a.repeat < 1:
        ap.error("--blocks, --lora-rank and --repeat must be positive")
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if a.json else (lambda m: print(m, flush=True))
    wd = a.workdir
    wd.mkdir(parents=True, exist_ok=True)
    mem = meminfo()
    ram = mem["MemTotal"]

    base = wd / f"svdq-int4_r{a.rank}-qwen-image-synth-b{a.blocks}-s{a.seed}-v{FORMAT_VERSION}.safetensors"
    lora = wd / f"lora-diffusers-r{a.lora_rank}-b{a.blocks}-s{a.seed}-v{FORMAT_VERSION}.safetensors"
    lokr = wd / f"lokr-lycoris-r{LOKR_RANK}-f{LOKR_FACTOR}-b{a.blocks}-s{a.seed}-v{FORMAT_VERSION}.safetensors"
    out = wd / "out.safetensors"
    t_base = generate(base, base_specs(a.blocks, a.rank), base_metadata(a.blocks, a.rank), base_tensor, a.seed, log)
    generate(lora, lora_specs(a.blocks, a.lora_rank), {"format": "pt"}, lora_tensor, a.seed + 1, log)
    if a.lokr:
        generate(lokr, lokr_specs(a.blocks, LOKR_RANK), {"format": "pt"}, lokr_tensor, a.seed + 2, log)
    dora = wd / f"dora-lycoris-r{DORA_RANK}-b{a.blocks}-s{a.seed}-v{FORMAT_VERSION}.safetensors"
    diff = wd / f"diff-lycoris-b{a.blocks}-s{a.seed}-v{FORMAT_VERSION}.safetensors"
    if a.dora:
        generate(dora, dora_specs(a.blocks, DORA_RANK), {"format": "pt"}, dora_tensor, a.seed + 3, log)
    if a.diff:
        need_diff = sum(sp.nbytes for sp in diff_specs(a.blocks))
        room = shutil.disk_usage(wd).free - (0 if diff.exists() else need_diff) - int(base.stat().st_size * 1.3)
        if room < (2 << 30):
            log(f"not generating the full diff ({need_diff / 1e9:.1f} GB): not enough free disk; --no-diff drops it")
            a.diff = False
        else:
            generate(diff, diff_specs(a.blocks), {"format": "pt"}, diff_tensor, a.seed + 4, log)
    base_size, lora_size = base.stat().st_size, lora.stat().st_size
    if a.generate_only:
        log(f"base {base} ({base_size / 1e9:.2f} GB), LoRA {lora} ({lora_size / 1e9:.2f} GB)")
        return 0

    try:
        from importlib.metadata import version as _v
        torch_v = _v("torch")
    except Exception:  # noqa: BLE001
        torch_v = torch.__version__
    devices = ["cpu"] if a.device == "cpu" else ["cuda"] if a.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dev = ", ".join(devices)
    if "cuda" in devices:
        try:
            dev += f" ({torch.cuda.get_device_name(0)})"
        except Exception as e:  # noqa: BLE001
            dev += f" (cuda unusable: {str(e).splitlines()[0]})"
    machine = {
        "cores": os.cpu_count(), "RAM": f"{ram / 2**30:.1f} GiB", "cpu": cpu_model(),
        "disk_free": f"{shutil.disk_usage(wd).free / 1e9:.0f} GB ({wd})", "python": platform.python_version(),
        "torch": torch_v, "device": dev, "load1": f"{os.getloadavg()[0]:.1f}",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    cache_mode = "cold" if a.cold else "warm"
    if a.cold and not drop_caches():
        log("warning: cannot drop the page cache (not root?); running warm")
        a.cold, cache_mode = False, "warm (drop_caches failed)"

    need = int(base_size * 1.3) + (1 << 30)
    if shutil.disk_usage(wd).free < need + (2 << 30):
        log(f"error: need ~{need / 1e9:.0f} GB free in {wd} for the outputs")
        return 2

    def prep():
        if a.cold:
            drop_caches()
        else:
            warm([base, lora])

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    def merge_of(adapter: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "converter.cli", str(base), str(adapter), "-o", str(out), "-q", "--json", *extra]

    jobs: list[tuple[str, list[str], int | None]] = [
        ("cp", ["sh", "-c", 'cp -- "$1" "$2" && sync -- "$2"', "sh", str(base), str(out)], None)]
    if a.cp_nosync:
        jobs.append(("cp-nosync", ["cp", "--", str(base), str(out)], None))
    jobs.append(("merge-skip", merge_of(lora, "--mod", "skip", "--device", "cpu"), None))
    if a.export:
        jobs.append(("export-skip", [sys.executable, "-m", "converter.cli", "export-diffusers", str(base), str(lora),
                                     "-o", str(out), "-q", "--json", "--mod", "skip"], None))
    if a.lokr:
        jobs.append(("merge-lokr", merge_of(lokr, "--mod", "skip", "--device", "cpu"), None))
    for d in devices:  # the heavy per-layer maths, on each device
        if not a.skip_mod:
            jobs.append((f"merge-mod-{d}", merge_of(lora, "--device", d), None))
        if a.dora:
            jobs.append((f"merge-dora-{d}", merge_of(dora, "--device", d), None))
        if a.diff:
            jobs.append((f"merge-diff-{d}", merge_of(diff, "--device", d), None))
    results: list[Result] = []
    log(f"running jobs ({cache_mode} page cache); base {base_size / 1e9:.2f} GB, LoRA {lora_size / 1e9:.2f} GB")
    for name, argv_, cap in jobs:
        runs = []
        for _ in range(a.repeat):
            prep()
            runs.append(run_job(name, argv_, out, wd, anon_cap=cap, env=env, log=log))
            if runs[-1].status != "ok":
                break
        best = min(runs, key=lambda r: (r.status != "ok", r.wall_s))
        if len(runs) > 1:
            best.extra["all_wall_s"] = [round(r.wall_s, 2) for r in runs]
        results.append(best)

    run_naive = a.naive if a.naive is not None else base_size <= 0.4 * ram
    if run_naive:
        prep()
        cap = int(a.naive_cap * ram)
        r = run_job("naive", [sys.executable, "-c", NAIVE_CODE, str(base), str(out)], out, wd, anon_cap=cap,
                    env=env, log=log)
        if r.status == "ok":
            r.note = f"peak anon {r.extra['anon_peak_polled'] / 1e9:.2f} GB, watchdog cap {cap / 2**30:.1f} GiB"
        results.append(r)
    else:
        results.append(Result("naive", status="skipped", note=f"base {base_size / 1e9:.1f} GB > 40% of RAM "
                                                              f"({ram / 1e9:.1f} GB); --naive runs it under a cap"))

    cp = next((r for r in results if r.job == "cp" and r.status == "ok"), None)
    skip = next((r for r in results if r.job == "merge-skip" and r.status == "ok"), None)
    for r in results:
        if cp and r.wall_s is not None and r.status == "ok":
            r.ratio = r.wall_s / cp.wall_s
        if skip and r.wall_s is not None and r.status == "ok":
            r.extra["x_skip"] = r.wall_s / skip.wall_s
    files = {
        "base": f"{base} ({base_size / 1e9:.2f} GB = {base_size / 2**30:.2f} GiB, rank {a.rank}, {a.blocks} blocks)"
                + (f", generated in {t_base:.0f}s" if t_base else ", cached"),
        "lora": f"{lora} ({lora_size / 1e9:.2f} GB, rank {a.lora_rank}, {len(LORA_MODULES)} modules x {a.blocks} blocks)",
        "cache": cache_mode + (" (base+LoRA read once before each job)" if cache_mode == "warm" else
                               " (drop_caches before each job)"),
        "rss": "ru_maxrss of the job from os.wait4 in a ~10 MB launcher (Linux seeds it at exec)",
    }
    doc = {"machine": machine, "files": files, "base_bytes": base_size, "lora_bytes": lora_size,
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [r.__dict__ for r in results]}
    saved = wd / f"results-r{a.rank}-b{a.blocks}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    saved.write_text(json.dumps(doc, indent=1))
    log(f"results saved to {saved}")
    if a.json:
        print(json.dumps(doc, indent=1))
    else:
        print()
        print(render(machine, files, results))
        ok = {r.job: r for r in results if r.status == "ok"}
        if "merge-skip" in ok and cp:
            t = ok["merge-skip"].ratio
            print(f"\ntarget merge-skip <= 1.3x cp: {'met' if t <= 1.3 else 'MISSED'} ({t:.2f}x)")
        if "export-skip" in ok and "merge-skip" in ok:
            t = ok["export-skip"].wall_s / ok["merge-skip"].wall_s
            print(f"target export-skip <= 1.5x merge-skip: {'met' if t <= 1.5 else 'MISSED'} ({t:.2f}x)")
        if "merge-lokr" in ok and "merge-skip" in ok:
            t = ok["merge-lokr"].wall_s / ok["merge-skip"].wall_s
            print(f"target merge-lokr <= 1.3x merge-skip: {'met' if t <= 1.3 else 'MISSED'} ({t:.2f}x)")
        for line in target_lines(ok):
            print(line)
    return 0


# (job, bound, what the bound is on): the targets of the issues these jobs were made for
TARGETS = (("merge-mod-cpu", 3.0, "x_skip"), ("merge-dora-cpu", 300.0, "wall_s"),
           ("merge-mod-cuda", 1.5, "x_skip"), ("merge-dora-cuda", 60.0, "wall_s"))


def target_lines(ok: dict[str, Result]) -> list[str]:
    out = []
    peak = max((r.peak_rss for j, r in ok.items() if j.startswith("merge") and not j.endswith("-cuda")), default=None)
    if peak:
        out.append(f"target CPU merges' peak RSS <= 1.5 GB: {'met' if peak <= 1.5e9 else 'MISSED'} ({peak / 1e9:.2f} GB)")
    for job, bound, what in TARGETS:
        if job in ok:
            got = ok[job].extra["x_skip"] if what == "x_skip" else ok[job].wall_s
            unit = "x merge-skip" if what == "x_skip" else "s"
            out.append(f"target {job} <= {bound:g}{' ' if unit == 's' else ''}{unit}: "
                       f"{'met' if got <= bound else 'MISSED'} ({got:.2f}{' ' if unit == 's' else ''}{unit})")
    return out


if __name__ == "__main__":
    sys.exit(main())

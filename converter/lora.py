"""LoRA files: parse the key zoo into modules, and account for every key.

A key is split into (prefix, module, part). Parts: A/B (lora_A/lora_B, lora_down/lora_up, lora.down/up,
lora_linear_layer.down/up, PEFT adapter-named), alpha, diff (full delta), diff_b / B-bias (bias delta).
Each key ends in exactly one bucket: a module part (applied later, or unmapped if its module has no target),
ignored by rule (listed with the rule), or unsupported (listed with the reason).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import MergeError, UnsupportedFormat
from .st_io import Checkpoint

if TYPE_CHECKING:
    import torch

# prefixes stripped (repeatedly, in this order); the last group marks kohya-style underscore names
DOT_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoders?[._]|te\d?[._]|lora_te[._]|text_model[._]|conditioner[._])")

_PARTS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_(?P<p>A|B)(?:\.(?P<ad>[^.]+))?\.weight$"), ""),
    (re.compile(r"^(?P<m>.+)\.lora_(?P<p>down|up)(?:\.(?P<ad>[^.]+))?\.weight$"), ""),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<p>down|up)\.weight$"), ""),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.(?P<p>down|up)\.weight$"), ""),
    (re.compile(r"^(?P<m>.+)\.(?:alpha|lora_alpha)$"), "alpha"),
    (re.compile(r"^(?P<m>.+)\.diff$"), "diff"),
    (re.compile(r"^(?P<m>.+)\.diff_b$"), "diff_b"),
    (re.compile(r"^(?P<m>.+)\.lora_(?:B|up)(?:\.(?P<ad>[^.]+))?\.bias$"), "diff_b"),
]
_PART_NAMES = {"A": "A", "down": "A", "B": "B", "up": "B"}
_UNSUPPORTED: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\.dora_scale$"), "DoRA magnitude (dora_scale) cannot be merged into a 4-bit model"),
    (re.compile(r"\.lokr_(w1|w2|w1_a|w1_b|w2_a|w2_b|t2)$"), "LoKr is not supported (convert it to a plain LoRA first)"),
    (re.compile(r"\.hada_(w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "LoHa is not supported (convert it to a plain LoRA first)"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon mid weights are not supported"),
    (re.compile(r"\.(ia3_w|weight_ia3|on_input)$"), "IA3 is not supported"),
    (re.compile(r"\.(oft_blocks|oft_r|boft_R|boft_s)$"), "OFT/BOFT is not supported"),
    (re.compile(r"\.lora_(?:A|down)(?:\.[^.]+)?\.bias$"), "a bias on lora_A/lora_down is not supported"),
]


def lower_thread_priority() -> None:
    """Lowest CPU priority for the calling thread (Linux: a thread's nice value is its own); best effort."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class _FileHashes:
    """sha256 of files, each computed once per process on a lowest-priority thread (sha256 costs ~4 s of CPU
    per GB on the 2-core machine measured: the merge's own threads go first). Keyed by the file's identity
    (device, inode, size, mtime), so a file changed in between is hashed again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple, tuple[threading.Thread, dict]] = {}

    def start(self, path: str) -> tuple:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key not in self._jobs:
                out: dict = {}
                t = threading.Thread(target=self._hash, args=(path, out), name=f"sha256 {os.path.basename(path)}",
                                     daemon=True)
                t.start()
                self._jobs[key] = (t, out)
            return self._jobs[key]

    @staticmethod
    def _hash(path: str, out: dict) -> None:
        lower_thread_priority()
        try:
            h = hashlib.sha256()
            buf = bytearray(8 << 20)
            view = memoryview(buf)
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
            out["sha256"] = h.hexdigest()
        except OSError as e:
            out["error"] = MergeError(f"cannot read {path} to hash it: {e.strerror}")

    @staticmethod
    def result(job: tuple) -> str:
        t, out = job
        t.join()
        if "error" in out:
            raise out["error"]
        return out["sha256"]


_FILE_HASHES = _FileHashes()


@dataclass
class LoraModule:
    name: str  # after prefix stripping; dotted, or underscore form if `underscore`
    underscore: bool
    keys: dict[str, str] = field(default_factory=dict)  # part -> original key


@dataclass
class LoraFile:
    path: str
    strength: float
    ckpt: Checkpoint
    format: str
    modules: dict[tuple[str, bool], LoraModule]
    ignored: list[tuple[str, str]]  # (key, rule)
    unsupported: list[tuple[str, str]]  # (key, reason)
    default_alpha: float | None = None  # from diffusers' lora_adapter_metadata, when present
    rslora: bool = False
    _sha256: str | None = None
    _hasher: tuple | None = None  # the pending hash (see _FileHashes)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def hash_in_background(self) -> None:
        """Start hashing the file on a thread (hashlib and reads release the GIL): it overlaps the merge.
        One hash per file and process: a batch naming a LoRA in several outputs hashes it once."""
        if self._sha256 is None and self._hasher is None:
            self._hasher = _FILE_HASHES.start(self.path)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = _FILE_HASHES.result(self._hasher or _FILE_HASHES.start(self.path))
            self._hasher = None
        return self._sha256

    def tensor(self, key: str) -> torch.Tensor:
        return self.ckpt.get(key).float()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.ckpt.tensors[key].shape

    def alpha(self, mod: LoraModule) -> float | None:
        key = mod.keys.get("alpha")
        if key is None:
            return self.default_alpha
        if math.prod(self.ckpt.tensors[key].shape) != 1:
            raise MergeError(f"{self.name}: alpha {key} is not a scalar")
        return self.ckpt.scalar(key)

    def scale(self, mod: LoraModule) -> float:
        """strength * alpha / rank for this module (rank of its own A); alpha absent -> alpha/rank = 1."""
        alpha = self.alpha(mod)
        if alpha is None or "A" not in mod.keys:
            return self.strength
        r = self.shape(mod.keys["A"])[0]
        return self.strength * alpha / (math.sqrt(r) if self.rslora else r)


def parse_spec(spec: str) -> tuple[str, float]:
    """`path[:strength]`; the strength is taken only when what follows the last ':' is a number."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            s = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(s):
            raise MergeError(f"strength in {spec!r} is not a finite number")
        return path, s
    return spec, 1.0


def _strip(key: str) -> tuple[str, bool, list[str]]:
    used = []
    changed = True
    while changed:
        changed = False
        for p in DOT_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
                used.append(p)
    for p in UNDERSCORE_PREFIXES:
        if key.startswith(p):
            used.append(p)
            return key[len(p):], True, used
    return key, False, used


def _adapter_defaults(meta: dict[str, str]) -> tuple[float | None, bool]:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None, False
    try:
        d = json.loads(raw)
    except json.JSONDecodeError:
        return None, False
    flat: dict = {}
    stack = [("", d)]
    while stack:
        pre, obj = stack.pop()
        if isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((f"{pre}.{k}" if pre else k, v))
        else:
            flat[pre] = obj
    alpha = next((v for k, v in flat.items() if k.split(".")[-1] == "lora_alpha" and isinstance(v, (int, float))), None)
    rs = any(k.split(".")[-1] == "use_rslora" and v is True for k, v in flat.items())
    return (float(alpha) if alpha is not None else None), rs


def _describe_format(prefixes: Counter, suffixes: Counter, adapters: set[str]) -> str:
    parts = []
    if prefixes.get("lora_unet_"):
        parts.append("kohya/musubi (lora_unet_)")
    if prefixes.get("lycoris_"):
        parts.append("LyCORIS (lycoris_)")
    if prefixes.get("lora_transformer_"):
        parts.append("kohya-style (lora_transformer_)")
    if prefixes.get("diffusion_model.") or prefixes.get("model.diffusion_model."):
        parts.append("ComfyUI/ai-toolkit (diffusion_model.)")
    if prefixes.get("base_model.model."):
        parts.append("PEFT (base_model.model.)")
    if prefixes.get("transformer."):
        parts.append("diffusers pipeline (transformer.)")
    if adapters:
        parts.append(f"PEFT adapter-named ({', '.join(sorted(adapters))})")
    if suffixes.get("down/up") and not (prefixes.get("lora_unet_") or prefixes.get("lycoris_") or prefixes.get("lora_transformer_")):
        parts.append("lightx2v-style (lora_down/lora_up" + (" + alpha)" if suffixes.get("alpha") else ")"))
    if suffixes.get("A/B") and not parts:
        parts.append("diffusers/PEFT (lora_A/lora_B)")
    if suffixes.get("diff") and not parts:
        parts.append("full/bias deltas (.diff)")
    return " + ".join(parts) if parts else "unknown"


def open_lora(spec: str) -> LoraFile:
    path, strength = parse_spec(spec)
    if not os.path.isfile(path):
        raise MergeError(f"LoRA file not found: {path}")
    ckpt = Checkpoint(path)
    modules: dict[tuple[str, bool], LoraModule] = {}
    ignored, unsupported = [], []
    prefixes, suffixes = Counter(), Counter()
    adapters: set[str] = set()
    for key in ckpt.keys():
        if TEXT_ENCODER.match(key):
            ignored.append((key, "text-encoder LoRA (this tool merges the diffusion transformer only)"))
            continue
        reason = next((r for rx, r in _UNSUPPORTED if rx.search(key)), None)
        if reason:
            unsupported.append((key, reason))
            continue
        stripped, underscore, used = _strip(key)
        for rx, fixed in _PARTS:
            m = rx.match(stripped)
            if m:
                break
        else:
            unsupported.append((key, "not a LoRA key this tool understands"))
            continue
        prefixes.update(used)
        part = fixed or _PART_NAMES[m.group("p")]
        if not fixed:
            suffixes["A/B" if m.group("p") in "AB" else "down/up"] += 1
        else:
            suffixes[fixed] += 1
        if m.groupdict().get("ad"):
            adapters.add(m.group("ad"))
        mod = modules.setdefault((m.group("m"), underscore), LoraModule(m.group("m"), underscore))
        if part in mod.keys:
            raise UnsupportedFormat(f"{os.path.basename(path)}: module {mod.name} has two '{part}' tensors "
                                    f"({mod.keys[part]}, {key}); several adapters in one file are not supported")
        mod.keys[part] = key
    if len(adapters) > 1:
        raise UnsupportedFormat(f"{os.path.basename(path)}: holds several PEFT adapters ({', '.join(sorted(adapters))}); "
                                "save one adapter per file")
    alpha, rslora = _adapter_defaults(ckpt.metadata)
    lf = LoraFile(path, strength, ckpt, _describe_format(prefixes, suffixes, adapters), modules, ignored, unsupported,
                  default_alpha=alpha, rslora=rslora)
    for mod in modules.values():
        _check_module(lf, mod)
    return lf


def _check_module(lf: LoraFile, mod: LoraModule) -> None:
    has_a, has_b = "A" in mod.keys, "B" in mod.keys
    if has_a != has_b:
        missing = "lora_B/lora_up" if has_a else "lora_A/lora_down"
        raise MergeError(f"{lf.name}: module {mod.name} has no {missing} tensor")
    if has_a:
        a, b = lf.shape(mod.keys["A"]), lf.shape(mod.keys["B"])
        if len(a) != 2 or len(b) != 2:
            raise UnsupportedFormat(f"{lf.name}: module {mod.name} has non-matrix LoRA weights {a} / {b} "
                                    "(convolution LoRAs are not supported)")
        if a[0] != b[1]:
            raise MergeError(f"{lf.name}: module {mod.name} has lora_A rank {a[0]} but lora_B rank {b[1]}")

"""LoRA files: parse the key zoo into modules, split each module into adapters, and account for every key.

A key is split into (prefix, module, part). Each key ends in exactly one bucket: a part of some adapter
(applied later, or unmapped if its module has no target), ignored by rule (listed with the rule), or
unsupported (listed with the reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from . import adapters
from .errors import MergeError, UnsupportedFormat
from .lorapaths import LoraSpec, is_checkpoint, lora_path, refuse_checkpoint_as_lora
from .st_reader import Checkpoint

# prefixes stripped (repeatedly, in this order); the last group marks kohya-style underscore names
DOT_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoders?[._]|te\d?[._]|lora_te[._]|text_model[._]|conditioner[._]|"
                          r"lora_qwen\d*[-_.]|qwen\d*[._]model[._])")

UNSUPPORTED: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\.lora_mid\.weight$"), "LoCon mid weights are not supported"),
    (re.compile(r"\.(ia3_w|weight_ia3|on_input)$"), "IA3 is not supported"),
    (re.compile(r"\.(oft_blocks|oft_r|boft_R|boft_s)$"), "OFT/BOFT is not supported"),
    (re.compile(r"\.lora_(?:A|down)(?:\.[^.]+){0,2}\.bias$"), "a bias on lora_A/lora_down is not supported"),
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
    adapters: list[adapters.Adapter] = field(default_factory=list)
    leftover: dict[str, str] = field(default_factory=dict)  # parts no adapter type took (e.g. a lone alpha)


@dataclass
class LoraFile:
    path: str
    strength: float
    ckpt: Checkpoint
    format: str = ""
    modules: dict[tuple[str, bool], LoraModule] = field(default_factory=dict)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (key, rule)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    peft: PeftConfig | None = None  # from PEFT / diffusers' lora_adapter_metadata, when present
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


def strip_prefixes(key: str) -> tuple[str, bool, list[str]]:
    """(key without its trainer prefixes, whether it is in kohya's underscore form, the prefixes removed)."""
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


@dataclass(frozen=True)
class PeftConfig:
    """The adapter config a PEFT / diffusers file carries in its `lora_adapter_metadata` metadata key (PEFT
    keeps alpha out of the tensors): LoRA's `lora_alpha`, LoKr/LoHa's `alpha`, the rank `r`, and the per-module
    `rank_pattern` / `alpha_pattern` overrides."""

    lora_alpha: float | None = None
    alpha: float | None = None
    r: int | None = None
    rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    @staticmethod
    def _lookup(patterns: dict, module: str):
        """PEFT's rule: a pattern key names a module by its full name or a dotted suffix (or a regex)."""
        for k, v in patterns.items():
            if module == k or module.endswith("." + k) or re.fullmatch(rf"(.*\.)?{k}", module):
                return v
        return None

    def alpha_for(self, module: str, lora: bool) -> float | None:
        v = self._lookup(self.alpha_pattern, module)
        return float(v) if v is not None else (self.lora_alpha if lora else self.alpha)

    def rank_for(self, module: str) -> int | None:
        v = self._lookup(self.rank_pattern, module)
        return int(v) if v is not None else self.r


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def peft_config(meta: dict[str, str], name: str) -> PeftConfig | None:
    """The first adapter config found in `lora_adapter_metadata` (it may be nested, e.g. under "transformer").
    A broken one is refused: its alpha may be what scales the whole file."""
    return _first_config(meta.get("lora_adapter_metadata") or "null", f"{name}: its metadata lora_adapter_metadata")


def peft_config_beside(path: str) -> PeftConfig | None:
    """PEFT's `save_pretrained` keeps alpha and r in `adapter_config.json` next to `adapter_model.safetensors`."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"cannot read {cfg}: {e}") from None
    return _first_config(text, cfg)


def _first_config(text: str, what: str) -> PeftConfig | None:
    try:
        stack = [json.loads(text)]
    except (json.JSONDecodeError, RecursionError):
        raise MergeError(f"{what} is not valid JSON (or nests too deep)") from None
    while stack:
        d = stack.pop(0)
        if not isinstance(d, dict):
            continue
        if any(_number(d.get(k)) for k in ("r", "lora_alpha", "alpha")):
            pat = {k: v for k in ("rank_pattern", "alpha_pattern") if isinstance(v := d.get(k), dict)}
            return PeftConfig(float(d["lora_alpha"]) if _number(d.get("lora_alpha")) else None,
                              float(d["alpha"]) if _number(d.get("alpha")) else None,
                              int(d["r"]) if _number(d.get("r")) else None, d.get("use_rslora") is True,
                              pat.get("rank_pattern", {}), pat.get("alpha_pattern", {}))
        stack.extend(d.values())
    return None


def _describe_format(prefixes: Counter, styles: Counter, peft_names: set[str], types: Counter) -> str:
    kohya = prefixes.get("lora_unet_") or prefixes.get("lycoris_") or prefixes.get("lora_transformer_")
    parts = [label for prefix, label in (
        ("lora_unet_", "kohya/musubi (lora_unet_)"), ("lycoris_", "LyCORIS (lycoris_)"),
        ("lora_transformer_", "kohya-style (lora_transformer_)"),
        ("diffusion_model.", "ComfyUI/ai-toolkit (diffusion_model.)"), ("base_model.model.", "PEFT (base_model.model.)"),
        ("transformer.", "diffusers pipeline (transformer.)")) if prefixes.get(prefix)]
    if prefixes.get("model.diffusion_model.") and not prefixes.get("diffusion_model."):
        parts.append("ComfyUI/ai-toolkit (diffusion_model.)")
    if peft_names:
        parts.append(f"PEFT adapter-named ({', '.join(sorted(peft_names))})")
    if styles.get("down/up") and not kohya:
        parts.append("lightx2v-style (lora_down/lora_up" + (" + alpha)" if styles.get("alpha") else ")"))
    if styles.get("A/B") and not parts:
        parts.append("diffusers/PEFT (lora_A/lora_B)")
    if styles.get("diff") and not parts:
        parts.append("full/bias deltas (.diff)")
    kinds = [t for t in types if t not in ("LoRA", "bias delta", "full diff")]  # named: LoKr, LoHa, DoRA
    text = " + ".join(parts) if parts else "unknown"
    return f"{text}; {', '.join(sorted(types))}" if kinds else text


def _match(key: str) -> tuple[str, str, str | None, str] | None:
    """(module, part, PEFT adapter name, spelling style) of a stripped key, or None."""
    for pat, _ in adapters.key_patterns():
        m = pat.match(key)
        if m:
            return (*m, pat.style)
    return None


def _parse_keys(lf: LoraFile) -> tuple[Counter, Counter, set[str]]:
    """Sort every key of the file into a module part, the ignored list or the unsupported list."""
    prefixes, styles, peft_names = Counter(), Counter(), set()
    for key in lf.ckpt.keys():
        if TEXT_ENCODER.match(key):
            lf.ignored.append((key, "text-encoder LoRA (this tool merges the diffusion transformer only)"))
            continue
        reason = next((r for rx, r in UNSUPPORTED if rx.search(key)), None)
        stripped, underscore, used = strip_prefixes(key)
        m = None if reason else _match(stripped)
        if m is None:
            lf.unsupported.append((key, reason or "not a LoRA key this tool understands"))
            continue
        module, part, peft_name, style = m
        prefixes.update(used)
        styles[style] += 1
        if peft_name:
            peft_names.add(peft_name)
        mod = lf.modules.setdefault((module, underscore), LoraModule(module, underscore))
        if part in mod.keys:
            raise UnsupportedFormat(f"{lf.name}: module {mod.name} has two '{part}' tensors "
                                    f"({mod.keys[part]}, {key}); several adapters in one file are not supported")
        mod.keys[part] = key
    return prefixes, styles, peft_names


def _pair_lone_alphas(lf: LoraFile) -> None:
    """An alpha alone under one spelling of a module name, its weights alone under another (Anime-Z's Z-Image
    files: `….to.q.lora.down.weight` with `….to_q.alpha`): the same module when the names agree with every '.'
    read as '_' (how dotted names resolve anyway) and exactly one weights-only module matches, as diffusers'
    Z-Image converter pairs them."""
    def normal(mod: LoraModule) -> str:
        return mod.name.replace(".", "_")

    lone = [key for key, mod in lf.modules.items() if set(mod.keys) == {"alpha"}]
    for key in lone:
        alpha_mod = lf.modules[key]
        mates = [mod for mod in lf.modules.values() if mod is not alpha_mod and "alpha" not in mod.keys
                 and normal(mod) == normal(alpha_mod)]
        if len(mates) == 1:
            mates[0].keys["alpha"] = alpha_mod.keys["alpha"]
            del lf.modules[key]


def open_lora(spec: LoraSpec | str) -> LoraFile:
    """Open and parse one LoRA (a str is read as `LORA[:STRENGTH]`); the caller closes `.ckpt`."""
    path, strength = lora_path(LoraSpec.of(spec))
    lf = LoraFile(path, strength, Checkpoint(path))
    try:
        prefixes, styles, peft_names = _parse_keys(lf)
        _pair_lone_alphas(lf)
        if len(peft_names) > 1:
            raise UnsupportedFormat(f"{lf.name}: holds several PEFT adapters ({', '.join(sorted(peft_names))}); "
                                    "save one adapter per file")
        lf.peft = peft_config(lf.ckpt.metadata, lf.name)
        if lf.peft is None and prefixes.get("base_model.model."):  # a PEFT save_pretrained folder
            lf.peft = peft_config_beside(path)
        types: Counter = Counter()
        for mod in lf.modules.values():
            mod.adapters, mod.leftover = adapters.claim(lf, mod.name, mod.keys)
            types.update(a.title for a in mod.adapters)
        lf.format = _describe_format(prefixes, styles, peft_names, types)
        if not lf.modules:
            refuse_checkpoint_as_lora(lf.ckpt, lf.path)
    except BaseException:
        lf.ckpt.close()
        raise
    return lf


def lora_key_example(keys) -> str | None:
    """A key that only a LoRA file holds (a weight-update part of some adapter type), or None."""
    for key in keys:
        m = _match(strip_prefixes(key)[0])
        if m is not None and m[1] != "alpha":
            return key
    return None


def swapped_arguments(base: str, specs: list[LoraSpec]) -> MergeError | None:
    """BASE is a LoRA file and some LORA argument a Nunchaku checkpoint: the two were given the wrong way round."""
    with Checkpoint(base) as ckpt:
        if lora_key_example(ckpt.keys()) is None:
            return None
    for spec in specs:
        path = spec.path
        if not os.path.isfile(path):
            continue
        with Checkpoint(path) as other:
            if is_checkpoint(other):
                return MergeError(f"the arguments are swapped: {base} is a LoRA file and {path} a Nunchaku "
                                  f"checkpoint; the base comes first: qwenlora-merge {path} {base}")
    return None


def file_sha256(path: str) -> str:
    """sha256 of a file, hashed once per process like a LoRA's for the provenance (`verify` matches the record)."""
    return _FILE_HASHES.result(_FILE_HASHES.start(path))

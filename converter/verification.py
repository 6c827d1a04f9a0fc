"""`verify`: recompute, from the files alone, how faithfully a merged checkpoint carries base + LoRAs, and
whether it keeps the stock loaders' contract. Shares the planner with `merge`; each layer is checked by its
layer kind (converter.layers)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from .errors import MergeError
from .layers import BY_NAME, VerifyContext, kind_of
from .layout import MAX_RANK, MODULATION_MODES, RANK_STEP
from .lorafile import LoraSpec, file_sha256
from .pipeline import Options, Session, open_session
from .planner import SVD_RANK, Plan
from .st_reader import Checkpoint


@dataclass
class VerifyResult:
    contract: list[str] = field(default_factory=list)  # loader-contract problems
    layers: list[dict] = field(default_factory=list)  # one per layer; "targeted": the plan changes it
    settings: dict | None = None  # the merge's settings from its provenance (None: none recorded)
    loras: list[dict] = field(default_factory=list)  # the LoRAs checked against: path, strength, where found

    @property
    def failed(self) -> list[dict]:
        return [l for l in self.layers if not l["ok"]]

    @property
    def ok(self) -> bool:
        return not self.contract and not self.failed


def _tensor_problems(base: Checkpoint, merged: Checkpoint) -> list[str]:
    """Same keys and dtypes; same shapes except the rank axis of the low-rank branch."""
    probs = []
    bk, mk = set(base.keys()), set(merged.keys())
    miss, extra = sorted(bk - mk), sorted(mk - bk)
    if miss:
        probs.append(f"{len(miss)} keys missing (e.g. {miss[0]})")
    if extra:
        probs.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
    rank_parts = _rank_parts()
    for k in sorted(bk & mk):
        a, b = base.tensors[k], merged.tensors[k]
        if a.dtype != b.dtype:
            probs.append(f"{k}: dtype {b.dtype}, base has {a.dtype}")
        lowrank = k.rpartition(".")[2] in rank_parts
        if (a.shape[0] != b.shape[0]) if lowrank else (a.shape != b.shape):
            probs.append(f"{k}: shape {b.shape}, base {a.shape}")
    return probs


def _rank_parts() -> set[str]:
    """The tensors whose second axis is a layer's rank, as the layer kinds name them (proj_down, proj_up)."""
    return {part for kind in BY_NAME.values() for part in kind.rank_parts}


def _json_object(raw: str | None) -> dict | None:
    try:
        qc = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, RecursionError):
        return None
    return qc if isinstance(qc, dict) else None


def _rank_problems(base: Checkpoint, merged: Checkpoint) -> list[str]:
    """One rank for every low-rank branch, a multiple of 16 within the kernel's limit, equal to the metadata's;
    quantization_config otherwise unchanged."""
    qc = _json_object(merged.metadata.get("quantization_config"))
    if qc is None:
        return ["metadata quantization_config is missing or not a JSON object"]
    probs = []
    rank_parts = _rank_parts()
    ranks = {merged.tensors[k].shape[1] for k in merged.keys() if k.rpartition(".")[2] in rank_parts}
    meta_rank = qc.get("rank", 32)
    if len(ranks) > 1:
        probs.append(f"SVDQ layers have different ranks {sorted(ranks)}; loaders build one rank for all")
    elif ranks and ranks != {meta_rank}:
        probs.append(f"metadata rank {meta_rank} does not match the layers' rank {next(iter(ranks))} (stale rank)")
    if any(r % RANK_STEP for r in ranks) or any(r > MAX_RANK for r in ranks):
        probs.append(f"rank {sorted(ranks)} is not a multiple of {RANK_STEP} or above {MAX_RANK}")
    a, b = dict(_json_object(base.metadata.get("quantization_config", "{}")) or {}), dict(qc)
    for d in (a, b):
        d.pop("rank", None), d.pop("runtime_manifest", None)
    if a != b:
        probs.append("metadata quantization_config differs from the base beyond its rank")
    return probs


def check_contract(base: Checkpoint, merged: Checkpoint) -> list[str]:
    probs = _tensor_problems(base, merged) + _rank_problems(base, merged)
    for k, v in base.metadata.items():
        if k != "quantization_config" and merged.metadata.get(k) != v:
            probs.append(f"metadata {k!r} differs from the base")
    extra_meta = set(merged.metadata) - set(base.metadata) - {"qwenlora_merge"}
    if extra_meta:
        probs.append(f"metadata has unexpected keys {sorted(extra_meta)}")
    return probs


# -- what the merge recorded ---------------------------------------------------------------------------------------
def merge_record(merged: Checkpoint) -> dict | None:
    """The merged file's provenance record (`qwenlora_merge`), or None when it has none."""
    return _json_object(merged.metadata.get("qwenlora_merge"))


def recorded_options(record: dict | None, allow_unmapped: bool) -> tuple[Options, dict | None]:
    """The merge's own settings (rank cap, SVD rank, modulation mode) from its provenance, to plan exactly as it
    did; a file without them (an older version) is judged as an exact merge with --mod calibrated."""
    got = (record or {}).get("settings")
    if not isinstance(got, dict):
        return Options(modulation="calibrated", allow_unmapped=allow_unmapped), None
    max_rank, svd_rank, mode = got.get("max_rank"), got.get("svd_rank", SVD_RANK), got.get("modulation")
    if (max_rank is not None and not _is_int(max_rank)) or not _is_int(svd_rank) or mode not in MODULATION_MODES:
        raise MergeError(f"the merged file's provenance records settings this version cannot read: {got}")
    settings = {"max_rank": max_rank, "svd_rank": svd_rank, "modulation": mode}
    return Options(modulation=mode, allow_unmapped=allow_unmapped, max_rank=max_rank, svd_rank=svd_rank), settings


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def recorded_loras(merged_path: str, record: dict | None) -> list[dict]:
    """The LoRAs the provenance names, each found beside MERGED (by name) or at its recorded path (relative to
    MERGED's folder), with the recorded sha256: {"path", "strength", "sha256", "found"}. Refuses (exit 2) when
    the record is missing or a LoRA cannot be found unchanged."""
    name = os.path.basename(merged_path)
    entries = (record or {}).get("loras")
    if not isinstance(entries, list) or not entries:
        raise MergeError(f"{name} carries no provenance record naming its LoRAs (not written by qwenlora-merge?); "
                         "give them on the command line: verify BASE MERGED LORA[:STRENGTH]...")
    return [_find_lora(merged_path, entry) for entry in entries]


def _find_lora(merged_path: str, entry) -> dict:
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("strength"), (int, float)) and not isinstance(entry.get("strength"), bool)):
        raise MergeError(f"the provenance record of {os.path.basename(merged_path)} has a LoRA entry this version "
                         f"cannot read: {str(entry)[:200]}")
    folder = os.path.dirname(merged_path)  # relative as given: the report names the files as the user would
    places = [(os.path.join(folder, os.path.basename(entry["file"])), "beside the merged file")]
    if isinstance(entry.get("path"), str):
        places.append((os.path.normpath(os.path.join(folder, entry["path"])), "at its recorded path"))
    seen: dict[str, str] = {}
    for path, where in places:
        if os.path.isfile(path) and path not in seen:
            seen[path] = file_sha256(path)
            if seen[path] == entry["sha256"]:
                return {"path": path, "strength": float(entry["strength"]), "sha256": entry["sha256"], "found": where}
    what = (f"the LoRA {entry['file']} (sha256 {entry['sha256'][:12]}…) that {os.path.basename(merged_path)} "
            "was merged with")
    if seen:
        found = ", ".join(f"{path} has sha256 {digest[:12]}…" for path, digest in seen.items())
        raise MergeError(f"{what} has changed: {found}; give the LoRAs on the command line")
    looked = " or ".join(path for path, _ in places)
    raise MergeError(f"{what} is not at {looked}; give the LoRAs on the command line")


# -- checking ---------------------------------------------------------------------------------------------------
def verify(base_path: str, merged_path: str, lora_specs: list[LoraSpec], *, allow_unmapped: bool = False,
           progress=None) -> tuple[VerifyResult, Session]:
    """Plan as the merge did (its recorded settings; its recorded LoRAs when none are given), then check every
    layer of MERGED through its layer kind. The caller closes the returned session."""
    res = VerifyResult()
    with Checkpoint(merged_path) as merged:
        record = merge_record(merged)
        opts, res.settings = recorded_options(record, allow_unmapped)
        if lora_specs:
            res.loras = [{"path": spec.path, "strength": spec.strength, "found": "given"} for spec in lora_specs]
        else:
            res.loras = recorded_loras(merged_path, record)
            lora_specs = [LoraSpec(lora["path"], lora["strength"]) for lora in res.loras]
        session = open_session(base_path, lora_specs, opts)
        try:
            res.contract = check_contract(session.base, merged)
            _check_layers(VerifyContext(session.base, merged, session.model), session.plan, res, progress)
        except BaseException:
            session.close()
            raise
    return res, session


def _check_layers(ctx: VerifyContext, plan: Plan, res: VerifyResult, progress) -> None:
    layers = list(plan.model.layers.values())
    for i, layer in enumerate(layers):
        if any(layer.key(part) in ctx.base and layer.key(part) not in ctx.merged for part in ("qweight", "weight")):
            continue  # reported by the contract check
        op = plan.ops.get(layer.prefix)
        rec = kind_of(layer).verify(ctx, plan, layer, op)
        if rec is not None:
            res.layers.append(rec | {"targeted": op is not None})
        if progress:
            progress(i + 1, len(layers), layer.prefix)


# -- the picture ------------------------------------------------------------------------------------------------
def block_index(name: str) -> int | None:
    m = re.match(r"^[a-z_]+\.(\d+)\.", name)
    return int(m.group(1)) if m else None


OUTSIDE_BLOCKS = -1  # x position of the layers outside the numbered blocks (img_in, norm_out, …)


def figure(res: VerifyResult):
    """One panel per layer kind present among the targeted layers: each layer's figure against its block (the
    layers outside the blocks at the left, "other"), one marker series per kind of record and the tolerance it
    is judged against, with a legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, MaxNLocator
    except ImportError:
        raise MergeError("--plot needs matplotlib: pip install matplotlib") from None
    panels = _plot_panels(res)
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(10, 3 * max(1, len(panels))), squeeze=False)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no layer is targeted by the LoRAs", ha="center", transform=axes[0, 0].transAxes)
    ticks = FuncFormatter(lambda pos, _: "other" if round(pos) == OUTSIDE_BLOCKS else f"{pos:.0f}")
    blocks = [block for series in panels.values() for pts in series.values() for block, _, _ in pts] or [0]
    for panel, (kind, series) in zip(axes[:, 0], panels.items()):
        _draw_panel(panel, kind, series)
        panel.set_xlim(min(blocks) - 0.5, max(blocks) + 0.5)  # one block axis for every panel
        panel.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole blocks only
        panel.xaxis.set_major_formatter(ticks)
        panel.set_xlabel("block")
    fig.suptitle("qwenlora-merge verify: per-layer fidelity against each kind's tolerance")
    fig.tight_layout()
    return fig


def _plot_panels(res: VerifyResult) -> dict:
    """{kind: {series: [(x, value, tolerance)]}} of the targeted layers."""
    panels: dict = {}
    for rec in res.layers:
        point = BY_NAME[rec["kind"]].plot_point(rec) if rec.get("targeted") and rec["kind"] in BY_NAME else None
        if point is not None:
            series, value, limit = point
            block = block_index(rec["layer"])
            block = OUTSIDE_BLOCKS if block is None else block
            panels.setdefault(BY_NAME[rec["kind"]], {}).setdefault(series, []).append((block, value, limit))
    return panels


def _draw_panel(panel, kind, series: dict) -> None:
    """Each series' points and its tolerance: a line where it is one value, a mark per layer where it differs
    by layer (layers truncated by a rank cap: the best their rank allows)."""
    for index, (label, pts) in enumerate(sorted(series.items())):
        color = f"C{index}"
        panel.scatter([block for block, _, _ in pts], [value for _, value, _ in pts], s=14, color=color, label=label)
        limits = [(block, lim) for block, _, lim in pts if lim is not None]
        name = "tolerance" if len(series) == 1 else f"tolerance ({label})"
        if len({lim for _, lim in limits}) == 1:
            panel.axhline(limits[0][1], color="red" if len(series) == 1 else color, lw=0.8, ls="--",
                          label=f"{name} {limits[0][1]:g}")
        elif limits:
            panel.scatter([block for block, _ in limits], [lim for _, lim in limits], marker="_", s=150, color=color,
                          label=name)
    values = [value for pts in series.values() for _, value, _ in pts]
    if min(values) > 0 and max(values) > 100 * min(values):  # exact and truncated layers differ by decades
        panel.set_yscale("log")
    panel.set_ylabel(kind.plot_label or f"{kind.name} {kind.verify_figure}")
    panel.grid(alpha=0.3)
    panel.legend(loc="best", fontsize="small")


def plot(res: VerifyResult, path: str) -> None:
    fig = figure(res)  # first: it says so in one line when matplotlib is missing
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)

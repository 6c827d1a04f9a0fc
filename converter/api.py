"""The Python API: merge, plan (the dry run), batch, verify and export_diffusers, as the console script runs them.

    from converter import merge
    report = merge("svdq-int4_r32-qwen-image.safetensors", [("style.safetensors", 0.8)], "merged.safetensors")

A LoRA is a path, a `(path, strength)` pair, a `LoraSpec`, or a `str` in the command line's `LORA[:STRENGTH]`
form. The options are keyword arguments with the command line's defaults:

    mod             "calibrated" | "requant" | "biasfold" | "skip": how AWQ modulation layers take a LoRA (--mod)
    max_rank        cap of the uniform W4A4 rank (a multiple of 16), None: exact (--max-rank)
    svd_rank        rank budget of W4A4 updates that are not low-rank (--svd-rank)
    device          where the per-layer maths runs (--device): "auto" (a CUDA GPU when one is usable and the
                    plan has modulation layers or dense updates, else the CPU), "cpu", "cuda", "cuda:N"
    allow_unmapped  merge what can be merged although some LoRA keys have no target (--allow-unmapped)
    overwrite       replace an existing output, never an input (--overwrite)
    progress        progress(done, total, what): called as the work advances, `done` growing to `total` (bytes
                    written for merge, batch and export_diffusers; layers checked for verify)

Every problem a caller can cause raises a `MergeError` (converter.errors documents the hierarchy and the exit code
the console script gives each); a failed call leaves no output and never modifies an input. Each call returns the
report `--json` prints (`Report`, a dict: `report.to_json()` is that text).

Signals are the caller's: the console script installs its handler (converter.interrupts) around these calls.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Union

from .errors import (CodecError, ExportError, FileError, MergeError, ShapeMismatch, UnknownFamily, UnmappedKeys,
                     UnsupportedFormat, VerifyFailed)
from .layout import SVD_RANK

if TYPE_CHECKING:
    from .lorapaths import LoraSpec
    from .st_reader import Checkpoint

__all__ = ["merge", "plan", "batch", "verify", "export_diffusers", "LoraSpec", "Report", "VerifyReport",
           "MergeError", "FileError", "UnknownFamily", "UnsupportedFormat", "ShapeMismatch", "UnmappedKeys",
           "CodecError", "VerifyFailed", "ExportError"]

MODULATION = "calibrated"  # the default of `mod` (--mod)
DEVICE = "auto"  # the default of `device` (--device): a CUDA GPU for heavy layer maths when one is usable
MAX_SHARD_SIZE = "5GB"  # the default of export_diffusers' `max_shard_size` (--max-shard-size)

Lora = Union["LoraSpec", str, os.PathLike, tuple]
Progress = Callable[[int, int, str], None]
# public names that live in modules the console script need not load to start (headers, the export)
_ELSEWHERE = {"LoraSpec": "lorapaths"}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        from importlib import import_module

        return getattr(import_module(f".{_ELSEWHERE[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Report(dict):
    """What merge, plan, batch and export_diffusers return: the dict the console script's `--json` prints.

    Keys (docs in the README's "Python API"): `base`, `rank`, `loras` (key accounting per LoRA), `targets`,
    `warnings`, `expected_output_bytes`, `output_planned`, `dry_run`; after a write also `output`, `output_bytes`,
    `seconds`, `layers` (every changed layer's figures) and `layers_summary`; an export adds `export`.
    """

    def to_json(self, indent: int | None = 1) -> str:
        """The report as the console script's `--json` prints it.

        Args:
            indent: JSON indentation (the console script's: 1).

        Returns:
            The JSON text.
        """
        return json.dumps(self, indent=indent)


class VerifyReport(Report):
    """What verify returns (`verify --json`): `ok`, `contract` (loader-contract problems), `settings` and `loras`
    judged against, `layers_summary`, `untargeted`, and `layers` (every layer's figures and `ok`)."""

    @property
    def ok(self) -> bool:
        """Whether every layer is within tolerance and the loader contract holds."""
        return self["ok"]

    @property
    def failed(self) -> list[dict]:
        """The layers out of tolerance."""
        return [layer for layer in self["layers"] if not layer["ok"]]


# -- the functions -------------------------------------------------------------------------------------------------
def merge(base: str | os.PathLike, loras: Iterable[Lora], output: str | os.PathLike | None = None, *,
          mod: str = MODULATION, max_rank: int | None = None, svd_rank: int = SVD_RANK, device: str = DEVICE,
          allow_unmapped: bool = False, overwrite: bool = False, progress: Progress | None = None) -> Report:
    """Merge LoRAs into a Nunchaku checkpoint and write the merged file (`qwenlora-merge BASE LORA... -o OUT`).

    Args:
        base: the Nunchaku 4-bit checkpoint (`.safetensors`).
        loras: the LoRAs, each a path, a `(path, strength)` pair, a LoraSpec or a `"path:strength"` string.
        output: the file to write; None: `svdq-<int4|fp4>_r<rank>-<base>+<loras>.safetensors` next to `base`.
        mod, max_rank, svd_rank, device, allow_unmapped, overwrite, progress: as the module docstring says.

    Returns:
        The Report: the plan, where the file went (`output`, `output_bytes`) and every changed layer's figures.

    Raises:
        MergeError: any problem with the inputs or the request (a subclass says which); nothing is written.
    """
    return batch(base, [(output, loras)], mod=mod, max_rank=max_rank, svd_rank=svd_rank, device=device,
                 allow_unmapped=allow_unmapped, overwrite=overwrite, progress=progress)[0]


def plan(base: str | os.PathLike, loras: Iterable[Lora], output: str | os.PathLike | None = None, *,
         mod: str = MODULATION, max_rank: int | None = None, svd_rank: int = SVD_RANK, device: str = DEVICE,
         allow_unmapped: bool = False, overwrite: bool = False) -> Report:
    """The dry run of `merge` (`--dry-run`): plan and account for every LoRA key; read headers only, write nothing.

    Args:
        base, loras, output: as for merge.
        mod, max_rank, svd_rank, device, allow_unmapped, overwrite: as for merge (they shape the plan).

    Returns:
        The Report `merge` would start from: targets, new rank, key accounting, warnings, `output_planned` and
        the exact `expected_output_bytes`.

    Raises:
        MergeError: what merge would refuse before writing (an existing output is not refused).
    """
    return batch(base, [(output, loras)], dry_run=True, mod=mod, max_rank=max_rank, svd_rank=svd_rank,
                 device=device, allow_unmapped=allow_unmapped, overwrite=overwrite)[0]


def batch(base: str | os.PathLike, outputs: Iterable[tuple[str | os.PathLike | None, Iterable[Lora]]], *,
          dry_run: bool = False, mod: str = MODULATION, max_rank: int | None = None, svd_rank: int = SVD_RANK,
          device: str = DEVICE, allow_unmapped: bool = False, overwrite: bool = False,
          progress: Progress | None = None) -> list[Report]:
    """Several merged files from one base, reading the base once (`qwenlora-merge batch`).

    Args:
        base: the Nunchaku checkpoint.
        outputs: `(output or None, loras)` for each file to write, as merge's `output` and `loras`.
        dry_run: plan only, as `plan` does.
        mod, max_rank, svd_rank, device, allow_unmapped, overwrite, progress: as the module docstring says;
            `progress` counts the bytes of all outputs together.

    Returns:
        One Report per output, in order.

    Raises:
        MergeError: any problem with any output; then no output is written (all or nothing).
    """
    base = os.fspath(base)
    entries = [(os.fspath(out) if out is not None else None, _specs(loras)) for out, loras in outputs]
    with _file_errors():
        opts = _engine_options(mod, allow_unmapped, device, max_rank, svd_rank, progress, dry_run)
        return _run_outputs(base, entries, opts, dry_run=dry_run, overwrite=overwrite)


def verify(base: str | os.PathLike, merged: str | os.PathLike, loras: Iterable[Lora] | None = None, *,
           allow_unmapped: bool = False, plot: str | os.PathLike | None = None, check: bool = False,
           progress: Progress | None = None) -> VerifyReport:
    """Check a merged file against base + LoRAs from the files alone (`qwenlora-merge verify`).

    Args:
        base: the checkpoint that was merged into.
        merged: the merged file.
        loras: the LoRAs it was merged with; None or empty: the ones its provenance names (found by sha256 beside
            it or at their recorded paths), with the recorded strengths and settings.
        allow_unmapped: as used for the merge.
        plot: a PNG path to draw per-block fidelity to (needs matplotlib); None: no plot.
        check: raise VerifyFailed when the verdict is not OK, instead of returning it.
        progress: progress(layers checked, layers, layer name).

    Returns:
        The VerifyReport; `.ok` is the verdict (the console script exits 4 when it is False).

    Raises:
        MergeError: a missing or changed input; VerifyFailed (exit 4) only with `check=True`.
    """
    from .report import verify_report
    from .verification import plot as draw_plot, verify as check_layers

    specs = _specs(loras or [])
    with _file_errors():
        result, session = check_layers(os.fspath(base), os.fspath(merged), specs, allow_unmapped=allow_unmapped,
                                       progress=progress)
        session.close()
        if plot is not None:
            draw_plot(result, os.fspath(plot))
    report = VerifyReport(verify_report(result))
    if check and not report.ok:
        raise VerifyFailed(f"{os.fspath(merged)}: {len(report['contract'])} contract problems, "
                           f"{len(report.failed)} layers out of tolerance", report)
    return report


def export_diffusers(base: str | os.PathLike, loras: Iterable[Lora], out_dir: str | os.PathLike, *,
                     max_shard_size: int | str = MAX_SHARD_SIZE, dry_run: bool = False, mod: str = MODULATION,
                     max_rank: int | None = None, svd_rank: int = SVD_RANK, device: str = DEVICE,
                     allow_unmapped: bool = False, overwrite: bool = False,
                     progress: Progress | None = None) -> Report:
    """Write base + LoRAs as a folder stock diffusers loads with its Nunchaku Lite quantizer
    (`qwenlora-merge export-diffusers`): config.json and diffusion_pytorch_model.safetensors (or shards + index).

    Args:
        base: the Nunchaku checkpoint (Qwen-Image or Z-Image-Turbo).
        loras: the LoRAs to merge on the way (may be empty), as for merge.
        out_dir: the component folder to write (e.g. a pipeline's `transformer` folder).
        max_shard_size: bytes, or a size like "500MB" / "10GB": shards + an index above it.
        dry_run: plan only; write nothing.
        mod, max_rank, svd_rank, device, allow_unmapped, overwrite, progress: as for merge.

    Returns:
        The Report: the merge's, plus `export` (class, precision, rank, tensors, files).

    Raises:
        MergeError: ExportError for a base diffusers cannot take, or any input problem; the folder appears
            complete or not at all.
    """
    specs = _specs(loras)
    with _file_errors():
        opts = _engine_options(mod, allow_unmapped, device, max_rank, svd_rank, progress, dry_run)
        return Report(_export(os.fspath(base), specs, opts, os.fspath(out_dir), max_shard_size, overwrite, dry_run))


# -- the run -------------------------------------------------------------------------------------------------------
def _run_outputs(base: str, entries: list[tuple[str | None, list[LoraSpec]]], opts, *, dry_run: bool,
                 overwrite: bool) -> list[Report]:
    """Plan every output against one base, then (unless a dry run) stream the base once for all of them."""
    from .report import account_written, summarize_layers
    from .st_reader import Checkpoint

    with Checkpoint(base) as ckpt:
        jobs: list = []
        try:
            reports = _plan_outputs(ckpt, base, entries, opts, jobs, dry_run=dry_run, overwrite=overwrite)
            if not dry_run:
                for job, report, written in zip(jobs, reports, _stream(ckpt, jobs, opts)):
                    records = job.session.records
                    report |= written | {"layers": records, "layers_summary": summarize_layers(records)}
                    account_written(report, job.session.plan, records)
        finally:
            for job in jobs:
                job.session.close_loras()
    return reports


def _plan_outputs(ckpt, base: str, entries: list[tuple[str | None, list[LoraSpec]]], opts, jobs: list, *,
                  dry_run: bool, overwrite: bool) -> list[Report]:
    """Open and plan every output against the opened base; appends each planned job to `jobs` (the caller closes
    their LoRAs whatever happens next) and returns the plans' reports."""
    from .lorafile import swapped_arguments
    from .model import load_model
    from .outputs import check_output, refuse_base_as_lora

    try:
        model = load_model(ckpt)
    except UnknownFamily as e:
        raise swapped_arguments(base, [spec for _, specs in entries for spec in specs]) or e from None
    reports = []
    for output, specs in entries:
        refuse_base_as_lora(base, specs)
        session = _open_session(ckpt, model, specs, opts)
        try:
            out = check_output(base, session.plan, output, specs, dry_run=dry_run, overwrite=overwrite,
                               taken=[job.out_path for job in jobs])
        except BaseException:
            session.close_loras()
            raise
        jobs.append(_job(session, out, replace=overwrite))
        reports.append(_plan_report(session.base, session.plan, out, dry_run))
    for report, size in zip(reports, _planned_sizes(ckpt, jobs)):
        report["expected_output_bytes"] = size  # exact: the header as it will be written, and the tensors
    return reports


def _plan_report(base: Checkpoint, merge_plan, out: str, dry_run: bool) -> Report:
    from .outputs import name_warning
    from .report import plan_report

    report = Report(plan_report(merge_plan, base))
    report["dry_run"] = dry_run
    report["output_planned"] = out
    warning = name_warning(out, merge_plan.model.precision, merge_plan.new_rank)
    if warning:
        report["warnings"].append(warning)
    return report


def _specs(loras: Iterable[Lora] | Lora) -> list[LoraSpec]:
    """The LoRAs as LoraSpecs; one LoRA given alone (not in a list) is taken as that list."""
    from .lorapaths import LoraSpec

    if isinstance(loras, (str, os.PathLike, LoraSpec)):
        loras = [loras]
    return [LoraSpec.of(lora) for lora in loras]


@contextmanager
def _file_errors() -> Iterator[None]:
    """An OSError (a file that cannot be read or written) as the tool's FileError."""
    try:
        yield
    except OSError as e:
        raise FileError.from_os_error(e) from e


def _check_device(device: str) -> None:
    if device not in ("cpu", "auto"):  # "auto" falls back to the CPU by itself (pipeline.pick_device)
        import torch

        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - torch raises several types here
            raise MergeError(f"device {device!r} is not usable here: {str(e).splitlines()[0]}") from None


def _preload_torch() -> None:
    """Start importing torch (seconds) on a thread: headers, plan and the first copies need none of it, so the
    import overlaps them; the first layer transform waits for it. A failed import fails again there, loudly."""
    import threading

    def load() -> None:
        try:
            import torch  # noqa: F401
        except BaseException:  # noqa: BLE001 - reported by the import that needs it
            pass

    threading.Thread(target=load, name="import torch", daemon=True).start()


# -- the seam: the only calls into the streaming engine (converter.pipeline) and the export (converter.export) ----
def _engine_options(mod: str, allow_unmapped: bool, device: str, max_rank: int | None, svd_rank: int,
                    progress: Progress | None, dry_run: bool):
    """The engine's options, once the device is known to work; a run that will write starts importing torch."""
    from .pipeline import Options

    if not dry_run:
        _preload_torch()
    _check_device(device)

    return Options(modulation=mod, allow_unmapped=allow_unmapped, device=device, max_rank=max_rank,
                   svd_rank=svd_rank, progress=progress)


def _open_session(ckpt, model, specs: list[LoraSpec], opts):
    """The LoRAs opened and planned against the opened base (which stays open); the caller closes the LoRAs."""
    from .pipeline import open_session

    return open_session(ckpt, specs, opts, model=model)


def _job(session, out: str, replace: bool):
    from .pipeline import Job

    return Job(session, out, replace=replace)


def _planned_sizes(ckpt, jobs: list) -> list[int]:
    from .pipeline import planned_output_bytes

    return planned_output_bytes(ckpt, jobs)


def _stream(ckpt, jobs: list, opts) -> list[dict]:
    """Stream the base once into every job's output; all are in place, or none."""
    from .pipeline import execute_many

    return execute_many(ckpt, jobs, opts)


def _export(base: str, specs: list[LoraSpec], opts, out_dir: str, max_shard_size: int | str, overwrite: bool,
            dry_run: bool) -> dict:
    from .export import ExportOptions, export_diffusers as run_export, parse_size

    shard_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    return run_export(base, specs, opts, ExportOptions(out_dir, shard_bytes, overwrite, dry_run))

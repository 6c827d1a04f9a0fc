"""Command line: a thin click layer over converter.pipeline / converter.verify."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass

import click

from . import __version__, interrupts
from .errors import MergeError
from .layout import MODULATION_MODES

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_UNMAPPED, EXIT_VERIFY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
NAME_RX = re.compile(r"^svdq-(int4|fp4)_r(\d+)-(.+)$")


class DefaultGroup(click.Group):
    """`qwenlora-merge BASE LORA...` runs `merge`; `qwenlora-merge verify ...` runs a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["merge", *args]
        return super().parse_args(ctx, args)


class Progress:
    """Progress on stderr: a live line on a terminal, a line per ~10 % otherwise; silent with -q."""

    def __init__(self, enabled: bool, label: str = "merging"):
        self.enabled, self.label = enabled, label
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.last_decile = -1

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if not self.enabled or total <= 0:
            return
        now = time.monotonic()
        if now - self.t0 < 1.0 and done < total or (now - self.t0 < 1.0 and self.last == 0.0):
            return  # short jobs stay quiet
        frac = done / total
        el = now - self.t0
        eta = el / frac * (1 - frac) if frac > 0.01 else float("nan")
        msg = f"{self.label} {frac * 100:5.1f}%  {done / 1e9:.2f}/{total / 1e9:.2f} GB  {el:5.0f}s elapsed" + (
            f", ~{eta:.0f}s left" if eta == eta else "")
        if self.tty:
            if now - self.last > 0.2 or done >= total:
                click.echo("\r" + msg + " " * 4, err=True, nl=done >= total)
                self.last = now
        else:
            dec = int(frac * 10)
            if dec > self.last_decile:
                self.last_decile = dec
                click.echo(msg, err=True)


def fail(e: BaseException, debug: bool) -> None:
    if isinstance(e, MergeError):
        click.echo(f"error: {e}", err=True)
        code = e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        click.echo("error: interrupted; nothing was written", err=True)
        code = EXIT_INTERRUPTED
    elif isinstance(e, OSError):
        click.echo(f"error: {e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}", err=True)
        code = EXIT_INPUT
    else:
        click.echo(f"internal error: {type(e).__name__}: {e} (a bug; run with --debug for the traceback)", err=True)
        code = EXIT_BUG
    if debug:
        traceback.print_exception(e)
    sys.exit(code)


def default_output(base: str, precision: str | None, rank: int, loras: list[str]) -> str:
    stem = os.path.basename(base)
    stem = stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem
    m = NAME_RX.match(stem)
    rest = m.group(3) if m else stem
    names = "+".join(os.path.splitext(os.path.basename(p))[0] for p in loras)
    prec = "fp4" if precision == "nvfp4" else "int4"
    return os.path.join(os.path.dirname(os.path.abspath(base)), f"svdq-{prec}_r{rank}-{rest}+{names}.safetensors")


def name_warning(out: str, precision: str | None, rank: int) -> str | None:
    """SGLang reads precision and rank from `svdq-{int4|fp4}_r{N}-` in the file name."""
    stem = os.path.basename(out)
    m = NAME_RX.match(stem)
    if not m:
        return None
    prec = "fp4" if precision == "nvfp4" else "int4"
    if m.group(1) != prec or int(m.group(2)) != rank:
        right = f"svdq-{prec}_r{rank}-{m.group(3)}"
        return (f"the output name says {m.group(1)} rank {m.group(2)} but the file is {prec} rank {rank}; loaders that "
                f"read the name (SGLang) will fail. A right name: {right}")
    return None


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qwenlora-merge")
def main() -> None:
    """Merge LoRAs offline into a Nunchaku 4-bit Qwen-Image or Z-Image-Turbo checkpoint.

    \b
      qwenlora-merge BASE LORA[:STRENGTH]... -o OUT     merge (the default command)
      qwenlora-merge verify BASE MERGED LORA[:STRENGTH]...   re-check a merged file
      qwenlora-merge batch BASE PLAN.json                several outputs, base read once
      qwenlora-merge export-diffusers BASE [LORA[:S]...] -o DIR   a folder stock diffusers loads (Nunchaku Lite)

    The merged file loads in stock ComfyUI-nunchaku and nunchaku's diffusers path: no runtime patch.
    Run `qwenlora-merge merge --help` for every option.
    """


@dataclass
class RunSettings:
    """The options `merge` and `batch` share."""

    dry_run: bool = False
    as_json: bool = False
    allow_unmapped: bool = False
    overwrite: bool = False
    mod: str = "calibrated"
    max_rank: int | None = None
    svd_rank: int = 64
    device: str = "auto"
    quiet: bool = False
    verbose: bool = False
    debug: bool = False


def run_options(f):
    """The click options of RunSettings, in the order --help shows them."""
    opts = [
        click.option("--dry-run", is_flag=True, help="Print the plan and key accounting; write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout (all layers)."),
        click.option("--allow-unmapped", is_flag=True,
                     help="Merge what can be merged even if some LoRA keys have no target (they are listed)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output (never BASE or a LoRA)."),
        click.option("--mod", type=click.Choice(MODULATION_MODES), default="calibrated", show_default=True,
                     help="AWQ modulation layers (img_mod.1/txt_mod.1): requantize calibrated on the timestep "
                          "manifold, plain requantization, fold the mean effect into the bias only, or leave them "
                          "unchanged. A layer is never written worse than unchanged."),
        click.option("--max-rank", type=int, default=None,
                     help="Cap the uniform W4A4 rank (multiple of 16): a layer whose LoRA part does not fit keeps its "
                          "best approximation (truncated SVD); the dropped fraction is reported per layer. "
                          "Default: exact."),
        click.option("--svd-rank", type=int, default=64, show_default=True,
                     help="Rank budget of W4A4 updates that are not low-rank (a full .diff, DoRA, a LoKr/LoHa of too "
                          "large a rank): they are stored by truncated SVD, with the captured fraction of each layer "
                          "reported. The uniform rank grows to at least base + this."),
        click.option("--device", default="auto", show_default=True,
                     help="Device for the per-layer maths: auto (a CUDA GPU when torch sees one and the plan has "
                          "modulation layers or dense updates, else the CPU), cpu, cuda, cuda:N."),
        click.option("-q", "--quiet", is_flag=True, help="No progress and no report (errors still go to stderr)."),
        click.option("-v", "--verbose", is_flag=True, help="List every target layer and every ignored/unmapped key."),
        click.option("--debug", is_flag=True, hidden=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command("merge")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:STRENGTH]...")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file. Default: next to BASE, named svdq-<precision>_r<NEW_RANK>-<base>+<loras>.safetensors.")
@run_options
def merge_cmd(base, loras, output, **settings):
    """Merge LORA files into the Nunchaku checkpoint BASE.

    Each LORA may carry a strength after a colon (default 1.0, negative allowed):
    `style.safetensors:0.8`. W4A4 layers take the LoRA exactly through their low-rank branch (the rank of
    every W4A4 layer grows to one new uniform rank, written into the metadata); 16-bit layers are updated
    in place; AWQ modulation layers are requantized (see --mod) and each layer's fidelity is reported.

    \b
    Adapters: LoRA (every common key format), LyCORIS/PEFT LoKr and LoHa (exact on W4A4 layers), DoRA and
    full diffs (exact on 16-bit layers, truncated SVD on W4A4 layers: see --svd-rank).

    \b
    Exit codes: 0 merged (or planned); 2 bad input; 3 LoRA keys without a target (see --allow-unmapped);
    130 interrupted; 128+n terminated by signal n (143: SIGTERM); 1 internal error. An existing OUTPUT is
    refused without --overwrite; nothing partial is ever left.

    \b
    Examples:
      qwenlora-merge svdq-int4_r32-qwen-image.safetensors lightning.safetensors:1.0 style.safetensors:0.7
      qwenlora-merge base.safetensors lora.safetensors -o merged.safetensors --dry-run
      qwenlora-merge base.safetensors lora.safetensors -o merged.safetensors --json > report.json
    """
    run_jobs(base, [(output, list(loras))], RunSettings(**settings))


def check_device(device: str) -> None:
    if device not in ("cpu", "auto"):
        import torch

        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - torch raises several types here
            raise MergeError(f"device {device!r} is not usable here: {str(e).splitlines()[0]}") from None


def preload_torch() -> None:
    """Start importing torch (seconds) on a thread: headers, plan and the first copies need none of it, so the
    import overlaps them; the first layer transform waits for it. A failed import fails again there, loudly."""
    import threading

    def load() -> None:
        try:
            import torch  # noqa: F401
        except BaseException:  # noqa: BLE001 - reported by the import that needs it
            pass

    threading.Thread(target=load, name="import torch", daemon=True).start()


def check_output(base: str, plan, output: str | None, loras: list[str], *, dry_run: bool, overwrite: bool,
                 taken: list[str]) -> tuple[str, dict]:
    """The output path of one planned merge (given, or named after base and LoRAs) after every refusal that
    protects the inputs and other outputs; returns it with the plan's report."""
    from .lorafile import parse_spec
    from .report import plan_report

    lora_paths = [parse_spec(x)[0] for x in loras]
    out = output or default_output(base, plan.model.precision, plan.new_rank, lora_paths)
    rep = plan_report(plan, base, os.path.getsize(base))
    rep["dry_run"] = dry_run
    rep["output_planned"] = out
    w = name_warning(out, plan.model.precision, plan.new_rank)
    if w:
        rep["warnings"].append(w)
    if same_file(out, base):
        raise MergeError(f"the output {out} is the base checkpoint {base}; refusing to write over an input")
    for p in lora_paths:
        if os.path.exists(out) and same_file(out, p):
            raise MergeError(f"the output {out} is the LoRA {p}; refusing to write over an input")
    if os.path.abspath(out) in {os.path.abspath(t) for t in taken}:
        raise MergeError(f"two outputs of this run are both {out}")
    if not dry_run:
        if os.path.exists(out) and not overwrite:
            raise MergeError(f"{out} exists; pass --overwrite to replace it")
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise MergeError(f"output folder {folder} does not exist")
    return out, rep


def _plan_jobs(ckpt, base: str, entries: list[tuple[str | None, list[str]]], rs: RunSettings, opts,
               jobs: list) -> list[dict]:
    """Open and plan every (output, loras) entry against the opened base; appends each planned job to `jobs` (the
    caller closes their LoRAs whatever happens next) and returns the plans' reports."""
    from .lorafile import parse_spec
    from .model import load_model
    from .pipeline import Job, open_session

    model = load_model(ckpt)
    reports = []
    for output, loras in entries:
        for p in (parse_spec(x)[0] for x in loras):
            if same_file(p, base):
                raise MergeError(f"the LoRA {p} is the base checkpoint itself")
        s = open_session(ckpt, loras, opts, model=model)
        try:
            out, rep = check_output(base, s.plan, output, loras, dry_run=rs.dry_run, overwrite=rs.overwrite,
                                    taken=[j.out_path for j in jobs])
        except BaseException:
            s.close_loras()
            raise
        jobs.append(Job(s, out, replace=rs.overwrite))
        reports.append(rep)
    return reports


def run_jobs(base: str, entries: list[tuple[str | None, list[str]]], rs: RunSettings) -> None:
    """Plan every (output, loras) entry against one base, then stream the base once for all of them."""
    if not rs.dry_run:
        preload_torch()
    try:
        with interrupts.handled():
            reports = _run(base, entries, rs)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - mapped to one line and an exit code
        fail(e, rs.debug)
        return
    print_reports(reports, rs)


def _run(base: str, entries: list[tuple[str | None, list[str]]], rs: RunSettings) -> list[dict]:
    from .pipeline import Options, execute_many
    from .report import account_written, summarize_layers
    from .st_reader import Checkpoint

    check_device(rs.device)
    opts = Options(modulation=rs.mod, allow_unmapped=rs.allow_unmapped, device=rs.device, max_rank=rs.max_rank,
                   svd_rank=rs.svd_rank, progress=Progress(not rs.quiet))
    with Checkpoint(base) as ckpt:
        jobs: list = []
        try:
            reports = _plan_jobs(ckpt, base, entries, rs, opts, jobs)
            if not rs.dry_run:
                for j, rep, res in zip(jobs, reports, execute_many(ckpt, jobs, opts)):
                    rep |= res | {"layers": j.session.records, "layers_summary": summarize_layers(j.session.records)}
                    account_written(rep, j.session.plan, j.session.records)
        finally:
            for j in jobs:
                j.session.close_loras()
    return reports


def print_reports(reports: list[dict], rs: RunSettings) -> None:
    from .report import render

    if rs.as_json:
        click.echo(json.dumps(reports[0] if len(reports) == 1 else {"outputs": reports}, indent=1))
    elif not rs.quiet:
        click.echo("\n\n".join(render(r, rs.verbose) for r in reports))
    if rs.as_json or rs.quiet:
        for r in reports:
            for w in r["warnings"]:
                click.echo(f"warning: {w}", err=True)


def read_batch_file(path: str) -> list[tuple[str | None, list[str]]]:
    """JSON or TOML: {"outputs": [{"output": "a.safetensors", "loras": ["x.safetensors:0.8", ...]}, ...]}.
    A LoRA may also be {"path": ..., "strength": ...}. Relative paths are relative to the plan file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".toml"):
            import tomllib

            data = tomllib.loads(raw.decode())
        else:
            data = json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:
        raise MergeError(f"cannot read batch file {path}: {e}") from None
    root = os.path.dirname(os.path.abspath(path))
    rel = lambda p: p if os.path.isabs(p) else os.path.join(root, p)
    entries = []
    outs = data.get("outputs") if isinstance(data, dict) else None
    if not isinstance(outs, list) or not outs:
        raise MergeError(f"{path}: expected a non-empty 'outputs' list")
    for i, e in enumerate(outs):
        if not isinstance(e, dict) or not isinstance(e.get("loras"), list) or not e["loras"]:
            raise MergeError(f"{path}: outputs[{i}] needs a non-empty 'loras' list")
        specs = []
        for l in e["loras"]:
            if isinstance(l, str):
                p, sep, st = l.rpartition(":")
                specs.append(rel(l) if not sep or not _is_number(st) else f"{rel(p)}:{st}")
            elif isinstance(l, dict) and isinstance(l.get("path"), str):
                strength = l.get("strength", 1.0)
                if not _is_number(str(strength)) or isinstance(strength, bool):
                    raise MergeError(f"{path}: outputs[{i}] gives {l['path']} the strength {strength!r}, not a number")
                specs.append(f"{rel(l['path'])}:{float(strength)}")
            else:
                raise MergeError(f"{path}: outputs[{i}] has a bad LoRA entry {l!r}")
        out = e.get("output")
        if out is not None and not isinstance(out, str):
            raise MergeError(f"{path}: outputs[{i}] has an output {out!r} that is not a path")
        entries.append((rel(out) if out else None, specs))
    return entries


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@main.command("batch")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("plan_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--output-set", "sets", multiple=True, metavar="OUT=LORA[:S][,LORA[:S]...]",
              help="One output and its LoRAs; repeat for more outputs.")
@run_options
def batch_cmd(base, plan_file, sets, **settings):
    """Write several merged files from one BASE, reading BASE once.

    \b
    The outputs come from PLAN_FILE (JSON or TOML) and/or --output-set options:
      {"outputs": [{"output": "a.safetensors", "loras": ["style.safetensors:0.8"]},
                   {"output": "b.safetensors", "loras": ["style.safetensors:0.4", "light.safetensors"]}]}
      qwenlora-merge batch base.safetensors --output-set a.safetensors=style.safetensors:0.8 \\
                                            --output-set b.safetensors=style.safetensors:0.4,light.safetensors
    Every output is written to a temp file first and renamed only when all of them succeeded.
    """
    try:
        entries = read_batch_file(plan_file) if plan_file else []
        for item in sets:
            out, sep, rest = item.partition("=")
            if not sep or not out or not rest:
                raise MergeError(f"--output-set wants OUT=LORA[:S][,LORA[:S]...], got {item!r}")
            entries.append((out, [x for x in rest.split(",") if x]))
        if not entries:
            raise MergeError("nothing to do: give a plan file or --output-set")
    except MergeError as e:
        fail(e, settings["debug"])
        return
    run_jobs(base, entries, RunSettings(**settings))


@main.command("export-diffusers")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("loras", nargs=-1, metavar="[LORA[:STRENGTH]...]")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The diffusers component folder to write (e.g. the `transformer` folder of a pipeline).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Split the weights into numbered shards + an index above this size (500MB, 10GB, ...).")
@run_options
def export_diffusers_cmd(base, loras, out_dir, max_shard_size, **settings):
    """Write BASE, with the LORAs merged in, as a folder that stock diffusers loads with its Nunchaku Lite
    quantizer (diffusers >= 0.42): config.json with the quantization section, then
    diffusion_pytorch_model.safetensors (sharded with an index above --max-shard-size).

    \b
    The LoRAs are merged exactly as by `merge` (same planner, same report); the layers are then written in
    diffusers' module tree: to_qkv split into to_q/to_k/to_v (add_q/k/v_proj), Z-Image's [w3; w1] into w3 and
    w1, Qwen's modulation rows in diffusers' chunk order without the folded +1, int4 img/txt_mlp.net.2 with the
    GELU shift moved into the bias, smooth_factor_orig dropped. Load it with
      QwenImageTransformer2DModel.from_pretrained(DIR, torch_dtype=torch.bfloat16)   (or ZImageTransformer2DModel)

    \b
    Refused (exit 2, nothing written): a base whose smoothing is fused upstream, a family diffusers lacks, an
    existing DIR without --overwrite, a DIR that is or holds an input. The folder appears complete or not at all.
    """
    from .export import ExportOptions, export_diffusers, parse_size, render_export
    from .pipeline import Options

    rs = RunSettings(**settings)
    if not rs.dry_run:
        preload_torch()
    try:
        check_device(rs.device)
        xo = ExportOptions(out_dir, parse_size(max_shard_size), rs.overwrite, rs.dry_run)
        opts = Options(modulation=rs.mod, allow_unmapped=rs.allow_unmapped, device=rs.device, max_rank=rs.max_rank,
                       svd_rank=rs.svd_rank, progress=Progress(not rs.quiet, "exporting"))
        with interrupts.handled():  # SIGINT/SIGTERM/SIGHUP: no temp folder left, one line
            rep = export_diffusers(base, list(loras), opts, xo)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - mapped to one line and an exit code
        fail(e, rs.debug)
        return
    if rs.as_json:
        click.echo(json.dumps(rep, indent=1))
    elif not rs.quiet:
        click.echo(render_export(rep, rs.verbose))
    if rs.as_json or rs.quiet:
        for w in rep["warnings"]:
            click.echo(f"warning: {w}", err=True)


@main.command("verify")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("merged", type=click.Path(exists=True, dir_okay=False))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:STRENGTH]...")
@click.option("--json", "as_json", is_flag=True, help="Every layer's figures as JSON on stdout.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw per-block fidelity to a PNG (needs matplotlib).")
@click.option("--allow-unmapped", is_flag=True, help="As used for the merge.")
@click.option("-q", "--quiet", is_flag=True, help="Only the verdict line.")
@click.option("--debug", is_flag=True, hidden=True)
def verify_cmd(base, merged, loras, as_json, plot_path, allow_unmapped, quiet, debug):
    """Check MERGED against BASE + LORAs, from the files alone.

    \b
    Per layer: W4A4 low-rank exactness (rel. error < 1e-2, main 4-bit path byte-identical), 16-bit layers
    (within 1.5x the bf16 rounding floor, applied fraction 1 +- 1e-2), modulation e_mod on 256 held-out
    timesteps (<= 1.0: never worse than the base). Loader contract: same keys and dtypes, one rank for every
    W4A4 layer equal to the metadata rank, metadata otherwise unchanged.
    Exit 0 when everything holds, 4 when something does not, 2 on bad input.
    """
    from .verify import plot, verify

    try:
        res, s = verify(base, merged, list(loras), allow_unmapped=allow_unmapped)
        s.close()
        if plot_path:
            plot(res, plot_path)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        fail(e, debug)
        return
    if as_json:
        click.echo(json.dumps({"ok": res.ok, "contract": res.contract, "layers": res.layers}, indent=1))
    elif not quiet:
        click.echo(render_verify(res))
    verdict = "OK" if res.ok else f"FAILED ({len(res.contract)} contract problems, {len(res.failed)} layers)"
    click.echo(f"verify: {verdict}", err=True)
    sys.exit(EXIT_OK if res.ok else EXIT_VERIFY)


def render_verify(res) -> str:
    import statistics
    from collections import Counter, defaultdict

    from .layers import by_name

    lines = []
    for p in res.contract:
        lines.append(f"contract  {p}")
    by = defaultdict(list)
    for l in res.layers:
        by[l["kind"]].append(l)
    for kind, ls in sorted(by.items()):
        key = by_name(kind).verify_figure
        vals = [l[key] for l in ls if key in l]
        bad = sum(not l["ok"] for l in ls)
        fig = f"{key} median {statistics.median(vals):.3g} max {max(vals):.3g}" if vals else ""
        acts = Counter(l["action"] for l in ls if "action" in l)  # what the file holds (modulation)
        fig += f" (written: {', '.join(f'{a} {n}' for a, n in sorted(acts.items()))})" if acts else ""
        lines.append(f"{kind:15s} {len(ls):4d} layers  {bad} failing  {fig}")
    for l in res.failed[:20]:
        lines.append(f"FAIL      {l['layer']}: {'; '.join(l['problems'])}")
    if len(res.failed) > 20:
        lines.append(f"... {len(res.failed) - 20} more failing layers (--json lists all)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="qwenlora-merge")

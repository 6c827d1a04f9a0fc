"""Command line: a thin click layer over the Python API (converter.api): options, usage, rendering, exit codes."""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass

import click

from . import __version__, api, interrupts
from .errors import FileError, MergeError
from .layers.base import one_heap
from .layout import MODULATION_MODES, SVD_RANK
from .usage import run_one_line

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_UNMAPPED, EXIT_VERIFY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class DefaultGroup(click.Group):
    """`qwenlora-merge BASE LORA...` runs `merge`; `qwenlora-merge verify ...` runs a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["merge", *args]
        return super().parse_args(ctx, args)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Usage errors as one `error:` line (exit 2), like every other error."""
        one_heap()  # before the writer and compute threads start
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        return run_one_line(super().main, *args, **kwargs)


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
        fraction = done / total
        elapsed = now - self.t0
        eta = elapsed / fraction * (1 - fraction) if fraction > 0.01 else float("nan")
        line = (f"{self.label} {fraction * 100:5.1f}%  {done / 1e9:.2f}/{total / 1e9:.2f} GB  {elapsed:5.0f}s elapsed"
                + (f", ~{eta:.0f}s left" if eta == eta else ""))
        if self.tty:
            if now - self.last > 0.2 or done >= total:
                click.echo("\r" + line + " " * 4, err=True, nl=done >= total)
                self.last = now
        else:
            decile = int(fraction * 10)
            if decile > self.last_decile:
                self.last_decile = decile
                click.echo(line, err=True)


def fail(error: BaseException, debug: bool) -> None:
    """One `error:` line on stderr and the error's exit code (the traceback too with --debug)."""
    if isinstance(error, MergeError):
        click.echo(f"error: {error}", err=True)
        code = error.exit_code
    elif isinstance(error, KeyboardInterrupt):
        click.echo("error: interrupted; nothing was written", err=True)
        code = EXIT_INTERRUPTED
    elif isinstance(error, OSError):  # the API words these as FileError; kept for what fails outside it
        click.echo(f"error: {FileError.from_os_error(error)}", err=True)
        code = EXIT_INPUT
    else:
        click.echo(f"internal error: {type(error).__name__}: {error} (a bug; run with --debug for the traceback)",
                   err=True)
        code = EXIT_BUG
    if debug:
        traceback.print_exception(error)
    sys.exit(code)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qwenlora-merge")
def main() -> None:
    """Merge LoRAs offline into a Nunchaku 4-bit Qwen-Image or Z-Image-Turbo checkpoint.

    \b
      qwenlora-merge BASE LORA[:STRENGTH]... -o OUT     merge (the default command)
      qwenlora-merge verify BASE MERGED [LORA[:STRENGTH]...]   re-check a merged file
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
    mod: str = api.MODULATION
    max_rank: int | None = None
    svd_rank: int = SVD_RANK
    device: str = api.DEVICE
    quiet: bool = False
    verbose: bool = False
    debug: bool = False

    def api_options(self) -> dict:
        """The keyword arguments of the API functions these options set."""
        return {"mod": self.mod, "max_rank": self.max_rank, "svd_rank": self.svd_rank, "device": self.device,
                "allow_unmapped": self.allow_unmapped, "overwrite": self.overwrite}


def run_options(command):
    """The click options of RunSettings, in the order --help shows them."""
    opts = [
        click.option("--dry-run", is_flag=True, help="Print the plan and key accounting; write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout (all layers)."),
        click.option("--allow-unmapped", is_flag=True,
                     help="Merge what can be merged even if some LoRA keys have no target (they are listed)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output (never BASE or a LoRA)."),
        click.option("--mod", type=click.Choice(MODULATION_MODES), default=api.MODULATION, show_default=True,
                     help="AWQ modulation layers (img_mod.1/txt_mod.1): requantize calibrated on the timestep "
                          "manifold, plain requantization, fold the mean effect into the bias only, or leave them "
                          "unchanged. A layer is never written worse than unchanged."),
        click.option("--max-rank", type=int, default=None,
                     help="Cap the uniform W4A4 rank (multiple of 16): a layer whose LoRA part does not fit keeps its "
                          "best approximation (truncated SVD); the dropped fraction is reported per layer. "
                          "Default: exact."),
        click.option("--svd-rank", type=int, default=SVD_RANK, show_default=True,
                     help="Rank budget of W4A4 updates that are not low-rank (a full .diff, DoRA, a LoKr/LoHa of too "
                          "large a rank): they are stored by truncated SVD, with the captured fraction of each layer "
                          "reported. The uniform rank grows to at least base + this."),
        click.option("--device", default=api.DEVICE, show_default=True,
                     help="Device for the per-layer maths: auto (a CUDA GPU when torch sees one and the plan has "
                          "modulation layers or dense updates, else the CPU), cpu, cuda, cuda:N."),
        click.option("-q", "--quiet", is_flag=True, help="No progress and no report (errors still go to stderr)."),
        click.option("-v", "--verbose", is_flag=True, help="List every target layer and every ignored/unmapped key."),
        click.option("--debug", is_flag=True, hidden=True),
    ]
    for option in reversed(opts):
        command = option(command)
    return command


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

    A LORA may be a PEFT save_pretrained folder; one file named twice is merged once at the summed strength
    where that is exact (LoRA, LoKr, LoHa, deltas).

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


def run_jobs(base: str, entries: list[tuple], run_settings: RunSettings) -> None:
    """Plan every (output, loras) entry against one base, then stream the base once for all of them."""
    try:
        with interrupts.handled():
            reports = api.batch(base, entries, dry_run=run_settings.dry_run,
                                progress=Progress(not run_settings.quiet), **run_settings.api_options())
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - mapped to one line and an exit code
        fail(e, run_settings.debug)
        return
    print_reports(reports, run_settings)


def print_reports(reports: list[dict], run_settings: RunSettings) -> None:
    from .report import render

    if run_settings.as_json:
        click.echo(reports[0].to_json() if len(reports) == 1 else json.dumps({"outputs": reports}, indent=1))
    elif not run_settings.quiet:
        click.echo("\n\n".join(render(report, run_settings.verbose) for report in reports))
    echo_warnings(reports, run_settings)


def echo_warnings(reports: list[dict], run_settings: RunSettings) -> None:
    """With --json or -q the report's warnings go to stderr (the text report shows them itself)."""
    if run_settings.as_json or run_settings.quiet:
        for report in reports:
            for warning in report["warnings"]:
                click.echo(f"warning: {warning}", err=True)


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
    from .batchfile import read_batch_file

    try:
        entries = read_batch_file(plan_file) if plan_file else []
        for item in sets:
            out, sep, rest = item.partition("=")
            if not sep or not out or not rest:
                raise MergeError(f"--output-set wants OUT=LORA[:S][,LORA[:S]...], got {item!r}")
            entries.append((out, [text for text in rest.split(",") if text]))
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
@click.option("--max-shard-size", default=api.MAX_SHARD_SIZE, show_default=True,
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
    run_settings = RunSettings(**settings)
    try:
        with interrupts.handled():  # SIGINT/SIGTERM/SIGHUP: no temp folder left, one line
            report = api.export_diffusers(base, loras, out_dir, max_shard_size=max_shard_size,
                                          dry_run=run_settings.dry_run,
                                          progress=Progress(not run_settings.quiet, "exporting"),
                                          **run_settings.api_options())
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - mapped to one line and an exit code
        fail(e, run_settings.debug)
        return
    if run_settings.as_json:
        click.echo(report.to_json())
    elif not run_settings.quiet:
        from .export import render_export

        click.echo(render_export(report, run_settings.verbose))
    echo_warnings([report], run_settings)


@main.command("verify")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("merged", type=click.Path(exists=True, dir_okay=False))
@click.argument("loras", nargs=-1, metavar="[LORA[:STRENGTH]...]")
@click.option("--json", "as_json", is_flag=True, help="Every layer's figures as JSON on stdout.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw per-block fidelity to a PNG (needs matplotlib).")
@click.option("--allow-unmapped", is_flag=True, help="As used for the merge.")
@click.option("-q", "--quiet", is_flag=True, help="Only the verdict line.")
@click.option("-v", "--verbose", is_flag=True, help="Every targeted layer's figures.")
@click.option("--debug", is_flag=True, hidden=True)
def verify_cmd(base, merged, loras, as_json, plot_path, allow_unmapped, quiet, verbose, debug):
    """Check MERGED against BASE + LORAs, from the files alone.

    \b
    Without LORAs, the ones MERGED's provenance names are used: found by name beside MERGED or at their
    recorded path (relative to MERGED's folder), each with the recorded sha256 and strength; exit 2 when one
    is missing or changed. The merge's own settings (rank cap, SVD rank, modulation mode) come from the
    provenance too; a file without them (an older version) is judged as an exact merge.
    \b
    Per layer: W4A4 low-rank exactness (rel. error < 1e-2; a layer truncated by the rank cap or stored by
    truncated SVD: within 1e-2 of the best its rank allows, with the fraction dropped), main 4-bit path
    byte-identical; 16-bit layers within 1.5x the bf16 rounding floor, applied fraction 1 +- 1e-2; modulation
    e_mod on 256 held-out timesteps (<= 1.0: never worse than the base). Loader contract: same keys and dtypes,
    one rank for every W4A4 layer equal to the metadata rank, metadata otherwise unchanged.
    Exit 0 when everything holds, 4 when something does not, 2 on bad input.
    """
    from .report import render_verify

    try:
        report = api.verify(base, merged, loras, allow_unmapped=allow_unmapped, plot=plot_path or None)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        fail(e, debug)
        return
    if as_json:
        click.echo(report.to_json())
    elif not quiet:
        click.echo(render_verify(report, verbose))
    verdict = "OK" if report.ok else (f"FAILED ({len(report['contract'])} contract problems, "
                                      f"{len(report.failed)} layers)")
    click.echo(f"verify: {verdict}", err=True)
    sys.exit(EXIT_OK if report.ok else EXIT_VERIFY)


if __name__ == "__main__":  # pragma: no cover - `python -m converter` installs the signal handler sooner
    interrupts.install()
    main(prog_name="qwenlora-merge")

"""Command line: a thin click layer over converter.pipeline / converter.verify."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

import click

from . import __version__
from .errors import MergeError

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

    The merged file loads in stock ComfyUI-nunchaku and nunchaku's diffusers path: no runtime patch.
    Run `qwenlora-merge merge --help` for every option.
    """


@main.command("merge")
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:STRENGTH]...")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file. Default: next to BASE, named svdq-<precision>_r<NEW_RANK>-<base>+<loras>.safetensors.")
@click.option("--dry-run", is_flag=True, help="Print the plan and key accounting; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout (all layers).")
@click.option("--allow-unmapped", is_flag=True,
              help="Merge what can be merged even if some LoRA keys have no target (they are listed).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (never BASE or a LoRA).")
@click.option("--mod", "mod", type=click.Choice(["calibrated", "requant", "biasfold", "skip"]), default="calibrated",
              show_default=True,
              help="AWQ modulation layers (img_mod.1/txt_mod.1): requantize calibrated on the timestep manifold, plain "
                   "requantization, fold the mean effect into the bias only, or leave them unchanged. A layer is never "
                   "written worse than unchanged.")
@click.option("--device", default="cpu", show_default=True, help="Device for the maths, e.g. cuda.")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no report (errors still go to stderr).")
@click.option("-v", "--verbose", is_flag=True, help="List every target layer and every ignored/unmapped key.")
@click.option("--debug", is_flag=True, hidden=True)
def merge_cmd(base, loras, output, dry_run, as_json, allow_unmapped, overwrite, mod, device, quiet, verbose, debug):
    """Merge LORA files into the Nunchaku checkpoint BASE.

    Each LORA may carry a strength after a colon (default 1.0, negative allowed):
    `style.safetensors:0.8`. W4A4 layers take the LoRA exactly through their low-rank branch (the rank of
    every W4A4 layer grows to one new uniform rank, written into the metadata); 16-bit layers are updated
    in place; AWQ modulation layers are requantized (see --mod) and each layer's fidelity is reported.

    \b
    Exit codes: 0 merged (or planned); 2 bad input; 3 LoRA keys without a target (see --allow-unmapped);
    1 internal error. An existing OUTPUT is refused without --overwrite; nothing partial is ever left.

    \b
    Examples:
      qwenlora-merge svdq-int4_r32-qwen-image.safetensors lightning.safetensors:1.0 style.safetensors:0.7
      qwenlora-merge base.safetensors lora.safetensors -o merged.safetensors --dry-run
      qwenlora-merge base.safetensors lora.safetensors -o merged.safetensors --json > report.json
    """
    from .lora import parse_spec
    from .pipeline import Options, execute, open_session
    from .report import plan_report, render, summarize_layers

    try:
        import torch

        if device != "cpu":
            try:
                torch.empty(1, device=device)
            except Exception as e:  # noqa: BLE001 - torch raises several types here
                raise MergeError(f"device {device!r} is not usable here: {str(e).splitlines()[0]}") from None
        for spec in loras:
            p, _ = parse_spec(spec)
            if same_file(p, base):
                raise MergeError(f"the LoRA {p} is the base checkpoint itself")
        session = None
        opts = Options(modulation=mod, allow_unmapped=allow_unmapped, device=device,
                       progress=Progress(not quiet))
        session = open_session(base, list(loras), opts)
        try:
            plan = session.plan
            out = output or default_output(base, plan.model.precision, plan.new_rank, [parse_spec(s)[0] for s in loras])
            rep = plan_report(plan, base, os.path.getsize(base))
            rep["dry_run"] = dry_run
            rep["output_planned"] = out
            w = name_warning(out, plan.model.precision, plan.new_rank)
            if w:
                rep["warnings"].append(w)
            if same_file(out, base):
                raise MergeError("the output path is the base checkpoint; refusing to write over an input")
            for spec in loras:
                if os.path.exists(out) and same_file(out, parse_spec(spec)[0]):
                    raise MergeError("the output path is one of the LoRA files; refusing to write over an input")
            if not dry_run:
                if os.path.exists(out) and not overwrite:
                    raise MergeError(f"{out} exists; pass --overwrite to replace it")
                folder = os.path.dirname(os.path.abspath(out))
                if not os.path.isdir(folder):
                    raise MergeError(f"output folder {folder} does not exist")
                rep.update(execute(session, out, opts))
                rep["layers"] = session.records
                rep["layers_summary"] = summarize_layers(session.records)
        finally:
            session.close()
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - mapped to one line and an exit code
        fail(e, debug)
        return
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    elif not quiet:
        click.echo(render(rep, verbose))
    for w in rep["warnings"]:
        if as_json or quiet:
            click.echo(f"warning: {w}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()

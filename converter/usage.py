"""Click's usage errors (a missing argument, an unknown option, a bad value) as the one `error:` line every
other error gets, exit status 2, instead of Click's usage block, hint and `Error:` line."""

from __future__ import annotations

import sys

import click
from click.exceptions import NoArgsIsHelpError

EXIT_INTERRUPTED = 130


def usage_line(e: click.ClickException) -> str:
    """`error: <Click's message> (usage: <the command's usage>; see <command> --help)`, on one line."""
    message = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(e, "ctx", None)
    if ctx is None:
        return f"error: {message}"
    usage = " ".join(ctx.get_usage().split())
    usage = usage[len("Usage: "):] if usage.startswith("Usage: ") else usage
    return f"error: {message} (usage: {usage}; see {ctx.command_path} --help)"


def run_one_line(main, *args, **kwargs):
    """Run a click command in non-standalone mode and turn what Click would print itself into one line."""
    try:
        rv = main(*args, standalone_mode=False, **kwargs)
    except NoArgsIsHelpError as e:  # the bare command: its help, as before
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(usage_line(e), err=True)
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(rv if isinstance(rv, int) else 0)

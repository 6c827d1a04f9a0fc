"""The console script `qwenlora-merge` and `python -m converter`.

The signal handler goes in before anything else of the tool is imported (click, the readers, torch): a Ctrl-C or
SIGTERM at any moment then ends with one line and exit 130 / 128+n, never a traceback or an internal error."""

from . import interrupts


def main() -> None:
    interrupts.install()
    try:
        from .cli import main as cli_main

        cli_main(prog_name="qwenlora-merge")
    finally:
        interrupts.ignore_at_exit()


if __name__ == "__main__":
    main()

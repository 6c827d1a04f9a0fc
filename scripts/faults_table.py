"""Run the fault matrix (tests/fault_cases.py) and print it as a Markdown table; used by scripts/faults.sh.

    python scripts/faults_table.py [--only ID,ID] [--keep DIR] [--workers N] [--times]

The command under test is QWENLORA_MERGE_CMD (scripts/faults.sh sets it to the installed console script),
else `python -m converter.cli` from this checkout. The inputs are built in a temp folder (removed afterwards
unless --keep). Exit status 0 whatever the cases found: the table is the result.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fault_cases import CASES, cli_command, make_inputs, problems, run_cases  # noqa: E402


def cell(text: str, width: int = 140) -> str:
    text = " ".join(text.split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case ids")
    ap.add_argument("--keep", help="build inputs and run cases in this folder, and keep it")
    ap.add_argument("--workers", type=int, default=None, help="cases run at once (default: cores, at most 4)")
    ap.add_argument("--times", action="store_true", help="add a column with each case's seconds")
    args = ap.parse_args()
    cases = CASES
    if args.only:
        want = set(args.only.split(","))
        cases = [c for c in CASES if c.id in want]
        if missing := want - {c.id for c in cases}:
            ap.error(f"unknown case ids: {', '.join(sorted(missing))}")
    root = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="qwenlora-faults-"))
    t0 = time.monotonic()
    try:
        print(f"building inputs in {root} ...", file=sys.stderr)
        inputs = make_inputs(root / "inputs")
        print(f"running {len(cases)} cases with: {' '.join(cli_command())}", file=sys.stderr)
        outcomes = run_cases(cases, inputs, root / "cases", workers=args.workers)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    strip = re.compile(re.escape(str(root)) + r"/(?:cases/[^/\s]+/|inputs/)?")
    head = ["case", "exit", "message", "output left?", "inputs unchanged?"] + (["s"] if args.times else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    held, failing = 0, []
    for c in cases:
        o = outcomes[c.id]
        if o.skipped:
            row = [c.id, "skipped", cell(o.skipped), "", ""]
        else:
            lines = o.error_lines
            other = [l for l in o.stderr.splitlines() if l.strip() and not l.startswith("warning:")]
            msg = lines[0] if lines else (other[-1] if other else "(no error line)" if o.rc != 0 else "")
            if "Traceback" in o.stderr:
                msg = f"Traceback … {other[-1]}"
            elif len(lines) > 1:
                msg += f" (+{len(lines) - 1} more error lines)"
            msg = strip.sub("", msg)
            if o.note:
                msg = f"{msg} [{strip.sub('', o.note)}]" if msg else f"[{strip.sub('', o.note)}]"
            left = "yes" if o.output_left else "no"
            if c.want_output:
                left = "yes, complete" if o.output_left and o.output_valid else (
                    "yes, INCOMPLETE" if o.output_left else "no (expected one)")
            if o.temps:
                left += f"; temp left: {len(o.temps)} .partial"
            row = [f"{c.id}", cell(o.exit_text or str(o.rc)), cell(msg), left, "no: " + ", ".join(
                os.path.basename(x) for x in o.changed) if o.changed else "yes"]
            if problems(c, o):
                failing.append(c.id)
            else:
                held += 1
        if args.times:
            row.append(f"{o.seconds:.1f}")
        print("| " + " | ".join(row) + " |")
    ran = sum(1 for c in cases if not outcomes[c.id].skipped)
    print(f"\n{held} of {ran} cases behave as specified"
          + (f"; not yet: {', '.join(failing)}" if failing else "")
          + f" ({time.monotonic() - t0:.0f} s).")
    for c in cases:
        if outcomes[c.id].skipped:
            print(f"skipped {c.id}: {outcomes[c.id].skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

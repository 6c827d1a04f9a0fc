#!/usr/bin/env bash
# The fault matrix (tests/fault_cases.py) against the installed console script, as a Markdown table for the
# README's reliability section: case | exit | message | output left? | inputs unchanged?
#
#   bash scripts/faults.sh                 # every case
#   bash scripts/faults.sh --only disk-full,sigterm@mid --times
#
# Uses .venv/bin/qwenlora-merge when there is one, else `qwenlora-merge` on PATH (QWENLORA_MERGE_CMD overrides
# both, e.g. QWENLORA_MERGE_CMD="python -m converter.cli"). The inputs are built in a temp folder (tiny synthetic
# checkpoints built with the test-only deepcompressor packers: run scripts/test.sh once first; no downloads).
# Some cases mount a tmpfs (disk full, read-only folder): they need root and are
# listed as skipped elsewhere. Exit status 0 whatever the cases found: the table is the result.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
if [ -z "${QWENLORA_MERGE_CMD:-}" ]; then
  if [ -x .venv/bin/qwenlora-merge ]; then
    QWENLORA_MERGE_CMD="$ROOT/.venv/bin/qwenlora-merge"
  elif command -v qwenlora-merge >/dev/null 2>&1; then
    QWENLORA_MERGE_CMD="$(command -v qwenlora-merge)"
  else
    echo "faults.sh: no qwenlora-merge (run scripts/demo.sh or pip install . first)" >&2
    exit 2
  fi
fi
export QWENLORA_MERGE_CMD
exec "$PY" scripts/faults_table.py "$@"

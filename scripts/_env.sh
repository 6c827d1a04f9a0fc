# Sourced by scripts/demo.sh and scripts/test.sh: make a virtual environment in .venv with this package.
# An already-installed torch is reused (the venv sees system site-packages); otherwise the CPU build of
# torch is installed (override with TORCH_SPEC, e.g. TORCH_SPEC="torch>=2.4").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY="$ROOT/.venv/bin/python"
pipq() {  # quiet pip: its log is shown only when it fails
  "$VPY" -m pip install -q --disable-pip-version-check "$@" >"$ROOT/.venv/pip.log" 2>&1 || { cat "$ROOT/.venv/pip.log" >&2; return 1; }
}
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  pipq "${TORCH_SPEC:-torch==2.13.0}"
fi
# reuse the installed setuptools when it can build us; otherwise let pip fetch a build backend
"$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation -e . >"$ROOT/.venv/pip.log" 2>&1 || pipq -e .
export PATH="$ROOT/.venv/bin:$PATH"

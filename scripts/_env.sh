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
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VPY" -m pip install -q --no-build-isolation -e . 2>/dev/null || "$VPY" -m pip install -q -e .
export PATH="$ROOT/.venv/bin:$PATH"

#!/usr/bin/env bash
# Install the package and the test-only packages, then run the test suite.
# The test-only packages (deepcompressor-toolkit: the packed layouts; lycoris-lora and peft: LoKr / LoHa / DoRA
# reconstruction; diffusers: its Nunchaku Lite loader; hypothesis: fuzzing; matplotlib: verify --plot) and
# everything they pull in come from tests/requirements-test.lock at exact versions, installed with --no-deps, so a
# fresh machine gets the same environment whatever was released since. None of them is a runtime dependency.
# Refresh the lock with scripts/lock.sh.
source "$(dirname "$0")/_env.sh"
LOCK="$ROOT/tests/requirements-test.lock"
STAMP="$ROOT/.venv/test-lock.sha256"
want="$(sha256sum "$LOCK" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  pipq --no-deps -r "$LOCK"
  echo "$want" > "$STAMP"
fi
# Only the locked plugins: the virtual environment also sees the system's packages (to reuse an installed torch),
# and a pytest plugin installed there (pytest-benchmark, say) would otherwise join the run.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
exec "$VPY" -m pytest -q -p _hypothesis_pytestplugin "$@"

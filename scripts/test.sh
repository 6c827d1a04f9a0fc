#!/usr/bin/env bash
# Install the package and the test-only oracle (deepcompressor-toolkit, whose declared dependencies do not
# resolve: --no-deps is required), then run the test suite.
source "$(dirname "$0")/_env.sh"
"$VPY" -c "import pytest" >/dev/null 2>&1 || pipq "pytest>=7"
"$VPY" -c "import deepcompressor.backend.nunchaku.utils" >/dev/null 2>&1 || pipq --no-deps deepcompressor-toolkit==0.1.0
# optional dependency of `verify --plot`, installed so that its test runs
"$VPY" -c "import matplotlib" >/dev/null 2>&1 || pipq "matplotlib>=3.5"
exec "$VPY" -m pytest -q "$@"

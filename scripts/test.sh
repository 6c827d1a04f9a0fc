#!/usr/bin/env bash
# Install the package and the test-only oracles, then run the test suite:
#   deepcompressor-toolkit (the packed layouts; its declared dependencies do not resolve: --no-deps),
#   lycoris-lora and peft (LoKr / LoHa / DoRA reconstruction), diffusers (its Nunchaku Lite loader),
#   hypothesis (fuzzing), matplotlib (verify --plot). None of them is a runtime dependency.
source "$(dirname "$0")/_env.sh"
"$VPY" -c "import pytest" >/dev/null 2>&1 || pipq "pytest>=7"
"$VPY" -c "import deepcompressor.backend.nunchaku.utils" >/dev/null 2>&1 || pipq --no-deps deepcompressor-toolkit==0.1.0
"$VPY" -c "import lycoris, peft, diffusers, hypothesis, matplotlib" >/dev/null 2>&1 || \
  pipq "lycoris-lora==4.1.3" "peft==0.21.2" "diffusers==0.42.1" "hypothesis>=6" "matplotlib>=3.5"
exec "$VPY" -m pytest -q "$@"

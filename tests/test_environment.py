"""The test environment is the lock: tests/requirements-test.lock names every package the tests pull in, at an
exact version, and this interpreter runs exactly those (scripts/test.sh installs the lock with --no-deps)."""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TESTS = Path(__file__).resolve().parent
LOCK = TESTS / "requirements-test.lock"
INPUT = TESTS / "requirements-test.in"
NO_DEPS = {"deepcompressor-toolkit"}  # installed without its declared dependencies (they do not resolve)
OUTSIDE = {"torch"}  # installed apart (scripts/_env.sh): an installed torch is reused


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_package_exactly():
    text = [l for l in LOCK.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert text and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", l) for l in text), text


def test_lock_holds_every_requested_package():
    pins = _pins(LOCK)
    for line in INPUT.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            assert name in pins, f"{req.name} of {INPUT.name} is not in the lock (run scripts/lock.sh)"
            assert pins[name] in req.specifier, f"{req.name}: lock {pins[name]} is outside {req.specifier}"


def test_lock_is_closed_under_dependencies():
    """Every dependency of a locked package (markers evaluated here, extras not asked for left out) is locked too:
    installed with --no-deps, a missing one would otherwise be absent, or taken from whatever the machine has."""
    pins, env = _pins(LOCK), default_environment()
    missing = []
    for name in sorted(set(pins) - NO_DEPS):
        for spec in md.requires(name) or []:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in pins and dep not in OUTSIDE:
                missing.append(f"{name} -> {req.name}")
    assert not missing, f"not in the lock: {missing}"


def test_this_interpreter_runs_the_locked_versions():
    pins = _pins(LOCK)
    wrong = {name: (version, md.version(name)) for name, version in pins.items() if md.version(name) != version}
    if wrong and not Path(md.distribution("pytest").locate_file("")).resolve().is_relative_to(
            TESTS.parent.resolve()):
        pytest.skip(f"not run through scripts/test.sh (versions differ: {wrong})")
    assert not wrong, f"installed versions differ from the lock: {wrong}"

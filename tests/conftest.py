"""Shared fixtures: small synthetic Nunchaku checkpoints built with deepcompressor's packers.

Session fixtures return ``Built(path, truth)`` (a NamedTuple: ``path, truth = qwen_int4`` works).
They are shared by every test of the session: never write to ``path`` or mutate ``truth`` tensors;
copy first (or use the ``make_qwen`` / ``make_zimage`` factories, which build into tmp_path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from builders import build_qwen_checkpoint, build_zimage_checkpoint  # noqa: E402


class Built(NamedTuple):
    path: Path
    truth: dict


def _build(factory, directory: Path, name: str, **kwargs) -> Built:
    path = directory / f"{name}.safetensors"
    return Built(path, factory(path, **kwargs))


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path plugin has set up its factory
def pytest_configure(config):
    """Hypothesis keeps a cache (and, on failure, example patches) under .hypothesis/ of the working folder, some of
    it while the tests are collected: point it into pytest's temp folder before that, so a test run leaves nothing
    in the checkout or elsewhere."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None and "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
        folder = factory.getbasetemp() / "hypothesis"
        folder.mkdir(exist_ok=True)
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(folder)
        configuration = sys.modules.get("hypothesis.configuration")  # its plugin may have loaded it already
        if configuration is not None and hasattr(configuration, "set_hypothesis_home_dir"):
            configuration.set_hypothesis_home_dir(folder)


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nunchaku_fixtures")


@pytest.fixture(scope="session")
def qwen_int4(fixture_dir) -> Built:
    return _build(build_qwen_checkpoint, fixture_dir, "svdq-int4_r32-qwen-tiny", precision="int4")


@pytest.fixture(scope="session")
def qwen_nvfp4(fixture_dir) -> Built:
    return _build(build_qwen_checkpoint, fixture_dir, "svdq-fp4_r32-qwen-tiny", precision="nvfp4", seed=1)


@pytest.fixture(scope="session")
def qwen_int4_fused_smooth(fixture_dir) -> Built:
    """Block 0's attn.to_out.0 / attn.to_add_out have smoothing fused upstream (into the V rows)."""
    return _build(
        build_qwen_checkpoint,
        fixture_dir,
        "svdq-int4_r32-qwen-tiny-fused",
        precision="int4",
        seed=2,
        fused_smooth=("transformer_blocks.0.attn.to_out.0",),
    )


@pytest.fixture(scope="session")
def zimage_int4(fixture_dir) -> Built:
    return _build(build_zimage_checkpoint, fixture_dir, "svdq-int4_r32-zimage-tiny", precision="int4", seed=3)


@pytest.fixture(scope="session")
def zimage_nvfp4(fixture_dir) -> Built:
    return _build(build_zimage_checkpoint, fixture_dir, "svdq-fp4_r32-zimage-tiny", precision="nvfp4", seed=4)


@pytest.fixture(scope="session")
def zimage_int4_skip_refiners(fixture_dir) -> Built:
    return _build(
        build_zimage_checkpoint,
        fixture_dir,
        "svdq-int4_r32-zimage-tiny-skipref",
        precision="int4",
        skip_refiners=True,
        seed=5,
    )


ALL_CHECKPOINTS = (
    "qwen_int4",
    "qwen_nvfp4",
    "qwen_int4_fused_smooth",
    "zimage_int4",
    "zimage_nvfp4",
    "zimage_int4_skip_refiners",
)


@pytest.fixture(params=ALL_CHECKPOINTS)
def any_checkpoint(request) -> Built:
    """Parametrized over every session checkpoint."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def make_qwen(tmp_path):
    """Factory: make_qwen(name="x", **build_qwen_checkpoint kwargs) -> Built, in this test's tmp_path."""

    def make(name: str = "qwen", **kwargs) -> Built:
        return _build(build_qwen_checkpoint, tmp_path, name, **kwargs)

    return make


@pytest.fixture
def make_zimage(tmp_path):
    """Factory: make_zimage(name="x", **build_zimage_checkpoint kwargs) -> Built, in this test's tmp_path."""

    def make(name: str = "zimage", **kwargs) -> Built:
        return _build(build_zimage_checkpoint, tmp_path, name, **kwargs)

    return make

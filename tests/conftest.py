"""Shared fixtures: small synthetic Nunchaku checkpoints built with deepcompressor's packers.

Session fixtures return ``Built(path, truth)`` (a NamedTuple: ``path, truth = qwen_int4`` works).
They are shared by every test of the session: never write to ``path`` or mutate ``truth`` tensors;
copy first (or use the ``make_qwen`` / ``make_zimage`` factories, which build into tmp_path).
"""

from __future__ import annotations

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

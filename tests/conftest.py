"""Shared fixtures: an isolated cache folder, the real CIFAR-10 archive, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")  # plain asserts in the shared helpers report their values

REPO = Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory) -> Path:
    """All tests share one fresh cache (features, extracted archives, converted weights)."""
    d = os.environ.get("PTCL_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("ptcl-cache"))
    os.environ["PTCL_CACHE_DIR"] = d
    return Path(d)


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    return CIFAR10_ARCHIVE

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


def _mount_tmpfs(path: Path, options: str) -> bool:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path) -> Path:
    """A folder this process cannot write: mode 0555 for a normal user; for root (who
    ignores permission bits) a read-only tmpfs, or the test is skipped."""
    d = tmp_path / "readonly"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if not _mount_tmpfs(d, "ro,size=1m"):
        pytest.skip("root cannot be denied writes without mounting a read-only file system here")
    yield d
    _umount(d)


@pytest.fixture
def small_tmpfs(tmp_path) -> Path:
    """A 2 MiB tmpfs (a disk that fills up), or the test is skipped."""
    d = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(d, "size=2m"):
        pytest.skip("cannot mount a small tmpfs here")
    yield d
    _umount(d)


@pytest.fixture
def readonly_copy(tmp_path):
    """``copy(folder)``: a copy of ``folder`` on a read-only file system (root needs a
    remounted tmpfs; a normal user gets mode 0555 folders), or the test is skipped."""
    import shutil

    mounted: list[Path] = []

    def copy(folder: Path) -> Path:
        d = tmp_path / "ro"
        if os.geteuid() != 0:
            shutil.copytree(folder, d / folder.name)
            for p in [d / folder.name, *(d / folder.name).rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            return d / folder.name
        if not _mount_tmpfs(d, "size=64m"):
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(d)
        shutil.copytree(folder, d / folder.name)
        import subprocess

        if subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True).returncode:
            pytest.skip("cannot remount the tmpfs read-only")
        return d / folder.name

    yield copy
    for d in mounted:
        _umount(d)

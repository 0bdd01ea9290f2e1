"""Image-folder scans with symbolic links: loops, broken links and duplicates count once.

See the rules in :func:`ptcl.data.datasets.read_image_folder`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptcl.config import DatasetConfig
from ptcl.data.base import fingerprint_files
from ptcl.data.datasets import IMAGE_EXTENSIONS, load_dataset
from ptcl.errors import DataError

CLASSES = ["a", "b", "c", "d"]


def tree(root: Path, n_train: int = 4, n_test: int = 1) -> Path:
    """``root/{train,test}/<a..d>/<i>.png``: 4 classes, ``n_train`` / ``n_test`` images each."""
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (4, 4), (ci * 60, i, 0)).save(root / split / c / f"{i}.png")
    return root


def load(root: Path):
    return load_dataset(DatasetConfig(name="imagefolder", root=str(root)))


def counts(images) -> list[int]:
    return np.bincount(images.targets, minlength=len(CLASSES)).tolist()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(logging.getLogger("ptcl"), "propagate", True)  # the CLI turns it off
    caplog.set_level(logging.INFO, logger="ptcl")
    return caplog


def warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# --------------------------------------------------------------------------- loops


def test_issue_loop_in_class_folder_counts_each_image_once(tmp_path: Path, logs) -> None:
    root = tree(tmp_path / "ds")
    os.symlink(".", root / "train" / "a" / "loop")  # ln -s . train/a/loop
    s = load(root)
    assert len(s.train) == 16 and counts(s.train) == [4, 4, 4, 4]  # was 176: a counted 41x
    assert all("/loop/" not in p for p in s.train.samples)
    assert str(root / "train" / "a" / "loop") in warnings(logs)


@pytest.mark.parametrize(
    "target",
    [
        "..",  # its class folder
        "../..",  # train/, which holds every class
        "../../..",  # the dataset root: train/ and test/
        "../../../..",  # tmp_path, an ancestor of the dataset root
    ],
)
def test_deeper_loops_and_links_to_ancestors_are_skipped(tmp_path: Path, logs, target: str) -> None:
    """One link per case: with several, the old walk's paths multiply without end."""
    root = tree(tmp_path / "ds")
    sub = root / "train" / "b" / "sub"
    sub.mkdir()
    Image.new("RGB", (4, 4)).save(sub / "s.png")
    os.symlink(target, sub / "link")
    s = load(root)
    assert counts(s.train) == [4, 5, 4, 4] and counts(s.test) == [1, 1, 1, 1]
    assert str(sub / "link") in warnings(logs)


def test_link_to_folder_outside_tree_followed_once(tmp_path: Path) -> None:
    root = tree(tmp_path / "ds")
    extra = tmp_path / "extra"
    (extra / "deep").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(extra / "e0.png")
    Image.new("RGB", (4, 4)).save(extra / "deep" / "e1.png")
    os.symlink("../../../extra", root / "train" / "a" / "more")  # a sibling of the tree
    os.symlink(extra, root / "train" / "a" / "second")  # a second link: not counted twice
    os.symlink(extra / "deep", root / "train" / "b" / "part")  # already walked under a
    os.symlink(".", extra / "self")  # a loop outside the tree
    s = load(root)
    assert counts(s.train) == [6, 4, 4, 4]
    linked = [p for p in s.train.samples if "more" in p]
    assert linked == [str(root / "train/a/more/e0.png"), str(root / "train/a/more/deep/e1.png")]


def test_links_into_another_class_or_split_are_not_counted_twice(tmp_path: Path, logs) -> None:
    root = tree(tmp_path / "ds")
    a = root / "train" / "a"
    os.symlink("../b", a / "bb")  # b's folder: its images stay in b
    os.symlink("../b/0.png", a / "b0.png")  # one image of b
    os.symlink("../d/0.png", root / "train" / "d" / "0-again.png")  # its own image again
    os.symlink("../../test/a", a / "leak")  # test images must not become training images
    os.symlink("../../test/c/0.png", a / "leak.png")
    s = load(root)
    assert counts(s.train) == [4, 4, 4, 4] and counts(s.test) == [1, 1, 1, 1]
    w = warnings(logs)
    for name in ("bb", "b0.png", "leak", "leak.png"):
        assert str(a / name) in w
    assert w.count("class folder 'b'") == 2 and w.count("inside the other split") == 2
    assert "broken" not in w
    assert str(root / "train" / "d" / "0-again.png") in w


@pytest.mark.parametrize(
    "target, match",
    [("a", "same folder"), ("..", "holds the split folder"), ("../test/a", "other split")],
)
def test_class_folder_links_that_would_double_count_are_refused(
    tmp_path: Path, target: str, match: str
) -> None:
    root = tree(tmp_path / "ds")
    os.symlink(target, root / "train" / "e")
    (root / "test" / "e").mkdir()
    Image.new("RGB", (4, 4)).save(root / "test" / "e" / "0.png")
    with pytest.raises(DataError, match=match) as ei:
        load(root)
    assert "\n" not in str(ei.value)


def test_class_folder_link_elsewhere_is_followed(tmp_path: Path) -> None:
    root = tree(tmp_path / "ds")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "elsewhere" / "0.png")
    os.symlink(tmp_path / "elsewhere", root / "train" / "e")
    os.symlink(tmp_path / "elsewhere", root / "test" / "e")  # the same folder in both: allowed
    s = load(root)
    assert s.train.classes[-1] == "e" and len(s.train) == 17 and len(s.test) == 5


# --------------------------------------------------------------------------- broken links


def test_dangling_symlink_skipped_with_warning(tmp_path: Path, logs) -> None:
    root = tree(tmp_path / "ds")
    gone = root / "train" / "b" / "gone.png"
    os.symlink(tmp_path / "nowhere.png", gone)
    os.symlink(tmp_path / "no-folder", root / "train" / "b" / "gone-dir")
    os.symlink(tmp_path / "no-class", root / "train" / "e")  # a class folder link
    s = load(root)
    assert counts(s.train) == [4, 4, 4, 4] and str(gone) not in s.train.samples
    for i in range(len(s.train)):  # no FileNotFoundError later, while extracting features
        s.train.load(i)
    w = warnings(logs)
    assert str(gone) in w and "broken symbolic link" in w and "gone-dir" in w
    assert str(root / "train" / "e") in w


def test_class_with_only_broken_links_names_them(tmp_path: Path) -> None:
    root = tree(tmp_path / "ds")
    (root / "train" / "e").mkdir()
    os.symlink(tmp_path / "nowhere.png", root / "train" / "e" / "x.png")
    with pytest.raises(DataError, match=r"holds no images .*skipped .*x\.png \(broken"):
        load(root)


def test_fingerprint_files_names_a_missing_file(tmp_path: Path) -> None:
    ok = tmp_path / "ok.png"
    Image.new("RGB", (2, 2)).save(ok)
    os.symlink(tmp_path / "nowhere.png", tmp_path / "gone.png")
    with pytest.raises(DataError, match=r"gone\.png: broken symbolic link") as ei:
        fingerprint_files([str(ok), str(tmp_path / "gone.png")], [0, 0], str(tmp_path))
    assert "\n" not in str(ei.value)
    with pytest.raises(DataError, match=r"vanished\.png: missing"):
        fingerprint_files([str(tmp_path / "vanished.png")], [0], str(tmp_path))


def test_file_link_to_non_image_named_at_load(tmp_path: Path) -> None:
    """Files are kept by their (link) name; a non-image target fails when loaded, naming both."""
    root = tree(tmp_path / "ds")
    (tmp_path / "notes.txt").write_text("not an image")
    fake = root / "train" / "a" / "fake.png"
    os.symlink(tmp_path / "notes.txt", fake)
    s = load(root)
    i = list(s.train.samples).index(str(fake))
    with pytest.raises(DataError, match="corrupt or unreadable image file") as ei:
        s.train.load(i)
    assert str(fake) in str(ei.value) and os.path.realpath(tmp_path / "notes.txt") in str(ei.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_special_file_with_image_name_skipped(tmp_path: Path, logs) -> None:
    root = tree(tmp_path / "ds")
    os.mkfifo(root / "train" / "a" / "pipe.png")  # opening it would block forever
    s = load(root)
    assert counts(s.train) == [4, 4, 4, 4]
    assert "pipe.png (not a regular file)" in warnings(logs)


def test_unreadable_subfolder_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tree(tmp_path / "ds")
    (root / "train" / "a" / "locked").mkdir()
    scandir = os.scandir

    def fake_scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    with pytest.raises(DataError, match=r"cannot read folder .*locked \(Permission denied\)"):
        load(root)


# --------------------------------------------------------------------------- order, summary


def test_plain_tree_order_unchanged(tmp_path: Path) -> None:
    """Without links the listing is os.walk's (sorted, files before subfolders): same keys."""
    root = tree(tmp_path / "ds")
    for rel in ["a/z/1.png", "a/z/0.jpg", "a/m/x.png", "a/.hid/h.png", "a/m/.h.png", "a/B.PNG"]:
        (root / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2, 2)).save(root / "train" / rel, format="PNG")
    expect = []
    for c in CLASSES:
        for dirpath, dirnames, filenames in os.walk(root / "train" / c, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            expect += [
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            ]
    s = load(root)
    assert list(s.train.samples) == expect and len(expect) == 20


def test_images_per_class_summary_logged(tmp_path: Path, logs) -> None:
    root = tree(tmp_path / "ds")
    load(root)
    info = [r.getMessage() for r in logs.records if r.levelno == logging.INFO]
    assert any(m.endswith("train: 4 classes, 4 images each") for m in info)
    assert any(m.endswith("test: 4 classes, 1 image each") for m in info)

    logs.clear()
    Image.new("RGB", (4, 4)).save(root / "train" / "b" / "extra.png")
    Image.new("RGB", (4, 4)).save(root / "train" / "c" / "extra.png")
    (root / "train" / "d" / "0.png").unlink()
    load(root)
    info = [r.getMessage() for r in logs.records if r.levelno == logging.INFO]
    line = "train: 4 classes, 17 images; per class min 3 (d), median 4.5, max 5 (b, c)"
    assert any(m.endswith(line) for m in info), info

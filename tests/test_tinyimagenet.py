"""The ``tinyimagenet`` dataset: Tiny-ImageNet-200's download layout from a folder, a
``.tar.gz`` or a ``.zip``; and the zip extraction of :mod:`ptcl.data.archive`."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptcl.config import DatasetConfig
from ptcl.data.archive import extract_once
from ptcl.data.datasets import load_dataset
from ptcl.data.tinyimagenet import read_tiny_imagenet
from ptcl.errors import DataError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-sub100.tar.gz"

# wnids.txt order is not the label order: labels follow the sorted ids
WNIDS = ["n02124075", "n01443537", "n04067472"]
WORDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n02124075": "Egyptian cat",
    "n04067472": "reel",
    "n09999999": "unused, not a class",
}
TRAIN_PER_CLASS = {"n01443537": 3, "n02124075": 2, "n04067472": 2}
VAL = [("val_0.JPEG", "n04067472"), ("val_1.JPEG", "n01443537"), ("val_2.JPEG", "n02124075"),
       ("val_3.JPEG", "n01443537"), ("val_4.JPEG", "n04067472")]
GREY = ("n02124075", 1)  # this class's second training image is a grayscale JPEG


def _colour(wnid: str) -> tuple[int, int, int]:
    """A distinct flat colour per class (so a test can tell which class an image is)."""
    return {"n01443537": (220, 40, 40), "n02124075": (40, 220, 40), "n04067472": (40, 40, 220)}[wnid]


def make_layout(parent: Path) -> Path:
    """A tiny Tiny-ImageNet-200 download layout under ``parent/tiny-imagenet-200``."""
    root = parent / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{k}\t{v}\n" for k, v in WORDS.items()))
    for w, n in TRAIN_PER_CLASS.items():
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(n):
            if (w, k) == GREY:
                Image.new("L", (64, 64), 128).save(d / f"{w}_{k}.JPEG")
            else:
                Image.new("RGB", (64, 64), _colour(w)).save(d / f"{w}_{k}.JPEG", quality=95)
    for f, w in VAL:
        Image.new("RGB", (64, 64), _colour(w)).save(root / "val" / "images" / f, quality=95)
    (root / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in VAL))
    return root


def make_tar(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return dest


def make_zip(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, str(p.relative_to(folder.parent)))
    return dest


@pytest.fixture
def layout(tmp_path) -> Path:
    return make_layout(tmp_path / "src")


def _check(splits) -> None:
    order = sorted(WNIDS)
    assert splits.train.classes == order
    assert splits.test.classes == order
    assert splits.class_names == ["goldfish", "Egyptian cat", "reel"]  # first synonym, label order
    assert np.bincount(splits.train.targets).tolist() == [TRAIN_PER_CLASS[w] for w in order]
    assert np.bincount(splits.test.targets).tolist() == [sum(v == w for _, v in VAL) for w in order]
    # every val image carries its annotation's label (the colour tells the class)
    for i in range(len(splits.test)):
        img = splits.test.load(i)
        assert img.mode == "RGB" and img.size == (64, 64)
        wnid = order[splits.test.targets[i]]
        assert np.abs(np.asarray(img, dtype=int)[32, 32] - _colour(wnid)).max() < 12
    for i in range(len(splits.train)):
        img = splits.train.load(i)
        assert img.mode == "RGB"  # the grayscale JPEG too
    grey = [i for i, p in enumerate(splits.train.samples) if p.endswith(f"{GREY[0]}_{GREY[1]}.JPEG")]
    assert len(grey) == 1
    with Image.open(splits.train.samples[grey[0]]) as raw:
        assert raw.mode == "L"
    a = np.asarray(splits.train.load(grey[0]))
    assert a.shape == (64, 64, 3) and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_folder(layout):
    s = read_tiny_imagenet(layout)
    _check(s)
    assert s.name == "tinyimagenet"
    # the folder that holds tiny-imagenet-200/ works too, and gives the same content
    assert read_tiny_imagenet(layout.parent).train.fingerprint == s.train.fingerprint


def test_registered_with_explicit_names(layout, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("n01443537\tgold fish\nn02124075\tcat\nn04067472\tfishing reel\n")
    s = load_dataset(DatasetConfig(name="tinyimagenet", root=str(layout), class_names=str(names)))
    assert s.class_names == ["gold fish", "cat", "fishing reel"]
    assert s.train.classes == sorted(WNIDS)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archives(layout, tmp_path, kind):
    make = make_tar if kind == "tar" else make_zip
    archive = make(layout, tmp_path / ("tiny.tar.gz" if kind == "tar" else "tiny-imagenet-200.zip"))
    s = read_tiny_imagenet(archive)
    _check(s)
    assert "extracted" in Path(s.train.samples[0]).parts  # read from the cache, not the source
    again = read_tiny_imagenet(archive)  # extracted once: the same files, the same fingerprint
    assert again.train.samples == s.train.samples
    assert again.train.fingerprint == s.train.fingerprint


def test_fingerprint_tracks_content(layout):
    before = read_tiny_imagenet(layout)
    ann = layout / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace("val_4.JPEG\tn04067472", "val_4.JPEG\tn01443537"))
    after = read_tiny_imagenet(layout)
    assert after.train.fingerprint == before.train.fingerprint
    assert after.test.fingerprint != before.test.fingerprint  # a relabelled val image


def _edit(root: Path, what: str) -> None:
    if what == "wnids":
        (root / "wnids.txt").unlink()
    elif what == "annotations":
        (root / "val" / "val_annotations.txt").unlink()
    elif what == "unknown_wnid":
        with (root / "val" / "val_annotations.txt").open("a") as f:
            f.write("val_0.JPEG\tn00000001\t0\t0\t1\t1\n")
    elif what == "missing_file":
        (root / "val" / "images" / "val_3.JPEG").unlink()
    elif what == "train_class":
        shutil.rmtree(root / "train" / "n04067472")
    elif what == "bad_line":
        with (root / "val" / "val_annotations.txt").open("a") as f:
            f.write("val_9.JPEG n01443537\n")


@pytest.mark.parametrize("what,needle", [
    ("wnids", "wnids.txt"),
    ("annotations", "val_annotations.txt"),
    ("unknown_wnid", "n00000001"),
    ("missing_file", "val_3.JPEG"),
    ("train_class", "n04067472"),
    ("bad_line", "line 6"),
])
def test_errors(layout, what, needle):
    _edit(layout, what)
    with pytest.raises(DataError) as e:
        read_tiny_imagenet(layout)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_root_and_non_archive(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        read_tiny_imagenet(tmp_path / "nowhere")
    assert "tiny-imagenet-200.zip" in str(e.value)  # says where to get it
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="not a .zip or tar archive"):
        read_tiny_imagenet(f)


# --------------------------------------------------------------------------- zip extraction


def test_zip_corrupt_is_one_line_and_leaves_nothing(tmp_path, _cache_dir):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    before = set((_cache_dir / "extracted").glob("*")) if (_cache_dir / "extracted").is_dir() else set()
    with pytest.raises(DataError, match="may be corrupt") as e:
        extract_once(bad)
    assert "\n" not in str(e.value)
    assert set((_cache_dir / "extracted").glob("*")) == before


def test_zip_crc_mismatch(tmp_path, layout):
    good = make_zip(layout, tmp_path / "t.zip")
    data = bytearray(good.read_bytes())
    i = data.index(b"n09999999")  # inside words.txt, stored uncompressed: flip a byte of it
    data[i] ^= 0x01
    bad = tmp_path / "crc.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="may be corrupt") as e:
        extract_once(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_zip_unsafe_member_refused(tmp_path, name):
    z = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    with pytest.raises(DataError, match="unsafe member"):
        extract_once(z)
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/abs/evil.txt").exists()


def test_zip_symlink_refused(tmp_path):
    z = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16)  # a symbolic link, as Info-ZIP stores one
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        extract_once(z)


def test_zip_extracted_once(tmp_path):
    z = tmp_path / "once.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("d/a.txt", "hello")
    first = extract_once(z)
    assert (first / "d" / "a.txt").read_text() == "hello"
    (first / "d" / "marker").write_text("kept")  # a second call must not extract again
    assert extract_once(z) == first
    assert (first / "d" / "marker").is_file()
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- the real archive


def test_real_archive():
    if not REAL.is_file():
        pytest.skip(f"real Tiny-ImageNet archive not found at {REAL}")
    s = load_dataset(DatasetConfig(name="tinyimagenet", root=str(REAL)))
    assert s.num_classes == 200
    assert np.bincount(s.train.targets, minlength=200).tolist() == [100] * 200
    assert np.bincount(s.test.targets, minlength=200).tolist() == [50] * 200
    assert s.train.classes == sorted(s.train.classes)
    gold = s.train.classes.index("n01443537")
    assert s.class_names[gold] == "goldfish"
    assert s.class_names[s.train.classes.index("n02124075")] == "Egyptian cat"
    # val labels come from val_annotations.txt: check a few lines against the label
    ann = Path(s.test.samples[0]).parents[1] / "val_annotations.txt"
    table = dict(ln.split("\t")[:2] for ln in ann.read_text().splitlines()[:50])
    by_file = {Path(p).name: s.train.classes[t] for p, t in zip(s.test.samples, s.test.targets)}
    assert all(by_file[f] == w for f, w in table.items())


def test_imagefolder_reads_a_zip(tmp_path):
    """The zip support of ``extract_once`` serves the ``imagefolder`` dataset too."""
    top = tmp_path / "src" / "data"
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("ant", "bee"):
            d = top / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (8, 8), (k, 0, 0)).save(d / f"{k}.png")
    s = load_dataset(DatasetConfig(name="imagefolder", root=str(make_zip(top, tmp_path / "data.zip"))))
    assert s.train.classes == ["ant", "bee"]
    assert (len(s.train), len(s.test)) == (4, 2)
    assert s.train.targets.tolist() == [0, 0, 1, 1]

"""Tiny-ImageNet-200 (Le & Yang, 2015) read from its original download layout.

The layout of ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip),
as a folder, a tar archive of it or the zip itself (archives are extracted once into the
cache, :func:`ptcl.data.archive.extract_once`)::

    tiny-imagenet-200/wnids.txt                       the class ids (WordNet ids), one a line
    tiny-imagenet-200/words.txt                       wnid<TAB>synonym, synonym, ...
    tiny-imagenet-200/train/<wnid>/images/*.JPEG      500 training images per class
    tiny-imagenet-200/val/images/*.JPEG               50 validation images per class,
    tiny-imagenet-200/val/val_annotations.txt         labelled here: file<TAB>wnid<TAB>box...

``val`` is the test split (the original ``test/`` has no labels and is not read). Labels
follow the sorted wnids (as torchvision's ImageFolder would number the class folders), the
class ids (``ImageSet.classes``, recorded as ``class_folders`` in ``metrics.json``) are the
wnids, and the class names are the first synonym of each wnid in ``words.txt``
(:mod:`ptcl.data.class_names`; the wnids themselves if ``words.txt`` is absent). Images are
64x64 JPEGs, a few of them grayscale; :meth:`ImageSet.load` returns every one as RGB.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ptcl.data.archive import extract_once, is_archive
from ptcl.data.base import DatasetSplits, ImageSet, fingerprint_files
from ptcl.data.class_names import class_names
from ptcl.errors import DataError

log = logging.getLogger(__name__)

NAME = "tinyimagenet"
TOP_FOLDER = "tiny-imagenet-200"
SOURCE = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
LAYOUT = (
    f"{TOP_FOLDER}/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
    "val/val_annotations.txt"
)
HINT = (
    f"get {SOURCE} and set dataset.root to the .zip, a .tar.gz of it or the unpacked "
    f"{TOP_FOLDER} folder"
)


def find_root(base: Path, max_depth: int = 3) -> Path:
    """The folder holding ``wnids.txt``: ``base``, else its ``tiny-imagenet-200`` sub-folder,
    else down through lone wrapper folders (at most ``max_depth``); ``base`` if none found."""
    if (base / TOP_FOLDER / "wnids.txt").is_file():
        return base / TOP_FOLDER
    p = base
    for _ in range(max_depth + 1):
        if (p / "wnids.txt").is_file():
            return p
        subs = [c for c in p.iterdir() if c.is_dir() and not c.name.startswith((".", "__"))]
        if len(subs) != 1:
            break
        p = subs[0]
    return base


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what}: missing {path}; expected layout {LAYOUT}; {HINT}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what}: cannot read {path}: {e}") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def read_wnids(root: Path, what: str = NAME) -> list[str]:
    """The class ids of ``root/wnids.txt``, sorted (the label order). Raises
    :class:`DataError` for a missing, empty or unreadable file or a repeated id."""
    ids = _read_lines(root / "wnids.txt", what)
    if not ids:
        raise DataError(f"{what}: {root / 'wnids.txt'} lists no class ids")
    seen: set[str] = set()
    for w in ids:
        if w in seen:
            raise DataError(f"{what}: class id {w!r} appears twice in {root / 'wnids.txt'}")
        seen.add(w)
    return sorted(ids)


def _images(folder: Path) -> list[str]:
    """Image files (by suffix, names starting with ``.`` ignored) in ``folder``, sorted."""
    return [
        str(folder / n)
        for n in sorted(os.listdir(folder))
        if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
    ]


def _train_split(root: Path, wnids: list[str], what: str) -> dict[str, list[str]]:
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{what}: missing folder {train}; expected layout {LAYOUT}; {HINT}")
    out: dict[str, list[str]] = {}
    for w in wnids:
        folder = train / w / "images"
        if not folder.is_dir():
            raise DataError(
                f"{what}: missing folder {folder} for class {w} of wnids.txt; expected "
                f"train/<wnid>/images/*.JPEG"
            )
        files = _images(folder)
        if not files:
            raise DataError(f"{what}: {folder} holds no images (.JPEG) for class {w}")
        out[w] = files
    extra = sorted(set(os.listdir(train)) - set(wnids))
    extra = [e for e in extra if (train / e).is_dir() and not e.startswith(".")]
    if extra:
        log.warning("%s: ignoring %d class folders in %s that wnids.txt does not list: %s",
                    what, len(extra), train, ", ".join(extra[:5]))
    return out


def _val_split(root: Path, wnids: list[str], what: str) -> dict[str, list[str]]:
    """wnid -> validation image paths (sorted by file name) from ``val/val_annotations.txt``.

    Raises :class:`DataError` for a missing file or folder, a line with fewer than two
    tab-separated fields, an unknown wnid, a file listed twice or missing, or a class
    without validation images.
    """
    ann = root / "val" / "val_annotations.txt"
    images = root / "val" / "images"
    lines = _read_lines(ann, what)
    if not images.is_dir():
        raise DataError(f"{what}: missing folder {images}; expected layout {LAYOUT}; {HINT}")
    present = set(os.listdir(images))
    known = set(wnids)
    out: dict[str, list[str]] = {w: [] for w in wnids}
    seen: set[str] = set()
    for k, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(
                f"{what}: {ann} line {k} ({line[:60]!r}) is not 'file<TAB>wnid<TAB>box...'"
            )
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in known:
            raise DataError(
                f"{what}: {ann} line {k} labels {name} with {wnid!r}, which wnids.txt does "
                "not list"
            )
        if name in seen:
            raise DataError(f"{what}: {ann} line {k} lists {name} a second time")
        if name not in present or not (images / name).is_file():
            raise DataError(
                f"{what}: {ann} line {k} names {name}, which is missing from {images}"
            )
        seen.add(name)
        out[wnid].append(str(images / name))
    empty = [w for w, f in out.items() if not f]
    if empty:
        raise DataError(
            f"{what}: {ann} labels no validation image with {len(empty)} of the "
            f"{len(wnids)} classes, e.g. {empty[:3]}"
        )
    unlabelled = sorted(
        n for n in present - seen if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
    )
    if unlabelled:
        log.warning("%s: %d images in %s are not in %s and are not used, e.g. %s",
                    what, len(unlabelled), images, ann.name, ", ".join(unlabelled[:3]))
    return {w: sorted(f, key=os.path.basename) for w, f in out.items()}


def read_tiny_imagenet(root: str | os.PathLike[str], name: str = NAME) -> DatasetSplits:
    """Tiny-ImageNet-200 from ``root``: the unpacked folder (or one holding it), or a
    ``.zip`` / tar archive of it (extracted once into the cache).

    Returns the train split and ``val`` as the test split, labels ``0..C-1`` in sorted-wnid
    order, ``classes`` the wnids and ``class_names`` the first synonym from ``words.txt``.
    Each split's fingerprint (:func:`ptcl.data.base.fingerprint_files`) covers its files'
    relative paths, sizes, modification times and labels.

    Raises :class:`DataError` (one line) for a missing root, a file that is not an archive, a
    corrupt archive, a missing ``wnids.txt``, ``train/<wnid>/images`` folder,
    ``val/val_annotations.txt`` or ``val/images`` folder, an annotation naming an unknown
    wnid or a missing file, and a class without train or val images.
    """
    given = Path(root).expanduser()
    if not given.exists():
        raise DataError(f"{name}: dataset root {given} does not exist; {HINT}")
    if given.is_file():
        if not is_archive(given):
            raise DataError(
                f"{name}: {given} is a file but not a .zip or tar archive; {HINT}"
            )
        base = extract_once(given)
    else:
        base = given
    data_root = find_root(base)
    what = f"{name} ({given})"
    wnids = read_wnids(data_root, what)
    splits = {"train": _train_split(data_root, wnids, what), "val": _val_split(data_root, wnids, what)}
    sets = []
    for split in splits.values():
        paths = [p for w in wnids for p in split[w]]
        targets = np.asarray([i for i, w in enumerate(wnids) for _ in split[w]], dtype=np.int64)
        sets.append(ImageSet(paths, targets, list(wnids), fingerprint_files(paths, targets, str(data_root))))
    if not (data_root / "words.txt").is_file():
        log.warning("%s: no words.txt in %s; the class names are the wnids", what, data_root)
    names = class_names(wnids, folders=[data_root])
    log.info("%s: %d classes, %d train / %d val (test) images from %s",
             name, len(wnids), len(sets[0]), len(sets[1]), data_root)
    return DatasetSplits(name, sets[0], sets[1], names)

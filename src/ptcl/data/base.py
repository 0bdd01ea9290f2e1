"""The dataset contract: a dataset loader returns a train and a test :class:`ImageSet`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ptcl.errors import DataError


@dataclass
class ImageSet:
    """One split of a dataset, addressable by index.

    ``samples`` is either a list of image file paths or a uint8 array of shape
    (N, H, W) or (N, H, W, C). ``targets`` holds the dataset's own labels
    ``0..len(classes)-1``. ``fingerprint`` identifies the content (used as part of the
    feature-cache key); :func:`fingerprint_files` / :func:`fingerprint_array` make one.
    """

    samples: Sequence[str] | np.ndarray
    targets: np.ndarray
    classes: list[str]
    fingerprint: str

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        if len(self.samples) != len(self.targets):
            raise ValueError("samples and targets differ in length")

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i: int) -> Image.Image:
        """Return sample ``i`` as an RGB PIL image; a corrupt file raises :class:`DataError`."""
        s = self.samples[i]
        if isinstance(self.samples, np.ndarray):
            return Image.fromarray(np.asarray(s)).convert("RGB")
        try:
            with Image.open(s) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(
                f"corrupt or unreadable image file {s}: {e}; delete or replace the file"
            ) from e


@dataclass
class DatasetSplits:
    name: str
    train: ImageSet
    test: ImageSet

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def fingerprint_files(paths: Sequence[str], targets: Sequence[int], root: str) -> str:
    """Content identity of a file list: relative paths, sizes, modification times, labels."""
    h = hashlib.sha256()
    for p, t in zip(paths, targets):
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}|{st.st_size}|{int(st.st_mtime)}|{int(t)}\n".encode())
    return h.hexdigest()


def fingerprint_array(images: np.ndarray, targets: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(targets, dtype=np.int64).tobytes())
    return h.hexdigest()

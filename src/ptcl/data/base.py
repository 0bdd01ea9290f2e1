"""The dataset contract: a dataset loader returns a train and a test :class:`ImageSet`.

How a sample becomes an 8-bit RGB image (:func:`to_rgb`), by PIL mode:

- ``RGB``, ``L``, ``1``, ``P``, ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB`` without
  transparency: Pillow's own ``convert("RGB")``, unchanged (an ordinary 8-bit JPEG or PNG
  loads bit-identically to earlier releases; ``1`` gives 0 or 255; ``CMYK`` uses Pillow's
  ``R = (255 - C) * (255 - K) / 255``). No ICC colour management is applied.
- 16-bit grey ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: value / 257, rounded to nearest,
  so 0..65535 maps linearly onto 0..255 (Pillow's own conversion clips at 255 instead,
  which turns a 16-bit photo almost white).
- 32-bit integer ``I``: read as 16-bit (value / 257, rounded), because that is how some
  Pillow versions open a 16-bit grey PNG; values outside 0..65535 raise :class:`DataError`.
- 32-bit float ``F``: an image whose values all lie in [0, 1] is scaled by 255; else one
  whose values lie in [0, 255] is kept; both are rounded to nearest (ties to even). Any
  other range, NaN or infinity raises :class:`DataError`.
- Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index or an RGBA
  palette, ``L``/``RGB``/``1``/16-bit grey with a ``transparency`` colour key): composited
  onto a white background, ``out = (c * a + 255 * (255 - a)) / 255`` rounded to nearest
  (premultiplied ``RGBa``/``La``: ``out = c + 255 - a``). White, because transparent
  images in vision data are mostly cut-out objects, sketches and icons drawn to be shown
  on white paper or web pages; black would merge with dark strokes, and dropping alpha
  shows whatever colour happens to hide under transparent pixels (often black).
- Any other mode raises :class:`DataError` naming the file and the mode.

16-bit-per-channel colour files (RGB/RGBA PNG or TIFF) arrive as 8-bit ``RGB``/``RGBA``:
Pillow's decoder keeps the high byte, which can differ by one from value / 257 rounded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ptcl.data.class_names import default_names
from ptcl.errors import DataError

PLAIN_MODES = frozenset({"RGB", "L", "1", "P", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
PREMULTIPLIED_MODES = frozenset({"RGBa", "La"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in ALPHA_MODES or img.mode in PREMULTIPLIED_MODES:
        return True
    if "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """Composite (H, W, 3) colours with (H, W) alpha (both 0..255) onto white."""
    c = rgb.astype(np.int32)
    a = alpha.astype(np.int32)[..., None]
    out = (c * a + 255 * (255 - a) + 127) // 255  # exact rounding: x/255 is never k + 0.5
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _grey8(img: Image.Image, source: str) -> np.ndarray:
    """8-bit grey levels of an ``I;16*``, ``I`` or ``F`` image by the module's rules."""
    v = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(v).all():
            raise DataError(
                f"image file {source}: mode F (32-bit float) holds NaN or infinite values; "
                "replace the file with an 8- or 16-bit image"
            )
        lo, hi = float(v.min(initial=0.0)), float(v.max(initial=0.0))
        if lo < 0 or hi > 255:
            raise DataError(
                f"image file {source}: mode F (32-bit float) values span {lo:g}..{hi:g}, "
                "outside the [0, 1] and [0, 255] ranges ptcl reads; rescale the file to one "
                "of them or save it as an 8- or 16-bit image"
            )
        v = v.astype(np.float64)
        return np.rint(v * 255.0 if hi <= 1 else v).astype(np.uint8)
    v = v.astype(np.int64)
    if img.mode == "I":
        lo, hi = int(v.min(initial=0)), int(v.max(initial=0))
        if lo < 0 or hi > 65535:
            raise DataError(
                f"image file {source}: mode I (32-bit integer) values span {lo}..{hi}, "
                "outside 0..65535, which ptcl reads as 16-bit; save it as an 8- or 16-bit image"
            )
    return ((v + 128) // 257).astype(np.uint8)  # = round(v / 257); never a tie


def to_rgb(img: Image.Image, source: str = "<image>") -> Image.Image:
    """Return ``img`` as an 8-bit RGB image by the per-mode rules of this module.

    ``source`` names the file in error messages. Raises :class:`DataError` for an
    unsupported mode or for ``I``/``F`` values outside the ranges the rules accept.
    """
    mode = img.mode
    if mode in PLAIN_MODES and not _has_transparency(img):
        return img.convert("RGB")
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _grey8(img, source)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        key = img.info.get("transparency")
        if isinstance(key, int) and mode != "F":
            alpha = np.where(np.asarray(img).astype(np.int64) == key, 0, 255)
            return _on_white(rgb, alpha)
        return Image.fromarray(rgb, "RGB")
    if mode in PREMULTIPLIED_MODES:
        v = np.asarray(img).astype(np.int32)
        c = np.repeat(v[..., :1], 3, axis=2) if mode == "La" else v[..., :3]
        out = np.clip(c + 255 - v[..., -1:], 0, 255)
        return Image.fromarray(out.astype(np.uint8), "RGB")
    if mode in ALPHA_MODES or mode in PLAIN_MODES:
        rgba = np.asarray(img.convert("RGBA"))
        return _on_white(rgba[..., :3], rgba[..., 3])
    raise DataError(
        f"image file {source}: unsupported image mode {mode!r}; save it as an RGB, "
        "grey (8- or 16-bit) or RGBA image"
    )


@dataclass
class ImageSet:
    """One split of a dataset, addressable by index.

    ``samples`` is either a list of image file paths or a uint8 array of shape
    (N, H, W) or (N, H, W, C) (a uint16 or float array follows :func:`to_rgb`'s 16-bit
    and ``F`` rules; a 4-channel one is composited onto white). ``targets`` holds the dataset's own labels
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
        """Return sample ``i`` as an 8-bit RGB PIL image by the rules of :func:`to_rgb`.

        Raises :class:`DataError` for a corrupt or unreadable file, an unsupported mode or
        out-of-range ``I``/``F`` values, naming the file (and a symbolic link's target).
        """
        s = self.samples[i]
        if isinstance(self.samples, np.ndarray):
            return to_rgb(Image.fromarray(np.asarray(s)), f"sample {i}")
        try:
            with Image.open(s) as img:
                return to_rgb(img, s)
        except Image.DecompressionBombError as e:
            raise DataError(
                f"image file {s} is too large to decode safely ({e}); shrink or remove it, or "
                "raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            name = f"{s} (a link to {os.path.realpath(s)})" if os.path.islink(s) else s
            raise DataError(
                f"corrupt or unreadable image file {name}: {e}; delete or replace the file"
            ) from e


@dataclass
class DatasetSplits:
    """A dataset's train and test :class:`ImageSet` s. ``class_names``: each class in words,
    indexed like the labels (for text prompts of vision-language methods); ``None`` at
    construction means the readable class ids (:func:`ptcl.data.class_names.default_names`)."""

    name: str
    train: ImageSet
    test: ImageSet
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.class_names is None:
            self.class_names = default_names(self.train.classes)
        if len(self.class_names) != len(self.train.classes):
            raise DataError(f"{self.name}: {len(self.class_names)} class names for "
                            f"{len(self.train.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def fingerprint_files(paths: Sequence[str], targets: Sequence[int], root: str) -> str:
    """Content identity of a file list: relative paths, sizes, modification times, labels.

    Sizes and times are those of a symbolic link's target. A path that cannot be stat-ed
    (a broken link, a file removed since the folder scan) raises :class:`DataError` naming
    it: it cannot be skipped here, because the caller's list would still hold it (the folder
    scan, ``ptcl.data.datasets``, already skips broken links with a warning).
    """
    h = hashlib.sha256()
    base = os.path.join(os.path.abspath(root), "")
    for p, t in zip(paths, targets):
        # the relative path, as os.path.relpath gives it (which costs ~20x more per file)
        rel = p[len(base):] if p.startswith(base) and os.path.normpath(p) == p else os.path.relpath(p, root)
        try:
            st = os.stat(p)
        except OSError as e:
            what = "broken symbolic link" if os.path.islink(p) else "missing or unreadable file"
            raise DataError(
                f"image file {p}: {what} ({e.strerror}); remove it or restore its target, "
                "then load the dataset again"
            ) from e
        h.update(f"{rel}|{st.st_size}|{int(st.st_mtime)}|{int(t)}\n".encode())
    return h.hexdigest()


def fingerprint_array(images: np.ndarray, targets: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(targets, dtype=np.int64).tobytes())
    return h.hexdigest()

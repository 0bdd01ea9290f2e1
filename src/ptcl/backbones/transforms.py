"""Train and evaluation transforms built from a backbone's :class:`Preprocess` and a
method's train :class:`Augment`.

Evaluation: resize the short side to ``image_size / crop_ratio`` (bicubic) and centre-crop
``image_size``. ``crop_ratio`` 1.0 (ptcl's default) keeps the whole short side; 0.875 is
the ``Resize(256) + CenterCrop(224)`` of LAMDA-PILOT, EASE, MOS, RevisitingCIL and SLCA
(``backbone.eval_crop_ratio``). The resize is bicubic (PILOT's and SLCA's) unless
``backbone.eval_interpolation: bilinear`` (torchvision's default: CODA-Prompt, FeCAM).

Training (:class:`Augment`, ``method.augment`` and friends):

* ``crop_flip`` (default): ``RandomResizedCrop(image_size, scale=crop_scale)`` (bicubic) and
  a horizontal flip, optionally ``ColorJitter(brightness=...)``. ``crop_scale`` (0.05, 1) is
  LAMDA-PILOT's ``build_transform`` (``utils/data.py``); SLCA's CIFAR pipeline is
  torchvision's default scale (0.08, 1) with ``ColorJitter(brightness=63/255)``
  (``utils/data.py`` ``iCIFAR100_224``).
* ``resize``: no augmentation, the image resized to ``image_size x image_size`` (aspect
  not kept), as DAP's input pipeline (``src/data/tf_dataset.py``: ``tf.image.resize`` for
  train and test).

Both resample bicubic by default (ptcl, SLCA); ``method.interpolation: bilinear`` is
torchvision's default, which the random crops of PILOT, RevisitingCIL, EASE, MOS, RanPAC,
CODA-Prompt and the L2P/DualPrompt ports use (and TensorFlow's resize in DAP).

Normalisation (``backbone.input_norm``) is ``Normalize(mean, std)`` after ``ToTensor``;
with mean 0 and std 1 (``input_norm: none``, the [0, 1] input of the official ViT
pipelines of PILOT, APER, RanPAC, EASE, MOS and FeCAM) it is left out.

Served form (``on_device=True``, what the run's loaders use): the transform stops at a
uint8 CHW tensor (``PILToTensor``) and :func:`normalize_batch` does ``ToTensor``'s
``/ 255`` and ``Normalize`` on the device, on the whole batch, with the same float32
operations in the same order: the model sees the same numbers, bit for bit
(:mod:`ptcl.data.loading`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""torchvision's ImageNet statistics (``input_norm: imagenet``; DAP's and SLCA-ImageNet-R's)."""


@dataclass(frozen=True)
class Preprocess:
    """Input geometry and normalisation a backbone expects.

    ``image_size``: the side of the square input (pixels). ``mean`` / ``std``: per channel,
    of [0, 1] pixels. ``crop_ratio``: in (0, 1], the evaluation centre crop's share of the
    resized short side. ``interpolation``: of the evaluation resize."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_ratio: float = 1.0
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@dataclass(frozen=True)
class Augment:
    """A train augmentation recipe (see the module docstring)."""

    kind: Literal["crop_flip", "resize"] = "crop_flip"
    crop_scale: tuple[float, float] = (0.05, 1.0)
    brightness: float = 0.0
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    @property
    def random(self) -> bool:
        """Whether the transform draws random numbers (served with per-sample seeds)."""
        return self.kind != "resize"


DEFAULT_AUGMENT = Augment()


def _identity_norm(p: Preprocess) -> bool:
    return tuple(p.mean) == (0.0, 0.0, 0.0) and tuple(p.std) == (1.0, 1.0, 1.0)


def _normalize(p: Preprocess, on_device: bool = False) -> list:
    if on_device:
        return [T.PILToTensor()]
    if _identity_norm(p):
        return [T.ToTensor()]
    return [T.ToTensor(), T.Normalize(p.mean, p.std)]


def normalize_batch(x: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """uint8 images ``(..., 3, H, W)`` (any device) -> float32 (default dtype) normalised
    by ``p``: ``x / 255`` then ``(x - mean) / std`` per channel, the operations of
    ``ToTensor()`` + ``Normalize(mean, std)`` in their order and dtype, so the result equals
    theirs bit for bit. The divisors are tensors on ``x``'s device (CUDA turns a division
    by a Python number into a multiplication by its reciprocal, which can differ in the
    last bit). Raises ``TypeError`` unless ``x`` is uint8."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_batch takes uint8 images, got {x.dtype}")
    dtype = torch.get_default_dtype()
    x = x.to(dtype).div(torch.tensor(255, dtype=dtype, device=x.device))
    if _identity_norm(p):
        return x
    mean = torch.as_tensor(p.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(p.std, dtype=dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def eval_transform(p: Preprocess, on_device: bool = False) -> T.Compose:
    """Resize the short side to ``round(image_size / crop_ratio)`` and centre-crop, then
    ``ToTensor`` (+ ``Normalize``); with ``on_device`` stop at uint8 (:func:`normalize_batch`)."""
    resize = round(p.image_size / p.crop_ratio)
    return T.Compose([T.Resize(resize, interpolation=InterpolationMode(p.interpolation)),
                      T.CenterCrop(p.image_size), *_normalize(p, on_device)])


def train_transform(p: Preprocess, augment: Augment = DEFAULT_AUGMENT, on_device: bool = False) -> T.Compose:
    """The train transform of ``augment`` at ``p``'s size and normalisation (with
    ``on_device``: ending at uint8, as :func:`eval_transform`)."""
    s, mode = p.image_size, InterpolationMode(augment.interpolation)
    if augment.kind == "resize":
        return T.Compose([T.Resize((s, s), interpolation=mode), *_normalize(p, on_device)])
    steps = [T.RandomResizedCrop(s, scale=tuple(augment.crop_scale), interpolation=mode),
             T.RandomHorizontalFlip()]
    if augment.brightness:
        steps.append(T.ColorJitter(brightness=augment.brightness))
    return T.Compose([*steps, *_normalize(p, on_device)])

"""Train and evaluation transforms built from a backbone's input size and mean/std."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


def build_transform(
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    train: bool,
) -> T.Compose:
    """Eval: resize the short side to ``size`` and centre-crop. Train: the field's usual
    ``RandomResizedCrop(size, scale=(0.05, 1))`` + horizontal flip (LAMDA-PILOT's
    ``build_transform``)."""
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.05, 1.0), interpolation=InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                *norm,
            ]
        )
    return T.Compose(
        [T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size), *norm]
    )

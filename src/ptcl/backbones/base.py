"""The :class:`Backbone` wrapper: a timm model plus what the pipeline needs to know about it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ptcl.backbones.transforms import (
    DEFAULT_AUGMENT,
    Augment,
    Preprocess,
    eval_transform,
    normalize_batch,
    train_transform,
)

TUNING_PREFIX = "tuning_"
"""Children of the timm model whose names start with this are attached tuning modules
(:mod:`ptcl.peft`); they have a boolean ``enabled`` switch."""


class Backbone(nn.Module):
    """A feature extractor: ``forward(images) -> (B, feature_dim)`` pooled features.

    ``model`` is an unmodified timm model built with ``num_classes=0``; tuning modules
    (``ptcl.peft``) attach to it by wrapping sub-modules or hooks. ``kind`` is ``"vit"``
    for token-based transformers (prompt methods need one) and ``"cnn"`` otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        feature_dim: int,
        preprocess: Preprocess,
        kind: str = "vit",
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.feature_dim = feature_dim
        self.preprocess = preprocess
        self.kind = kind
        self._fingerprint: str | None = None
        if kind == "cnn":  # NHWC convolutions are ~1.8x faster on CPU
            self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float input, normalised (as the run's loaders serve it), or uint8
        images (normalised first, :meth:`normalize`) -> ``(B, feature_dim)``."""
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        if self.kind == "cnn":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence after the final norm (ViTs only); ``x`` as :meth:`forward` takes it."""
        if self.kind != "vit":
            raise TypeError(f"backbone {self.name} is a CNN and has no tokens")
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        return self.model.forward_features(x)

    def transform(self, train: bool, augment: Augment = DEFAULT_AUGMENT, on_device: bool = False):
        """The torchvision transform for this backbone (:mod:`ptcl.backbones.transforms`):
        evaluation, or training with ``augment``. It ends at normalised float32 CHW tensors,
        or with ``on_device`` at uint8 ones that :meth:`normalize` finishes (on a batch, on
        the device; the run's loaders do, :mod:`ptcl.data.loading`)."""
        if train:
            return train_transform(self.preprocess, augment, on_device)
        return eval_transform(self.preprocess, on_device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(B, 3, H, W)`` -> the float32 input of :meth:`forward`, equal bit
        for bit to :meth:`transform`'s ``ToTensor`` + ``Normalize``
        (:func:`~ptcl.backbones.transforms.normalize_batch`)."""
        return normalize_batch(x, self.preprocess)

    def fingerprint(self) -> str:
        """Hash of the pre-trained weights and input geometry (computed once, at build).

        It keys the feature cache: different weights, size or normalisation never share
        cached features.
        """
        if self._fingerprint is None:
            self._fingerprint = self.state_fingerprint()
        return self._fingerprint

    def attachments(self) -> list[nn.Module]:
        """The tuning modules attached to the model (children named ``tuning_*``)."""
        return [m for name, m in self.model.named_modules()
                if name.rsplit(".", 1)[-1].startswith(TUNING_PREFIX)]

    @contextmanager
    def pretrained(self, check: bool = True) -> Iterator[None]:
        """Within the block every attached tuning module is bypassed: the model computes its
        pre-trained output (same object, no copy). With ``check`` (it hashes every weight)
        raises ``RuntimeError`` if the pre-trained weights themselves have changed (full
        fine-tuning): the pre-trained output cannot be computed any more."""
        if check and self.state_fingerprint(skip_tuning=True) != self.fingerprint():
            raise RuntimeError(
                f"the pre-trained weights of {self.name} have changed (full fine-tuning), so its "
                "pre-trained features cannot be computed any more; request them before training "
                "the backbone, or rerun with the feature cache enabled"
            )
        # every switch inside each attachment: a set's own flag does not reach its members'
        # hooks (an AdapterSet's per-block adapters check their own ``enabled``)
        switched = list({id(m): m for a in self.attachments() for m in a.modules()
                         if getattr(m, "enabled", False)}.values())
        for m in switched:
            m.enabled = False
        try:
            yield
        finally:
            for m in switched:
                m.enabled = True

    def state_fingerprint(self, skip_tuning: bool = False) -> str:
        """Hash of the model's current state, not cached. Attached tuning modules
        (``tuning_*`` children, see :mod:`ptcl.peft`) are included unless ``skip_tuning``:
        then the hash equals :meth:`fingerprint` as long as the pre-trained weights are
        unchanged."""
        h = hashlib.sha256(f"{self.name}|{self.preprocess}".encode())
        for k, v in sorted(self.model.state_dict().items()):
            if skip_tuning and any(part.startswith(TUNING_PREFIX) for part in k.split(".")):
                continue
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

"""Classifier alignment on features sampled from per-class Gaussians (shared machinery).

Exemplar-free methods that keep a mean and a covariance per class retrain their classifier
on features drawn from ``N(mu_c, Sigma_c)`` for every seen class, so old classes compete
with the new ones without stored images: SLCA (Zhang et al., ICCV 2023; github.com/GengDavid/SLCA
``models/slca.py``, ``_classifier_align``) and MOS (Sun et al., AAAI 2025;
github.com/sun-hailong/AAAI25-MOS, ``classifer_align``). :func:`classifier_alignment` is the
loop both run; what differs is a parameter:

* the head trained (SLCA: a copy of its per-task heads, so the next task can start from
  the heads before alignment; MOS: its head, in place);
* the means sampled around (SLCA shrinks old classes' means first), the samples per class
  and epoch, the training options (lr, epochs, batch size, schedule);
* ``logits``: a transform of the head's logits before the cross-entropy (SLCA's logit
  normalisation; none for MOS).

Every epoch draws fresh features, class by class, from a generator derived from the run
seed, the method's ``stream`` name and the task (:func:`ptcl.seeding.generator`). Not a
registered method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ptcl.config import TrainConfig
from ptcl.heads.class_statistics import cholesky_factors, sample_gaussians
from ptcl.methods.base import Learner
from ptcl.seeding import generator

log = logging.getLogger(__name__)


class ClassLabels(Dataset):
    """The classes to sample a feature of, one item per sample: item ``i`` is ``(labels[i],
    labels[i])``, the class to draw from (the loop's input) and the target.

    ``ClassLabels.repeat(num_classes, per_class)``: classes ``0 .. num_classes - 1``, each
    ``per_class`` times."""

    def __init__(self, labels: Sequence[int] | torch.Tensor) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    @classmethod
    def repeat(cls, num_classes: int, per_class: int) -> ClassLabels:
        return cls(torch.arange(num_classes).repeat_interleave(per_class))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.labels[i], self.labels[i]


def sampling_factors(covs: torch.Tensor) -> torch.Tensor:
    """Factors ``L_c`` with ``L_c L_c^T = Sigma_c`` (``C x D x D``) of covariances
    (``C x D x D``: :func:`~ptcl.heads.class_statistics.cholesky_factors`, with jitter where
    Cholesky fails) or of variances (``C x D``: ``diag(sqrt(var))``)."""
    if covs.dim() == 2:
        return torch.diag_embed(covs.sqrt())
    return cholesky_factors(covs)


def classifier_alignment(
    learner: Learner,
    head: nn.Module,
    means: torch.Tensor,
    covs: torch.Tensor,
    samples_per_class: int,
    train: TrainConfig,
    stream: str,
    task: int,
    seed: int,
    desc: str,
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """Train ``head`` with cross-entropy on features sampled from ``N(means[c], covs[c])``.

    ``means``: ``C x D`` (moved to the learner's device); ``covs``: ``C x D x D`` covariances
    or ``C x D`` variances (:func:`sampling_factors`). Each epoch of ``learner.fit`` (options
    ``train``; shuffle seed ``seed``) goes over ``samples_per_class`` fresh samples of every
    class ``0 .. C-1`` drawn from :func:`ptcl.seeding.generator` ``(run seed, stream,
    task)``. ``logits`` transforms the head's output before the loss. Returns the mean loss
    of each epoch.
    """
    means = means.to(learner.device)
    chols = sampling_factors(covs).to(means)
    gen = generator(learner.ctx.seed, stream, task, device=means.device)

    def step(y: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        out = head(sample_gaussians(means, chols, y, gen))
        return F.cross_entropy(out if logits is None else logits(out), y)

    data = ClassLabels.repeat(len(means), samples_per_class)
    losses = learner.fit(data, step, head.parameters(), cfg=train, desc=desc, seed=seed)
    log.info("%s (classifier alignment): loss %.4f -> %.4f", desc, losses[0], losses[-1])
    return losses

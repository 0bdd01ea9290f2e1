"""Per-class Gaussian statistics and the Mahalanobis classifier of FeCAM.

Goswami, Liu, Twardowski, van de Weijer. "FeCAM: Exploiting the Heterogeneity of Class
Distributions in Exemplar-Free Continual Learning." NeurIPS 2023.

Each class keeps the mean and the precision (pseudo-inverse covariance) of its transformed
features; a sample's logit for a class is minus its squared Mahalanobis distance to it.
The covariance of a class is, as in the authors' code (``models/base.py`` and
``FeCAM_vit_*.py`` of github.com/dipamgoswami/FeCAM):

1. the unbiased sample covariance ``S`` of the class's transformed features;
2. shrunk ``steps`` times: ``S + g1 * mean(diag S) * I + g2 * mean(offdiag S) * (1 - I)``
   (the off-diagonal mean is over the non-zero entries, as theirs);
3. normalised to a correlation matrix ``S / (sd sd^T)``;
4. pseudo-inverted (``pinv``; the inverse, since it is positive definite for ``g1 > 0``).

The feature transform is L2 normalisation (their ViT scripts), optionally preceded by
Tukey's ladder of powers ``x -> x^beta`` on non-negative features (their ResNet code; a
negative entry is clamped to 0 first, and ``beta = 0`` is ``log``). Means and covariances
are both taken from the transformed features (their ResNet code mixes raw-feature
covariances with re-normalised means; their ViT scripts do as here).

Small classes (not in the authors' code, whose covariance of one sample is zero: its
precision is then zero and the class is at distance 0 of every input, so it takes every
prediction): ``S`` of a class with fewer than :data:`~ptcl.heads.class_statistics.MIN_COV_SAMPLES`
(3) distinct samples is first shrunk towards the mean covariance of the classes with enough
samples learned so far (kept in the head's ``shared_sum``/``shared_count`` buffers), or a
scaled identity before there is one, with a warning naming the class; steps 2-4 follow as
for every class (:mod:`ptcl.heads.class_statistics`). Classes with enough samples are
unchanged. A class without samples raises :class:`~ptcl.errors.DataError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.heads.class_statistics import (
    MIN_COV_SAMPLES,
    SharedCovariance,
    class_gaussians,
    class_means,
    sample_covariance,
)

LOG_EPS = 1e-8


def tukey(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Tukey's ladder of powers: ``x^beta`` (``log x`` for ``beta = 0``) on ``max(x, 0)``."""
    x = x.clamp_min(0)
    return torch.log(x + LOG_EPS) if beta == 0 else x.pow(beta)


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of the rows of ``x`` (zeros for a single row), without the
    small-class shrinkage of :meth:`GaussianHead.class_covariance`."""
    return sample_covariance(x)


def shrink_cov(cov: torch.Tensor, gamma1: float, gamma2: float) -> torch.Tensor:
    """FeCAM's shrinkage: add ``gamma1`` x the mean variance to the diagonal and ``gamma2`` x
    the mean (non-zero) off-diagonal covariance to the off-diagonal entries."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    off = cov * (1 - eye)
    nonzero = (off != 0).sum()
    off_mean = off.sum() / nonzero if nonzero > 0 else off.new_zeros(())
    return cov + gamma1 * cov.diagonal().mean() * eye + gamma2 * off_mean * (1 - eye)


def normalize_cov(cov: torch.Tensor) -> torch.Tensor:
    """Correlation matrix ``cov / (sd sd^T)`` (a zero-variance dimension keeps sd = 1)."""
    sd = cov.diagonal().sqrt()
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return cov / (sd[:, None] * sd[None, :])


def mahalanobis(x: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(x - mu_c)^T P_c (x - mu_c)`` -> ``(B, C)``."""
    out = x.new_empty(x.shape[0], means.shape[0])
    for c in range(means.shape[0]):
        d = x - means[c]
        out[:, c] = ((d @ precisions[c]) * d).sum(-1)
    return out


class GaussianHead(nn.Module):
    """Growing per-class means (``C x D``) and precisions (``C x D x D``), as buffers.

    ``beta=None``: no Tukey transform. Logits are ``-mahalanobis(transform(x))``. The
    buffers ``shared_sum`` (``D x D``, float64) and ``shared_count`` hold the sum and number
    of the (unshrunk) covariances of the classes with at least ``min_samples`` samples: the
    target towards which smaller classes are shrunk (:mod:`ptcl.heads.class_statistics`).
    """

    def __init__(
        self, dim: int, beta: float | None = None, gamma1: float = 1.0, gamma2: float = 0.0,
        shrink_steps: int = 1, normalize: bool = True, min_samples: int = MIN_COV_SAMPLES,
    ) -> None:
        super().__init__()
        self.dim, self.beta = dim, beta
        self.gamma1, self.gamma2, self.shrink_steps, self.normalize = gamma1, gamma2, shrink_steps, normalize
        self.min_samples = min_samples
        self.register_buffer("means", torch.zeros(0, dim))
        self.register_buffer("precisions", torch.zeros(0, dim, dim))
        self.register_buffer("shared_sum", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("shared_count", torch.tensor(0))

    @property
    def out_features(self) -> int:
        return self.means.shape[0]

    def grow(self, num_new: int) -> None:
        self.means = torch.cat([self.means, self.means.new_zeros(num_new, self.dim)])
        self.precisions = torch.cat([self.precisions, self.precisions.new_zeros(num_new, self.dim, self.dim)])

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.means.dtype)
        if self.beta is not None:
            x = tukey(x, self.beta)
        return F.normalize(x, dim=-1)

    def shared(self) -> SharedCovariance:
        """A copy of the shared covariance of the classes learned so far."""
        n = int(self.shared_count)
        return SharedCovariance(self.shared_sum.clone() if n else None, n)

    def shrink(self, cov: torch.Tensor) -> torch.Tensor:
        """FeCAM's steps 2-3 on a covariance (``D x D``, float64): shrinkage, normalisation."""
        for _ in range(self.shrink_steps):
            cov = shrink_cov(cov, self.gamma1, self.gamma2)
        return normalize_cov(cov) if self.normalize else cov

    def class_covariance(self, z: torch.Tensor, label: int = 0) -> torch.Tensor:
        """Shrunk (and normalised) covariance (``D x D``, float64) of one class's transformed
        features ``z`` (``n x D``); a small class (named ``label``) is first shrunk towards
        the shared covariance. Changes no state."""
        labels = torch.full((z.shape[0],), label, dtype=torch.long, device=z.device)
        _, covs = class_gaussians(z, labels, [label], shared=self.shared(), min_samples=self.min_samples)
        return self.shrink(covs[0])

    @torch.no_grad()
    def fit(self, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> None:
        """Fit the statistics of ``classes`` from raw features ``x`` (``N x D``) with labels
        ``y`` (``N``). Small classes borrow from the classes of the same call with enough
        samples too, whatever their order. Raises ``DataError`` for a class without samples."""
        x, y = x.to(self.means.device), y.to(self.means.device)
        zs = [self.transform(x[y == c]) for c in classes]  # per class, as set_class always did
        z = torch.cat(zs)
        labels = torch.cat([torch.full((len(r),), c, device=y.device) for c, r in zip(classes, zs)])
        means = class_means(z, labels, classes)  # in z's dtype (float32), as before
        shared = self.shared()
        _, covs = class_gaussians(z, labels, classes, shared=shared, min_samples=self.min_samples)
        for i, c in enumerate(classes):
            self.means[c] = means[i]
            self.precisions[c] = torch.linalg.pinv(self.shrink(covs[i]), hermitian=True).to(self.precisions.dtype)
        if shared.total is not None:
            self.shared_sum.copy_(shared.total)
        self.shared_count.fill_(shared.count)

    def set_class(self, c: int, x: torch.Tensor) -> None:
        """Fit class ``c``'s statistics from its raw features ``x`` (``n x D``)."""
        self.fit(x, torch.full((x.shape[0],), c, dtype=torch.long, device=x.device), [c])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in ("shared_sum", "shared_count"):  # checkpoints written before these buffers
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -mahalanobis(self.transform(x), self.means, self.precisions)

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOG_EPS = 1e-8


def tukey(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Tukey's ladder of powers: ``x^beta`` (``log x`` for ``beta = 0``) on ``max(x, 0)``."""
    x = x.clamp_min(0)
    return torch.log(x + LOG_EPS) if beta == 0 else x.pow(beta)


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of the rows of ``x`` (zeros for a single row)."""
    if x.shape[0] < 2:
        return x.new_zeros(x.shape[1], x.shape[1])
    return torch.cov(x.T)


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

    ``beta=None``: no Tukey transform. Logits are ``-mahalanobis(transform(x))``.
    """

    def __init__(
        self, dim: int, beta: float | None = None, gamma1: float = 1.0, gamma2: float = 0.0,
        shrink_steps: int = 1, normalize: bool = True,
    ) -> None:
        super().__init__()
        self.dim, self.beta = dim, beta
        self.gamma1, self.gamma2, self.shrink_steps, self.normalize = gamma1, gamma2, shrink_steps, normalize
        self.register_buffer("means", torch.zeros(0, dim))
        self.register_buffer("precisions", torch.zeros(0, dim, dim))

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

    def class_covariance(self, z: torch.Tensor) -> torch.Tensor:
        """Shrunk (and normalised) covariance of transformed features ``z`` (float64)."""
        cov = covariance(z.double())
        for _ in range(self.shrink_steps):
            cov = shrink_cov(cov, self.gamma1, self.gamma2)
        return normalize_cov(cov) if self.normalize else cov

    @torch.no_grad()
    def set_class(self, c: int, x: torch.Tensor) -> None:
        """Fit class ``c``'s statistics from its raw features ``x`` (``n x D``)."""
        z = self.transform(x.to(self.means.device))
        self.means[c] = z.mean(0)
        cov = self.class_covariance(z)
        self.precisions[c] = torch.linalg.pinv(cov, hermitian=True).to(self.precisions.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -mahalanobis(self.transform(x), self.means, self.precisions)

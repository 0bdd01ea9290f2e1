"""Per-class statistics that stay sound with one or two samples per class.

The one home of the class means, Gaussian covariances and sampling factors used by FeCAM's
Mahalanobis head (:mod:`ptcl.heads.gaussian`) and by the classifier alignment of SLCA and
MOS (features sampled from each class's Gaussian).

**Empty classes.** A class with no samples has no mean: every statistic raises
:class:`~ptcl.errors.DataError` naming it instead of returning NaN.

**Small classes.** A class's covariance is its unbiased sample covariance ``S_c`` (as
before, bit for bit) when it has at least ``min_samples`` samples (default
:data:`MIN_COV_SAMPLES` = 3) that are not all identical. Otherwise ``S_c`` carries (almost)
no information: one sample gives ``S_c = 0`` (a zero covariance: FeCAM's precision is then
0 and the class's distance 0 to every input), two give a rank-one ``S_c`` along their
difference vector (SLCA/MOS sample the class on a line). Such a class is shrunk towards a
shared covariance ``T``:

    S_c' = ((n_c - 1) S_c + k T) / (n_c - 1 + k),   k = min_samples - 1

the class-to-pooled shrinkage of Friedman's regularised discriminant analysis (JASA 1989)
with ``T`` counted as ``k`` degrees of freedom against the class's ``n_c - 1`` (the form of
a conjugate inverse-Wishart update whose prior has mean ``T``). One sample: ``S_c' = T``; two:
``(S_c + 2T) / 3``; identical samples count as one (no degrees of freedom).

``T`` is the mean covariance of the classes with enough samples: those of the same call
plus those the caller has accumulated in a :class:`SharedCovariance` (the classes learned
before). This is LDA's shared covariance, and what few-shot methods borrow from the base
classes (Yang, Liu, Xu, "Free Lunch for Few-Shot Learning: Distribution Calibration",
ICLR 2021). Without any such class ``T`` is a scaled identity ``s^2 I`` (the target of
Ledoit & Wolf 2004 and of FeCAM's own shrinkage), ``s^2`` the mean per-dimension variance
pooled within the call's classes of two or more samples, else that of all the call's rows
(an upper bound: it includes the spread between classes), else their mean square, else 1.
Each shrunk class is logged as a warning naming it (its remapped label) and its count.

**Sampling.** :func:`cholesky_factors` returns factors ``L_c L_c^T = Sigma_c`` for any finite
covariance: Cholesky, with a growing jitter where it fails (the loop of the previous SLCA
code here), and an eigen-decomposition with clamped eigenvalues as the last resort.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ptcl.errors import DataError

log = logging.getLogger(__name__)

MIN_COV_SAMPLES = 3  # 1 sample: no scatter; 2: a rank-one scatter (see the module docstring)
JITTER_START = 1e-6  # first Cholesky jitter, times the mean variance (previous SLCA code)
JITTER_TRIES = 8  # jitters 0, 1e-6, ..., 1 x the mean variance, then the eigen fallback
SPREAD_EPS = 1e-10  # a relative total variance below this counts as identical samples


def class_rows(feats: torch.Tensor, labels: torch.Tensor, c: int) -> torch.Tensor:
    """The rows of ``feats`` (``N x D``) labelled ``c`` -> ``(n_c, D)``.

    Raises :class:`~ptcl.errors.DataError` when class ``c`` has no sample.
    """
    rows = feats[labels.to(feats.device) == c]
    if rows.shape[0] == 0:
        raise DataError(
            f"class {c} has no training samples, so its mean and covariance are undefined; "
            "check the dataset's split and per-class subset (dataset.train_per_class)"
        )
    return rows


def class_means(feats: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Mean of each class in ``classes`` (rows in that order, ``feats``' dtype) -> ``(C, D)``.

    A single sample is its own mean. Raises :class:`~ptcl.errors.DataError` for an empty class.
    """
    if len(classes) == 0:
        return feats.new_zeros(0, feats.shape[1])
    return torch.stack([class_rows(feats, labels, c).mean(0) for c in classes])


@dataclass
class SharedCovariance:
    """Running mean of the covariances (``D x D``, float64) of the classes with enough
    samples: the shrinkage target of the small classes. ``total`` is their sum."""

    total: torch.Tensor | None = None
    count: int = 0

    @classmethod
    def of(cls, covs: torch.Tensor, ridge: float = 0.0) -> SharedCovariance:
        """From stored covariances (``K x D x D``) or variances (``K x D``) that each include
        ``ridge`` on the diagonal (removed here)."""
        k = covs.shape[0]
        if k == 0:
            return cls()
        total = covs.sum(0, dtype=torch.float64)
        if total.dim() == 1:
            total = torch.diag(total)
        total.diagonal().sub_(ridge * k)
        return cls(total, k)

    def add(self, cov: torch.Tensor) -> None:
        cov = cov.double()
        self.total = cov.clone() if self.total is None else self.total + cov.to(self.total.device)
        self.count += 1

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None or self.count == 0 else self.total / self.count


def sample_covariance(rows: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of ``rows`` (``n x D``) -> ``D x D`` (zeros for a single row)."""
    if rows.shape[0] < 2:
        return rows.new_zeros(rows.shape[1], rows.shape[1])
    return torch.cov(rows.T)


def identity_variance(rows: Sequence[torch.Tensor]) -> float:
    """``s^2`` of the scaled-identity target, from the rows of each class (see the module
    docstring): pooled within-class, else total variance, else mean square, else 1."""
    dof = sum(r.shape[0] - 1 for r in rows)
    d = rows[0].shape[1]
    candidates = []
    if dof > 0:
        scatter = sum(float(((r - r.mean(0)) ** 2).sum()) for r in rows if r.shape[0] > 1)
        candidates.append(scatter / (dof * d))
    every = torch.cat(list(rows))
    if every.shape[0] > 1:
        candidates.append(float(every.var(0).mean()))
    candidates.append(float(every.pow(2).mean()))
    return next((v for v in candidates if math.isfinite(v) and v > 0), 1.0)


def has_spread(cov: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether ``rows`` (``n x D``) are not all identical: ``trace(cov)`` above ``SPREAD_EPS``
    x their mean squared norm (below it, the spread is rounding error)."""
    return float(cov.diagonal().sum()) > SPREAD_EPS * float(rows.pow(2).sum(1).mean())


def class_gaussians(
    feats: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int],
    ridge: float = 0.0,
    shared: SharedCovariance | None = None,
    min_samples: int = MIN_COV_SAMPLES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of each class in ``classes`` -> ``(C, D)``, ``(C, D, D)``, float64.

    ``feats``: ``N x D``; ``labels``: ``N``. A class with at least ``min_samples`` samples
    and a non-zero spread gets its unbiased sample covariance and is added to ``shared``
    (which this call updates); every other class is shrunk towards ``shared``'s mean, or a
    scaled identity when it is empty, with a warning (module docstring). ``ridge * I`` is
    then added to every covariance (SLCA's ``cov_ridge``; MOS's 1e-4).

    Raises :class:`~ptcl.errors.DataError` for a class without samples, ``ValueError`` for
    non-finite features or ``min_samples < 2``.
    """
    if min_samples < 2:
        raise ValueError(f"min_samples must be >= 2 (a covariance needs two samples), got {min_samples}")
    f = feats.double()
    rows = [class_rows(f, labels, c) for c in classes]
    for c, r in zip(classes, rows):
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"class {c} has non-finite features (NaN or inf)")
    shared = SharedCovariance() if shared is None else shared
    d = f.shape[1]
    means = f.new_zeros(len(rows), d)
    covs = f.new_zeros(len(rows), d, d)
    small = []
    for i, r in enumerate(rows):
        means[i] = r.mean(0)
        covs[i] = sample_covariance(r)
        if r.shape[0] >= min_samples and has_spread(covs[i], r):
            shared.add(covs[i])
        else:
            small.append(i)
    if small:
        target = shared.mean()
        if target is not None:
            source = f"the mean covariance of {shared.count} other class(es)"
        else:
            var = identity_variance(rows)
            target = var * torch.eye(d, dtype=f.dtype, device=f.device)
            source = f"a scaled identity (variance {var:.3g}; no class has enough samples yet)"
        target = target.to(f.device)
        k = min_samples - 1
        for i in small:
            n = rows[i].shape[0]
            dof = n - 1 if n > 1 and has_spread(covs[i], rows[i]) else 0
            covs[i] = (dof * covs[i] + k * target) / (dof + k)
            log.warning(
                "class %d: %d training sample(s)%s; a covariance of its own needs %d distinct ones, "
                "so it is shrunk towards %s (weight %.2f on it)", classes[i], n,
                "" if dof or n == 1 else ", all identical", min_samples, source, k / (dof + k),
            )
    if ridge:
        covs.diagonal(dim1=1, dim2=2).add_(ridge)
    return means, covs


def gaussian_stats(
    feats: torch.Tensor, ridge: float = 0.0, label: int = 0, shared: SharedCovariance | None = None,
    min_samples: int = MIN_COV_SAMPLES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (``D``) and covariance (``D x D``, float64, ``+ ridge * I``) of one class's
    ``feats`` (``n x D``), named ``label`` in warnings and errors (see :func:`class_gaussians`)."""
    labels = torch.full((feats.shape[0],), label, dtype=torch.long, device=feats.device)
    means, covs = class_gaussians(feats, labels, [label], ridge, shared, min_samples)
    return means[0], covs[0]


def cholesky_factor(cov: torch.Tensor, label: int = 0) -> torch.Tensor:
    """A square root ``L`` (float64, ``L L^T = cov``) of one covariance (``D x D``).

    Cholesky, with jitter ``0, 1e-6, 1e-5, ..., 1`` x the mean variance added until it
    succeeds (the loop of the previous ``ptcl.methods.slca.cholesky_factors``, which then
    silently returned a failed factor); if even that fails, ``V sqrt(E)``
    from the eigen-decomposition with eigenvalues clamped to ``1e-6`` x the mean variance.
    Raises ``ValueError`` (naming ``label``) for a non-finite covariance.
    """
    cov = cov.double()
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(f"the covariance of class {label} is not finite")
    eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    scale = float(cov.diagonal().mean().clamp_min(1e-12))
    jitter = 0.0
    for _ in range(JITTER_TRIES):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) == 0:
            if jitter:
                log.debug("class %d: Cholesky factor with jitter %.1e", label, jitter)
            return chol
        jitter = max(jitter * 10, JITTER_START * scale)
    floor = JITTER_START * scale
    log.warning("class %d: covariance not positive definite even with jitter %.1e; sampling "
                "from its eigen-decomposition (eigenvalues clamped to %.1e)", label, jitter / 10, floor)
    e, v = torch.linalg.eigh((cov + cov.T) / 2)
    return v * e.clamp_min(floor).sqrt()


def cholesky_factors(covs: torch.Tensor) -> torch.Tensor:
    """Factors ``L_c`` (float32) with ``L_c L_c^T = covs[c]`` (``C x D x D``) for sampling;
    class ``c`` is named ``c`` in logs and errors (see :func:`cholesky_factor`)."""
    return torch.stack([cholesky_factor(cov, c).float() for c, cov in enumerate(covs)])


def sample_gaussians(
    means: torch.Tensor, chols: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One sample of ``N(means[y], chols[y] chols[y]^T)`` for every ``y`` in ``labels``.

    ``means``: ``C x D``; ``chols``: ``C x D x D``; ``labels``: ``B`` -> ``B x D``. Draws
    from ``generator`` (on ``means``' device; default the global one), class by class in
    increasing label order.
    """
    out = torch.empty(len(labels), means.shape[1], device=means.device)
    for c in labels.unique().tolist():
        idx = labels == c
        z = torch.randn(int(idx.sum()), means.shape[1], device=means.device, generator=generator)
        out[idx] = means[c] + z @ chols[c].T
    return out

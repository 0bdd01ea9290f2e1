"""Random-projection ridge-regression head (RanPAC, McDonnell et al., NeurIPS 2023).

A fixed Gaussian projection ``W_rand`` (``in_features x M``, entries N(0, 1), drawn from a
seeded generator) and a ReLU expand a feature ``f`` to ``h = relu(f @ W_rand)``. The head
keeps the Gram matrix ``G = sum h h^T`` (``M x M``) and ``Q = sum h y^T`` (``M x C``,
one-hot ``y``) of every sample seen so far; both are sums, so a task adds its own samples'
terms and old data is never read again. The output weights are the ridge solution
``W = (G + lambda I)^-1 Q`` and the logits are ``h @ W`` (no normalisation, as the
official ``CosineLinear`` with ``use_RP``).

``lambda`` is chosen per task, as in the official code (``optimise_ridge_parameter``),
on the current task's samples only: a ridge regression is fitted on 80% of them for every
``lambda`` in ``10^-8 .. 10^8`` and the one with the lowest mean squared error on the
other 20% wins (with one or two samples per class, a split that fits no sample of some class
is redrawn per class, see :func:`holdout_split`; without any class of two samples the
previous lambda is kept, 1 on the first task). Unlike the official code (one ``M x M``
solve per ``lambda``), the whole grid costs one symmetric eigendecomposition
(:func:`ridge_solutions`), of ``H^T H`` (``M x M``) or, when the task has fewer samples
than ``M``, of ``H H^T`` (``n x n``, the same solutions by the push-through identity).

Memory and precision: ``G`` is stored in float32 (``M = 10000``: 400 MB, also in each
checkpoint, since a resumed run needs it to go on learning). ``G`` has rank at most the
number of samples seen, so ``G + lambda I`` can be as ill-conditioned as
``1 + trace(G) / lambda``; the final Cholesky solve runs in float32 when that bound is at
most 1e4 (relative error well under 1e-3) and in float64 otherwise (a transient 1.6 GB for
``M = 10000``; about 3x slower on CPU), since float32 Cholesky fails or loses all digits
for the small ``lambda`` the search may pick. The lambda search itself is in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.errors import DataError

log = logging.getLogger(__name__)

FALLBACK_LAMBDA = 1.0  # first task with nothing to hold out (this head's former one-sample choice)


def random_projection(in_features: int, dim: int, seed: int) -> torch.Tensor:
    """``in_features x dim`` matrix of N(0, 1) entries from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(in_features, dim, generator=g)


def ridge_solutions(h: torch.Tensor, y: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """``W_l = (h^T h + l I)^-1 h^T y`` for every ``l`` in ``lambdas`` -> ``(L, M, C)``.

    One eigendecomposition serves the whole grid (float64): of ``G = h^T h = V e V^T``,
    giving ``W_l = V diag(1/(e+l)) V^T h^T y``, or, when ``n < M``, of ``K = h h^T = U e U^T``,
    giving ``W_l = h^T U diag(1/(e+l)) U^T y``.
    """
    h, y = h.double(), y.double()
    lam = torch.as_tensor(list(lambdas), dtype=torch.float64, device=h.device)
    n, m = h.shape
    if n < m:
        e, u = torch.linalg.eigh(h @ h.T)
        a = u.T @ y  # (n, C)
        scaled = a.unsqueeze(0) / (e.clamp_min(0)[None, :, None] + lam[:, None, None])  # (L, n, C)
        return torch.einsum("nm,nk,lkc->lmc", h, u, scaled)
    e, v = torch.linalg.eigh(h.T @ h)
    b = v.T @ (h.T @ y)  # (M, C)
    scaled = b.unsqueeze(0) / (e.clamp_min(0)[None, :, None] + lam[:, None, None])  # (L, M, C)
    return torch.einsum("mk,lkc->lmc", v, scaled)


def holdout_split(
    y: torch.Tensor, val_fraction: float = 0.2, generator: torch.Generator | None = None,
    classes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(fit, held_out)`` of the lambda search, for one-hot targets ``y`` (``n x C``).

    The official split: a random ``1 - val_fraction`` of the rows (at least 1, at most
    ``n - 1``) is fitted, the rest held out. With one or two samples per class that split can
    hold out every sample of a class, whose held-out error then only rewards predicting zero
    (the largest lambda); then, and only then, the split is redrawn per class from the same
    permutation: a class of ``n_c >= 2`` samples holds out ``max(1, int(n_c * val_fraction))``
    of them but at most ``n_c - 1``, a class of one sample is only fitted, and a warning names
    the classes (``classes[j]`` for column ``j``; default ``j``). The held-out part is empty
    when no class has two samples. Raises ``ValueError`` for fewer than 2 rows.
    """
    n = y.shape[0]
    n_fit = min(int(n * (1 - val_fraction)), n - 1)
    if n_fit < 1:
        raise ValueError(f"need at least 2 samples to choose the ridge parameter, got {n}")
    perm = torch.randperm(n, generator=generator).to(y.device)
    fit, val = perm[:n_fit], perm[n_fit:]
    missed = ((y.sum(0) > 0) & ~(y[fit].sum(0) > 0)).nonzero().flatten().tolist()
    if not missed:
        return fit, val
    names = list(classes) if classes is not None else list(range(y.shape[1]))
    group = torch.where(y.sum(1) > 0, y.argmax(1), -1)[perm]  # class of each row, in perm order
    fits, vals = [], []
    for k in group.unique().tolist():
        rows = perm[group == k]
        hold = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, int(len(rows) * val_fraction)))
        fits.append(rows[: len(rows) - hold])
        vals.append(rows[len(rows) - hold :])
    log.warning("ridge: the random %d/%d split fitted no sample of class(es) %s; holding out "
                "per class instead", n_fit, n, [names[j] for j in missed])
    return torch.cat(fits), torch.cat(vals)


def select_ridge(
    h: torch.Tensor, y: torch.Tensor, lambdas: Sequence[float], val_fraction: float = 0.2,
    generator: torch.Generator | None = None, classes: Sequence[int] | None = None,
) -> tuple[float, torch.Tensor]:
    """The ``lambda`` of lowest held-out MSE: fit on a random ``1 - val_fraction`` of the rows
    of ``h`` (targets ``y``, one-hot ``n x C``), score on the rest (:func:`holdout_split`,
    whose warnings name ``classes``). Returns ``(lambda, losses per lambda)``. Raises
    ``ValueError`` for fewer than 2 rows or when no class has two samples to hold one out."""
    fit, val = holdout_split(y, val_fraction, generator, classes)
    if len(val) == 0:
        raise ValueError("no class has two samples, so none can be held out to choose the ridge parameter")
    w = ridge_solutions(h[fit], y[fit], lambdas)  # (L, M, C)
    pred = torch.einsum("vm,lmc->lvc", h[val].double(), w)
    losses = ((pred - y[val].double().unsqueeze(0)) ** 2).mean(dim=(1, 2))
    return float(lambdas[int(losses.argmin())]), losses


def solve_ridge(g: torch.Tensor, q: torch.Tensor, lam: float, max_cond32: float = 1e4) -> torch.Tensor:
    """``(g + lam I)^-1 q`` by Cholesky: in ``g``'s dtype when the condition-number bound
    ``1 + trace(g) / lam`` is at most ``max_cond32``, else in float64 (LU if rounding left
    the float64 system indefinite)."""
    bound = 1 + float(g.diagonal().sum()) / lam
    if bound <= max_cond32:
        a = g.clone()
        a.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(q.to(a.dtype), chol)
    log.info("ridge solve in float64 (condition bound %.1e)", bound)
    a = g.double()
    a.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(q.double(), chol)
    del chol
    log.warning("ridge system not positive definite in float64 (lambda %.1e); using LU", lam)
    return torch.linalg.solve(a, q.double())


class RidgeHead(nn.Module):
    """Random projection + ReLU + ridge classifier that grows with the classes.

    Buffers (all in the state dict): ``w_rand`` (``in x M``), ``G`` (``M x M``), ``Q``
    (``M x C``), ``weight`` (``C x M``) and ``ridge`` (the last chosen lambda).
    ``dim = 0`` skips the projection (``h = f``), the official ``M = 0`` option.
    """

    def __init__(self, in_features: int, dim: int = 10000, seed: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.use_rp = dim > 0
        m = dim if self.use_rp else in_features
        self.register_buffer("w_rand", random_projection(in_features, m, seed) if self.use_rp else torch.empty(0))
        self.register_buffer("G", torch.zeros(m, m))
        self.register_buffer("Q", torch.zeros(m, 0))
        self.register_buffer("weight", torch.zeros(0, m))
        self.register_buffer("ridge", torch.tensor(0.0))

    @property
    def dim(self) -> int:
        return self.G.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_new: int) -> None:
        self.Q = torch.cat([self.Q, self.Q.new_zeros(self.dim, num_new)], 1)
        self.weight = torch.cat([self.weight, self.weight.new_zeros(num_new, self.dim)])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.G.dtype)
        return F.relu(x @ self.w_rand) if self.use_rp else x

    def accumulate(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Add the projected features ``h`` with labels ``y`` (class indices) to ``G``, ``Q``."""
        onehot = F.one_hot(y.long(), self.out_features).to(h.dtype)
        self.G += h.T @ h
        self.Q += h.T @ onehot

    @torch.no_grad()
    def fit_task(
        self, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int], lambdas: Sequence[float],
        val_fraction: float = 0.2, generator: torch.Generator | None = None,
    ) -> float:
        """Learn one task: accumulate its statistics, choose lambda on it, re-solve ``W``.

        ``x``: ``n x in_features``; ``y``: ``n`` labels, each in ``classes`` (this task's).
        Lambda is chosen by :func:`select_ridge`; when no class has two samples (nothing can
        be held out) the previous task's lambda is kept (:data:`FALLBACK_LAMBDA` on the first
        task), with a warning naming the classes. Raises ``DataError`` naming a class of
        ``classes`` without samples (its weights would stay zero).
        """
        h = self.project(x.to(self.G.device))
        y = y.to(self.G.device)
        cols = torch.as_tensor(list(classes), device=y.device)
        targets = (y[:, None] == cols[None, :]).to(h.dtype)  # one-hot over this task's classes
        counts = [int(k) for k in targets.sum(0)]
        for c, k in zip(classes, counts):
            if k == 0:
                raise DataError(f"class {c} has no training samples in its task; its ridge "
                                "weights would stay zero (check the dataset's per-class subset)")
        self.accumulate(h, y)
        if max(counts, default=0) >= 2:
            lam, losses = select_ridge(h, targets, lambdas, val_fraction, generator, classes)
            log.info("ridge: lambda %.0e (held-out MSE %.4g)", lam, float(losses.min()))
        else:
            lam = float(self.ridge) if float(self.ridge) > 0 else FALLBACK_LAMBDA
            log.warning("ridge: class(es) %s have 1 sample each, none to hold out; keeping "
                        "lambda %.0e", list(classes), lam)
        self.ridge.fill_(lam)
        self.weight = solve_ridge(self.G, self.Q, lam).T.to(self.G.dtype).contiguous()
        return lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x) @ self.weight.T

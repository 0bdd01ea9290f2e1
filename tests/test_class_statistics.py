"""Per-class statistics with 0, 1, 2 and many samples per class: FeCAM's Gaussian head, the
Gaussians SLCA and MOS sample from for classifier alignment, RanPAC's ridge head.

The sampling helpers (``cholesky_factors``, ``sample_gaussians``) are imported from their
home, :mod:`ptcl.heads.class_statistics` (SLCA's module re-exported them when these tests
were written against the code before the small-class fix).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner

import ptcl.methods.slca as slca_mod
from ptcl.errors import DataError
from ptcl.heads.class_statistics import cholesky_factors, sample_gaussians
from ptcl.heads.gaussian import GaussianHead, normalize_cov, shrink_cov
from ptcl.heads.ridge import RidgeHead, ridge_solutions, solve_ridge

D = 32  # vit_tiny_test feature dim
LAMBDAS = [10.0**e for e in range(-8, 9)]


@pytest.fixture
def warnings_seen(caplog):
    """caplog on the ``ptcl`` logger itself (the CLI may have stopped it propagating)."""
    logger = logging.getLogger("ptcl")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="ptcl")
    yield caplog
    logger.removeHandler(caplog.handler)


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def gaussian_classes(counts: list[int], d: int, seed: int, scale: float = 1.0,
                     spread: float = 4.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``counts[c]`` samples of class ``c`` from ``N(mu_c, scale^2 I)``, ``mu_c = scale *
    spread * N(0, I)``. Returns features, labels and the class means."""
    g = torch.Generator().manual_seed(seed)
    mus = scale * spread * torch.randn(len(counts), d, generator=g)
    x = torch.cat([mus[c] + scale * torch.randn(n, d, generator=g) for c, n in enumerate(counts)])
    y = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    return x, y, mus


def test_issue_example_single_sample_class_takes_no_prediction(warnings_seen):
    torch.manual_seed(0)
    h = GaussianHead(8)
    h.grow(2)
    h.set_class(0, torch.randn(50, 8) + 3)
    h.set_class(1, torch.randn(1, 8) - 3)
    logits = h(torch.randn(10, 8) + 3)
    assert torch.isfinite(logits).all()
    assert logits.argmax(1).tolist() == [0] * 10
    assert float(torch.linalg.eigvalsh(h.precisions[1].double()).min()) > 0  # not the zero matrix
    assert "class 1: 1 training sample" in messages(warnings_seen)


# -- FeCAM's Gaussian head ----------------------------------------------------------------
def fecam_accuracy(head: GaussianHead, mus: torch.Tensor, classes: range, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    xt = torch.cat([mus[c] + torch.randn(100, mus.shape[1], generator=g) for c in classes])
    yt = torch.tensor(list(classes)).repeat_interleave(100)
    logits = head(xt)
    assert torch.isfinite(logits).all()
    return float((logits.argmax(1) == yt).float().mean())


@pytest.mark.parametrize("n", [1, 2])
def test_fecam_small_classes_after_a_many_shot_task(n, warnings_seen):
    """4 classes of 40 samples, then 4 of ``n``: every class is still recognised."""
    d = 16
    x, y, mus = gaussian_classes([40] * 4 + [n] * 4, d, seed=n)
    head = GaussianHead(d)
    head.grow(8)
    for c in range(8):
        head.set_class(c, x[y == c])
    for c in range(8):
        assert float(torch.linalg.eigvalsh(head.precisions[c].double()).min()) > 0
    assert fecam_accuracy(head, mus, range(4), seed=10) > 0.9  # old classes keep their inputs
    assert fecam_accuracy(head, mus, range(4, 8), seed=11) > 0.8
    log = messages(warnings_seen)
    for c in range(4, 8):
        assert f"class {c}: {n} training sample" in log
    assert "class 0:" not in log


@pytest.mark.parametrize("n", [1, 2])
def test_fecam_only_small_classes(n, warnings_seen):
    """No class with enough samples yet: shrinkage towards a scaled identity."""
    d = 16
    x, y, mus = gaussian_classes([n] * 5, d, seed=20 + n)
    head = GaussianHead(d)
    head.grow(5)
    for c in range(5):
        head.set_class(c, x[y == c])
    assert torch.isfinite(head.precisions).all()
    assert fecam_accuracy(head, mus, range(5), seed=12) > 0.8
    assert f"class 4: {n} training sample" in messages(warnings_seen)


def test_fecam_identical_samples_are_one_sample(warnings_seen):
    torch.manual_seed(3)
    head = GaussianHead(8)
    head.grow(2)
    head.set_class(0, torch.randn(50, 8) + 3)
    head.set_class(1, (torch.randn(1, 8) - 3).repeat(5, 1))  # 5 copies of one image
    assert head(torch.randn(10, 8) + 3).argmax(1).tolist() == [0] * 10
    assert "class 1: 5 training sample(s), all identical" in messages(warnings_seen)


def test_fecam_many_samples_are_unchanged(warnings_seen):
    """n >> d: the authors' statistics bit for bit (means in float32, float64 covariance,
    one shrinkage, correlation, pinv), and no warning."""
    d = 8
    x, y, _ = gaussian_classes([60, 45, 30], d, seed=5)
    head = GaussianHead(d, gamma1=1.0, gamma2=0.0)
    head.grow(3)
    for c in range(3):
        head.set_class(c, x[y == c])
    for c in range(3):
        z = F.normalize(x[y == c], dim=-1)
        cov = normalize_cov(shrink_cov(torch.cov(z.double().T), 1.0, 0.0))
        assert torch.equal(head.means[c], z.mean(0))
        assert torch.equal(head.precisions[c], torch.linalg.pinv(cov, hermitian=True).float())
    assert messages(warnings_seen) == ""


def test_fecam_head_loads_a_checkpoint_without_the_shared_covariance():
    """Checkpoints written before the shared-covariance buffers still load (as no class)."""
    x, y, _ = gaussian_classes([20, 20], 8, seed=6)
    head = GaussianHead(8)
    head.grow(2)
    for c in range(2):
        head.set_class(c, x[y == c])
    old = {k: v for k, v in head.state_dict().items() if k in ("means", "precisions")}
    fresh = GaussianHead(8)
    fresh.grow(2)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh(x), head(x), rtol=0, atol=0)


def test_fecam_empty_class_raises():
    head = GaussianHead(8)
    head.grow(4)
    with pytest.raises(DataError, match="class 3"):
        head.set_class(3, torch.zeros(0, 8))
    assert torch.isfinite(head.means).all() and torch.isfinite(head.precisions).all()


# -- SLCA / MOS: the Gaussians sampled for classifier alignment --------------------------
def slca_with_features(tmp_path, monkeypatch, x: torch.Tensor, y: torch.Tensor):
    """An SLCA learner whose feature extractor returns ``x`` (labels ``y``) for any task."""
    learner, sc = make_learner(tmp_path, "slca", {"method.epochs": 1, "method.batch_size": 8,
                                                  "method.ca_epochs": 1, "method.ca_samples": 16,
                                                  "method.ca_batch_size": 16})

    def images(split, classes, train_transform=False):
        keep = torch.isin(y, torch.tensor(list(classes)))
        return SimpleNamespace(labels=y[keep].numpy(), feats=x[keep])

    monkeypatch.setattr(learner.ctx.data, "images", images)
    monkeypatch.setattr(slca_mod, "extract_features", lambda bb, ds, *a, **k: ds.feats)
    return learner, sc


def mos_with_features(tmp_path, x: torch.Tensor, y: torch.Tensor):
    """A MOS learner whose per-adapter training features are ``x`` (labels ``y``)."""
    learner, sc = make_learner(tmp_path, "mos", {"method.epochs": 1, "method.batch_size": 4,
                                                 "method.ca_epochs": 1})

    def features(split, classes, keys):
        keep = torch.isin(y, torch.tensor(list(classes)))
        return x[keep], y[keep]

    learner.experts.features = features
    return learner, sc


def gaussians_of(method: str, tmp_path, monkeypatch, x, y, tasks: int = 2):
    """Store the class statistics of the first ``tasks`` tasks (SLCA or MOS) on ``x``, ``y``;
    returns the learner, its class means, covariances and the last task."""
    if method == "slca":
        learner, sc = slca_with_features(tmp_path, monkeypatch, x, y)
        for t in sc.tasks[:tasks]:
            learner.before_task(t)
            learner.store_class_stats(t)
        return learner, learner.class_means, learner.class_covs, sc.tasks[tasks - 1]
    learner, sc = mos_with_features(tmp_path, x, y)
    for t in sc.tasks[:tasks]:
        learner.before_task(t)
        learner.class_statistics(t)
    return learner, learner.means, learner.covs, sc.tasks[tasks - 1]


def top_fraction(cov: torch.Tensor) -> float:
    """Share of the total variance along the covariance's main axis."""
    e = torch.linalg.eigvalsh(cov.double())
    return float(e[-1] / e.sum())


@pytest.mark.parametrize("method", ["slca", "mos"])
@pytest.mark.parametrize("n", [1, 2])
def test_sampled_features_of_small_classes_are_spread_like_a_class(method, n, tmp_path, monkeypatch,
                                                                  warnings_seen):
    """Task 0: 2 classes of 40 samples; task 1: 2 classes of ``n``. All four classes have
    covariance I: the small classes' sampling Gaussians must not collapse onto their mean
    (1 sample: covariance 1e-4 I) or onto a line (2 samples: rank one)."""
    x, y, _ = gaussian_classes([40, 40, n, n], D, seed=30 + n)
    learner, means, covs, task = gaussians_of(method, tmp_path, monkeypatch, x, y)
    chols = cholesky_factors(covs[:4])
    assert torch.isfinite(chols).all()
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(2000)
    s = sample_gaussians(means[:4], chols, labels)
    assert torch.isfinite(s).all()
    for c in (2, 3):
        total = float(torch.cov(s[labels == c].T).diagonal().sum())
        assert 0.3 * D < total < 3 * D, (c, total)  # the true total variance is D
        assert top_fraction(covs[c]) < 0.6, c  # not (nearly) rank one
    log = messages(warnings_seen)
    assert f"class 2: {n} training sample" in log and f"class 3: {n} training sample" in log
    assert "class 0:" not in log and "class 1:" not in log
    if method == "slca":
        learner.align(task)
        assert torch.isfinite(learner.aligned.weight).all()
    else:
        learner.align_classifier(task)
        assert torch.isfinite(learner.head.weight).all()


@pytest.mark.parametrize("method", ["slca", "mos"])
def test_small_classes_in_the_first_task(method, tmp_path, monkeypatch, warnings_seen):
    """One sample per class and nothing learned before: a scaled identity, finite samples."""
    x, y, _ = gaussian_classes([1, 1], D, seed=40)
    _, means, covs, _ = gaussians_of(method, tmp_path, monkeypatch, x, y, tasks=1)
    assert torch.isfinite(covs[:2]).all() and float(covs[:2].diagonal(dim1=1, dim2=2).min()) > 1e-3
    chols = cholesky_factors(covs[:2])
    s = sample_gaussians(means[:2], chols, torch.arange(2).repeat_interleave(50))
    assert torch.isfinite(s).all()
    assert "class 0: 1 training sample" in messages(warnings_seen)


@pytest.mark.parametrize("n", [2, 12])
def test_mos_alignment_factorises_large_scale_rank_deficient_covariances(n, tmp_path):
    """Features of scale 100 and fewer samples than dimensions: the 1e-4 ridge is lost when
    the covariance is stored in float32, which a plain Cholesky then refuses."""
    x, y, _ = gaussian_classes([n] * 4, D, seed=50 + n, scale=100.0)
    learner, sc = mos_with_features(tmp_path, x, y)
    for t in sc.tasks[:2]:
        learner.before_task(t)
        learner.class_statistics(t)
    learner.align_classifier(sc.tasks[1])
    assert torch.isfinite(learner.head.weight).all()


def test_cholesky_factors_of_singular_and_indefinite_covariances():
    a = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    covs = torch.stack([torch.zeros(32, 32), a @ a.T, torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat(16, 16)])
    chols = cholesky_factors(covs)
    assert torch.isfinite(chols).all()
    rebuilt = chols @ chols.transpose(1, 2)
    torch.testing.assert_close(rebuilt[1], covs[1], rtol=1e-3, atol=1e-3 * float(covs[1].diagonal().mean()))
    assert float(torch.linalg.eigvalsh(rebuilt[2].double()).min()) >= -1e-6  # a covariance


@pytest.mark.parametrize("method", ["slca", "mos"])
def test_sampling_gaussians_of_many_samples_are_unchanged(method, tmp_path, monkeypatch, warnings_seen):
    """n >> d: mean and covariance (+ ridge) as before, bit for bit, and the Cholesky factors
    of the previous code (SLCA's jittered loop; MOS's plain batched Cholesky)."""
    x, y, _ = gaussian_classes([80, 70, 60, 90], D, seed=60)
    _, means, covs, _ = gaussians_of(method, tmp_path, monkeypatch, x, y)
    ridge = 1e-4
    for c in range(4):
        f = x[y == c].double()
        assert torch.equal(means[c], f.mean(0).float())
        assert torch.equal(covs[c], (torch.cov(f.T) + ridge * torch.eye(D, dtype=torch.float64)).float())
    assert torch.equal(cholesky_factors(covs[:4]), torch.linalg.cholesky(covs[:4].double()).float())
    assert messages(warnings_seen) == ""


@pytest.mark.parametrize("method", ["slca", "mos"])
def test_sampling_statistics_of_an_empty_class_raise(method, tmp_path, monkeypatch):
    x, y, _ = gaussian_classes([5, 0], D, seed=70)
    with pytest.raises(DataError, match="class 1"):
        gaussians_of(method, tmp_path, monkeypatch, x, y, tasks=1)


# -- RanPAC's ridge head -------------------------------------------------------------------
def ridge_head(counts: list[int], seed: int = 0, fit_seed: int = 0):
    x, y, mus = gaussian_classes(counts, 16, seed=seed)
    head = RidgeHead(16, 64, seed=1)
    head.grow(len(counts))
    lam = head.fit_task(x, y, list(range(len(counts))), LAMBDAS, 0.2, torch.Generator().manual_seed(fit_seed))
    return head, lam, x, y, mus


@pytest.mark.parametrize("n", [1, 2])
def test_ridge_small_classes_give_finite_sensible_weights(n):
    """A guard: the ridge solve was already finite with 1-2 samples per class."""
    head, lam, x, y, mus = ridge_head([n] * 5, seed=80 + n)
    assert torch.isfinite(head.weight).all() and lam > 0
    assert (head(x).argmax(1) == y).all()
    g = torch.Generator().manual_seed(0)
    xt = mus.repeat_interleave(20, 0) + 0.5 * torch.randn(100, 16, generator=g)
    assert float((head(xt).argmax(1) == torch.arange(5).repeat_interleave(20)).float().mean()) > 0.8


def test_ridge_one_sample_per_class_uses_the_fallback_lambda(warnings_seen):
    """Nothing can be held out without losing a class: the random split used to validate on
    classes it never fitted (which always picks the largest lambda)."""
    head, lam, *_ = ridge_head([1] * 4, seed=90)
    assert lam == 1.0 and float(head.ridge) == 1.0
    assert "[0, 1, 2, 3]" in messages(warnings_seen)


def test_ridge_one_shot_task_keeps_the_lambda_chosen_on_held_out_data(warnings_seen):
    """A many-shot task, then a task of one sample per class: lambda stays the first task's."""
    x0, y0, _ = gaussian_classes([30] * 3, 16, seed=91)
    x1, y1, _ = gaussian_classes([1] * 3, 16, seed=92)
    head = RidgeHead(16, 64, seed=1)
    head.grow(3)
    first = head.fit_task(x0, y0, [0, 1, 2], LAMBDAS, 0.2, torch.Generator().manual_seed(0))
    head.grow(3)
    second = head.fit_task(x1, y1 + 3, [3, 4, 5], LAMBDAS, 0.2, torch.Generator().manual_seed(1))
    assert second == first and torch.isfinite(head.weight).all()
    assert (head(x1).argmax(1) == y1 + 3).all()
    assert "[3, 4, 5]" in messages(warnings_seen)


def test_ridge_split_that_misses_a_class_is_redrawn_per_class(warnings_seen):
    """Two samples per class: find a seed whose random 80/20 split holds out both samples of
    a class; that class is then fitted on one sample and validated on the other."""
    counts, n = [2] * 5, 10
    y = torch.arange(5).repeat_interleave(2)
    seed = next(s for s in range(100) if len(set(y[torch.randperm(n, generator=torch.Generator().manual_seed(s))[8:]].tolist())) == 1)
    missed = int(y[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[8]])
    head, lam, x, y, _ = ridge_head(counts, seed=95, fit_seed=seed)
    assert f"class(es) [{missed}]" in messages(warnings_seen)
    assert torch.isfinite(head.weight).all() and (head(x).argmax(1) == y).all()
    # the lambda is the one of lowest held-out error on a split fitting every class
    h = head.project(x).double()
    targets = F.one_hot(y, 5).double()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    group = y[perm]
    fit = torch.cat([perm[group == c][:1] for c in range(5)])
    val = torch.cat([perm[group == c][1:] for c in range(5)])
    w = ridge_solutions(h[fit], targets[fit], LAMBDAS)
    losses = ((torch.einsum("vm,lmc->lvc", h[val], w) - targets[val]) ** 2).mean(dim=(1, 2))
    assert lam == LAMBDAS[int(losses.argmin())]


def test_ridge_many_samples_are_unchanged(warnings_seen):
    """n >> classes: the official random split, lambda and weights as before."""
    head, lam, x, y, _ = ridge_head([30] * 3, seed=97, fit_seed=3)
    h = head.project(x)
    targets = F.one_hot(y, 3).float()
    perm = torch.randperm(90, generator=torch.Generator().manual_seed(3))
    fit, val = perm[:72], perm[72:]
    w = ridge_solutions(h[fit], targets[fit], LAMBDAS)
    losses = ((torch.einsum("vm,lmc->lvc", h[val].double(), w) - targets[val].double()) ** 2).mean(dim=(1, 2))
    assert lam == LAMBDAS[int(losses.argmin())]
    assert torch.equal(head.weight, solve_ridge(h.T @ h, h.T @ targets, lam).T.float().contiguous())
    assert messages(warnings_seen) == ""


def test_ridge_empty_class_raises():
    x, y, _ = gaussian_classes([4, 4], 16, seed=99)
    head = RidgeHead(16, 64, seed=1)
    head.grow(3)
    with pytest.raises(DataError, match="class 2"):
        head.fit_task(x, y, [0, 1, 2], LAMBDAS, 0.2, torch.Generator().manual_seed(0))


def test_class_means_of_an_empty_class_raise():
    """The shared prototype helper (MOS's prototypes; SimpleCIL/EASE/APER keep their own)."""
    from ptcl.heads.class_statistics import class_means

    feats, labels = torch.randn(3, 4), torch.tensor([0, 0, 2])
    torch.testing.assert_close(class_means(feats, labels, [2]), feats[2:])  # one sample: its mean
    with pytest.raises(DataError, match="class 1"):
        class_means(feats, labels, [0, 1])
    assert not np.isnan(class_means(feats, labels, [0, 2]).numpy()).any()

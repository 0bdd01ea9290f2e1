"""Property tests of FeCAM's Gaussian head and learner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner, run_task, tiny_overrides

from ptcl.config import build_config
from ptcl.engine.runner import run
from ptcl.errors import ConfigError
from ptcl.heads.gaussian import GaussianHead, mahalanobis, normalize_cov, shrink_cov, tukey


def make(tmp_path, **extra):
    return make_learner(tmp_path, "fecam", {"method.epochs": 1, "method.batch_size": 8, **extra})


@pytest.mark.parametrize("gammas", [(1.0, 0.0), (10.0, 10.0), (1.0, 1.0)])
def test_covariance_positive_definite_with_fewer_samples_than_dims(gammas):
    g = torch.Generator().manual_seed(0)
    head = GaussianHead(48, None, *gammas)
    z = head.transform(torch.randn(7, 48, generator=g) + 2.0)  # rank <= 6 sample covariance
    assert torch.linalg.matrix_rank(torch.cov(z.T.double())) < 48
    cov = head.class_covariance(z)
    assert torch.allclose(cov, cov.T)
    assert float(torch.linalg.eigvalsh(cov).min()) > 1e-6
    torch.testing.assert_close(cov.diagonal(), torch.ones(48, dtype=torch.float64))  # correlation


def test_shrinkage_formula():
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 4.0, -1.0], [0.0, -1.0, 6.0]], dtype=torch.float64)
    out = shrink_cov(cov, 1.0, 2.0)
    off_mean = (0.5 + 0.5 - 1.0 - 1.0) / 4  # mean of the non-zero off-diagonal entries
    expected = cov + 4.0 * torch.eye(3, dtype=torch.float64) + 2.0 * off_mean * (1 - torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(out, expected)
    corr = normalize_cov(out)
    sd = out.diagonal().sqrt()
    torch.testing.assert_close(corr, out / torch.outer(sd, sd))


def test_identity_covariance_is_squared_euclidean_ncm():
    g = torch.Generator().manual_seed(1)
    x, means = torch.randn(30, 8, generator=g), torch.randn(5, 8, generator=g)
    d = mahalanobis(x, means, torch.eye(8).expand(5, 8, 8))
    torch.testing.assert_close(d, torch.cdist(x, means) ** 2, rtol=1e-4, atol=1e-4)
    assert torch.equal(d.argmin(1), torch.cdist(x, means).argmin(1))


def test_tukey_transform_is_applied():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(10, 6, generator=g)
    head = GaussianHead(6, beta=0.5)
    head.grow(1)
    head.set_class(0, x)
    torch.testing.assert_close(head.transform(x), F.normalize(x.sqrt(), dim=-1))
    torch.testing.assert_close(head.means[0], F.normalize(x.sqrt(), dim=-1).mean(0))
    plain = GaussianHead(6)
    torch.testing.assert_close(plain.transform(x), F.normalize(x, dim=-1))
    torch.testing.assert_close(tukey(torch.tensor([-1.0, 4.0]), 0.5), torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(tukey(torch.tensor([1.0]), 0.0), torch.tensor([0.0]), atol=1e-6, rtol=0)


def test_fecam_beats_ncm_on_heterogeneous_anisotropic_classes():
    g = torch.Generator().manual_seed(0)
    d, c, n, nt = 16, 4, 10, 200  # fewer training samples than dimensions
    center = torch.zeros(d)
    center[0] = 6.0
    mus = [center + 0.3 * torch.randn(d, generator=g) for _ in range(c)]
    scales = torch.full((d,), 0.1)
    scales[:2] = 2.0
    axes = [torch.linalg.qr(torch.randn(d, d, generator=g))[0] * scales for _ in range(c)]  # rotated

    def sample(k: int, m: int) -> torch.Tensor:
        return mus[k] + torch.randn(m, d, generator=g) @ axes[k].T

    fecam, ncm = GaussianHead(d), GaussianHead(d)
    fecam.grow(c)
    ncm.grow(c)
    for k in range(c):
        x = sample(k, n)
        fecam.set_class(k, x)
        ncm.set_class(k, x)
    ncm.precisions[:] = torch.eye(d)  # NCM: Euclidean distance to the same class means
    xt = torch.cat([sample(k, nt) for k in range(c)])
    yt = torch.arange(c).repeat_interleave(nt)
    acc_fecam = float((fecam(xt).argmax(1) == yt).float().mean())
    acc_ncm = float((ncm(xt).argmax(1) == yt).float().mean())
    assert acc_fecam > acc_ncm + 0.15, (acc_fecam, acc_ncm)


def test_learner_statistics_and_tukey_choice(tmp_path):
    learner, sc = make(tmp_path)
    assert learner.head.beta is None  # tukey=auto: off on a ViT (features can be negative)
    for task in sc.tasks[:2]:
        run_task(learner, task, reseed=False)
    x, y = learner.ctx.data.features("train", range(4))
    z = F.normalize(x, dim=-1)
    for c in range(4):
        torch.testing.assert_close(learner.head.means[c], z[y == c].mean(0))
        assert float(torch.linalg.eigvalsh(learner.head.precisions[c].double()).min()) > 0
    assert learner.head.precisions.shape == (4, x.shape[1], x.shape[1])
    on, _ = make(tmp_path, **{"method.tukey": "always"})
    assert on.head.beta == 0.5


@pytest.mark.parametrize("bad", [{"method.gamma1": 0.0}, {"method.gamma2": -1.0}, {"method.shrink_steps": 0},
                                 {"method.beta": -0.5}, {"method.tukey": "maybe"}])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        build_config(None, tiny_overrides("fecam", **bad))


def test_resume_gives_identical_metrics(tmp_path):
    over = tiny_overrides("fecam")
    full = run(None, over, out=tmp_path / "full", quiet=True)
    part = run(None, over, out=tmp_path / "part", quiet=True, max_tasks=2)
    resumed = run(resume=tmp_path / "part", quiet=True)
    assert part["tasks_done"] == 2 and resumed["finished"]
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]

"""Property tests of RanPAC's random-projection ridge head and learner."""

from __future__ import annotations

import pytest
import torch
from helpers import make_learner, run_task, tiny_overrides

from ptcl.backbones import build_backbone
from ptcl.config import build_config
from ptcl.engine.runner import run
from ptcl.errors import ConfigError
from ptcl.heads.ridge import (
    RidgeHead,
    random_projection,
    ridge_solutions,
    select_ridge,
    solve_ridge,
)
from ptcl.registry import METHODS

LAMBDAS = [10.0**e for e in range(-8, 9)]


def make(tmp_path, **extra):
    over = {"method.M": 64, "method.epochs": 1, "method.batch_size": 8, **extra}
    return make_learner(tmp_path, "ranpac", over)


def direct(h: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    h, y = h.double(), y.double()
    return torch.linalg.solve(h.T @ h + lam * torch.eye(h.shape[1], dtype=torch.float64), h.T @ y)


@pytest.mark.parametrize("n,m", [(40, 12), (12, 40)], ids=["primal", "dual"])
def test_eigen_lambda_path_equals_direct_solves(n, m):
    g = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(n, m, generator=g, dtype=torch.float64) + 0.3)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).double()
    lambdas = [10.0**e for e in range(-4, 5)]
    w = ridge_solutions(h, y, lambdas)
    assert w.shape == (len(lambdas), m, 3)
    for i, lam in enumerate(lambdas):
        torch.testing.assert_close(w[i], direct(h, y, lam), rtol=1e-6, atol=1e-8)


def test_chosen_lambda_minimises_held_out_error():
    g = torch.Generator().manual_seed(1)
    n, m, c = 60, 30, 3
    y = torch.randint(0, c, (n,), generator=g)
    h = torch.relu(torch.randn(n, m, generator=g) + torch.nn.functional.one_hot(y, c).float().repeat(1, 10))
    targets = torch.nn.functional.one_hot(y, c).float()
    lam, losses = select_ridge(h, targets, LAMBDAS, 0.2, torch.Generator().manual_seed(7))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    fit, val = perm[:48], perm[48:]
    brute = [float(((h[val].double() @ direct(h[fit], targets[fit], lt) - targets[val]) ** 2).mean()) for lt in LAMBDAS]
    torch.testing.assert_close(losses, torch.tensor(brute, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    assert lam == LAMBDAS[min(range(len(brute)), key=brute.__getitem__)]
    assert max(brute) > 1.05 * min(brute)  # the choice is not a tie


def test_incremental_statistics_equal_batch_statistics():
    g = torch.Generator().manual_seed(2)
    head = RidgeHead(8, 32, seed=3)
    xs = [torch.randn(20, 8, generator=g), torch.randn(14, 8, generator=g)]
    ys = [torch.randint(0, 2, (20,), generator=g), torch.randint(2, 5, (14,), generator=g)]
    for x, y, classes in zip(xs, ys, [range(0, 2), range(2, 5)], strict=True):
        head.grow(len(classes))
        head.fit_task(x, y, list(classes), LAMBDAS, 0.2, torch.Generator().manual_seed(0))
    h = torch.relu(torch.cat(xs) @ head.w_rand)
    onehot = torch.nn.functional.one_hot(torch.cat(ys), 5).float()
    torch.testing.assert_close(head.G, h.T @ h, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(head.Q, h.T @ onehot, rtol=1e-5, atol=1e-4)
    lam = float(head.ridge)
    torch.testing.assert_close(head.weight.double().T, direct(h, onehot, lam), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(head(torch.cat(xs)), h @ head.weight.T)


def test_solve_ridge_matches_linalg_solve():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(10, 25, generator=g)  # rank-deficient Gram matrix
    q = torch.randn(25, 3, generator=g)
    for lam in (1e-6, 1e-2, 1.0, 1e3):
        a = (h.T @ h).double() + lam * torch.eye(25, dtype=torch.float64)
        ref = torch.linalg.solve(a, q.double())
        torch.testing.assert_close(solve_ridge(h.T @ h, q, lam, max_cond32=0), ref)  # float64 path
        got = solve_ridge(h.T @ h, q, lam)  # float32 only where well conditioned
        assert got.dtype == (torch.float32 if 1 + float((h * h).sum()) / lam <= 1e4 else torch.float64)
        torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_random_projection_is_reproducible():
    a, b, c = RidgeHead(16, 50, seed=5), RidgeHead(16, 50, seed=5), RidgeHead(16, 50, seed=6)
    assert torch.equal(a.w_rand, b.w_rand) and not torch.equal(a.w_rand, c.w_rand)
    assert torch.equal(a.w_rand, random_projection(16, 50, 5))
    assert abs(float(a.w_rand.std()) - 1.0) < 0.1 and abs(float(a.w_rand.mean())) < 0.1  # N(0, 1)
    assert {"w_rand", "G", "Q", "weight", "ridge"} <= set(a.state_dict())


def test_no_projection_option():
    head = RidgeHead(6, 0)
    assert head.dim == 6
    x = torch.randn(3, 6)
    torch.testing.assert_close(head.project(x), x)


def test_learner_without_tuning_accumulates_frozen_features(tmp_path):
    learner, sc = make(tmp_path, **{"method.tuning": "none"})
    other, _ = make(tmp_path, **{"method.tuning": "none"})
    assert torch.equal(learner.head.w_rand, other.head.w_rand)  # seeded by the run seed
    for task in sc.tasks[:2]:
        run_task(learner, task, reseed=False)
    x, y = learner.ctx.data.features("train", range(4))
    h = torch.relu(x @ learner.head.w_rand)
    torch.testing.assert_close(learner.head.G, h.T @ h, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(learner.head.Q, h.T @ torch.nn.functional.one_hot(y.long(), 4).float(),
                               rtol=1e-5, atol=1e-3)
    assert learner.handle is None and learner.predict(x).shape == (len(x), 4)


def test_learner_with_adapter_uses_adapted_features(tmp_path):
    learner, sc = make(tmp_path)
    task = sc.tasks[0]
    frozen, _ = learner.ctx.data.features("train", task.classes)  # cached before tuning
    learner.before_task(task)
    learner.train_task(task)
    adapted, _ = learner.features("train", task.classes)
    assert learner.handle is not None and not torch.allclose(adapted, frozen)
    h = torch.relu(adapted @ learner.head.w_rand)
    torch.testing.assert_close(learner.head.G, h.T @ h, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("bad", [{"method.M": -1}, {"method.val_fraction": 1.0},
                                 {"method.lambda_exp_min": 3, "method.lambda_exp_max": 2}])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        build_config(None, tiny_overrides("ranpac", **bad))


def test_adapter_on_cnn_is_refused_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="ViT"):
        cfg = build_config(None, tiny_overrides("ranpac", **{"backbone.name": "efficientnet_lite0",
                                                              "backbone.pretrained": False}))
        bb = build_backbone(cfg.backbone)
        METHODS.get("ranpac")(cfg.method, bb, None)


def test_resume_gives_identical_metrics(tmp_path):
    over = tiny_overrides("ranpac", **{"method.M": 64, "method.epochs": 1, "method.batch_size": 8})
    full = run(None, over, out=tmp_path / "full", quiet=True)
    part = run(None, over, out=tmp_path / "part", quiet=True, max_tasks=2)
    resumed = run(resume=tmp_path / "part", quiet=True)
    assert part["tasks_done"] == 2 and resumed["finished"]
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]

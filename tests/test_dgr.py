"""DGR (ptcl.methods.dgr): the per-class reweighting of the head's gradients, the KD scale,
the prior-adjusted CE and the KD targets, the head gradients of a real step, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_resume_matches_full, make_learner, run_task, tiny_overrides, train_batch

import ptcl
import ptcl.methods.dgr  # noqa: F401  (registers "dgr" until ptcl.methods imports it)
from ptcl.config import build_config
from ptcl.data.memory import ExemplarMemory
from ptcl.errors import ConfigError
from ptcl.methods.dgr import DGR, kd_ratio, log_prior, reweighted_head_gradients, reweighting

FAST = {"method.epochs": 1, "method.init_epochs": 1, "method.batch_size": 8, "method.fixed_memory": True,
        "method.memory_per_class": 2}


def make(tmp_path, init_cls: int = 2, **extra) -> tuple[DGR, object]:
    learner, sc = make_learner(tmp_path, "dgr", {**FAST, **extra}, init_cls=init_cls)
    assert isinstance(learner, DGR)
    return learner, sc


# -- the pieces, on hand examples -------------------------------------------------------------
def test_first_task_weights_are_min_over_accumulated_norm():
    w = reweighting(torch.tensor([1.0, 2.0, 4.0]), 0, 1.0)
    assert torch.allclose(w, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))


def test_later_task_weights_balance_each_group_then_scale_old_and_new():
    # old a = [2, 4] (mean 3), new a = [1, 3] (mean 2): ratio 2/3
    w = reweighting(torch.tensor([2.0, 4.0, 1.0, 3.0]), 2, 1.0)
    rs_old = 2 / 3
    rs_new = 2 / 3 * math.exp(-1.0 * 2 / 4)
    want = torch.tensor([1.0 * rs_old, 0.5 * rs_old, 1.0 * rs_new, (1 / 3) * rs_new], dtype=torch.float64)
    assert torch.allclose(w, want)
    # gammar_r scales only the new classes; rs is capped at 1 when the new gradients are larger
    w0 = reweighting(torch.tensor([2.0, 4.0, 1.0, 3.0]), 2, 0.0)
    assert torch.allclose(w0[2:], torch.tensor([2 / 3, 2 / 9], dtype=torch.float64))
    big = reweighting(torch.tensor([1.0, 1.0, 10.0, 20.0]), 2, 0.1)
    assert torch.allclose(big[:2], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(big[2:], torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_kd_ratio_is_the_norm_of_the_reweighted_ce_norms_over_the_kd_norms():
    r = kd_ratio(torch.tensor([1.0, 0.5, 0.25]), torch.tensor([2.0, 4.0, 8.0]), torch.tensor([3.0, 4.0]))
    assert r == pytest.approx(math.sqrt(2**2 + 2**2 + 2**2) / 5)
    # a zero KD gradient: 0, not PILOT's inf (whose product with the zero gradient is NaN)
    assert kd_ratio(torch.ones(2), torch.ones(2), torch.zeros(1)) == 0.0


def test_reweighted_head_gradients_scale_each_row_and_add_the_scaled_kd_to_old_rows():
    gw = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    gb = torch.tensor([1.0, -1.0, 2.0])
    kw, kb = torch.tensor([[10.0, 20.0]]), torch.tensor([30.0])
    w = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64)
    out_w, out_b = reweighted_head_gradients(w, (gw, gb), (kw, kb), 0.1)
    assert torch.allclose(out_w, torch.tensor([[0.5 + 1.0, 1.0 + 2.0], [3.0, 4.0], [1.25, 1.5]]))
    assert torch.allclose(out_b, torch.tensor([0.5 + 3.0, -1.0, 0.5]))
    first_w, first_b = reweighted_head_gradients(w, (gw, gb))
    assert torch.allclose(first_w, gw * w.float()[:, None]) and torch.allclose(first_b, gb * w.float())
    assert torch.equal(gw, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))  # inputs untouched


def test_log_prior_is_log_of_the_class_frequencies():
    assert torch.allclose(log_prior(torch.tensor([6, 2, 2])), torch.log(torch.tensor([0.6, 0.2, 0.2])))


# -- on the learner -------------------------------------------------------------------------
def _backward_step(learner: DGR, x, y, task) -> torch.Tensor:
    """One training step as the loop does it, up to the optimiser step."""
    learner.train()
    loss = learner.step(x, y, task)
    learner.zero_grad(set_to_none=True)
    loss.backward()
    learner.reweight_head()
    return loss


def test_second_task_losses_prior_and_kd_targets(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    x, _ = train_batch(learner, range(4), shuffle=True, seed=3)
    learner.eval()
    with torch.no_grad():
        before = learner.cnn_logits(x)
    task = sc.tasks[1]
    learner.before_task(task)
    assert learner.teacher is not None
    with torch.no_grad():
        old = learner.teacher.module.cnn_logits(x)
    assert torch.equal(old, before)  # the teacher is the model after task 0, old classes only
    counts = learner.class_counts(task)
    assert counts.tolist() == [2, 2, 6, 6]  # 2 exemplars per old class, 6 images per new class
    learner.prior = log_prior(counts)
    y = torch.tensor([0, 1, 2, 3, 2, 3, 0, 2])
    ce, kd = learner.losses(x, y, task)
    logits = learner.cnn_logits(x)
    freq = torch.tensor([2.0, 2.0, 6.0, 6.0]) / 16
    assert torch.allclose(ce, F.cross_entropy(logits + torch.log(freq), y), atol=1e-6)
    # KD targets: the teacher's softmax at T = 2 over the old classes, against the student's old logits
    target = torch.softmax(before / 2.0, dim=1)
    want = -(target * torch.log_softmax(logits[:, :2] / 2.0, dim=1)).sum(1).mean()
    assert torch.allclose(kd, want, atol=1e-6)
    loss = learner.step(x, y, task)
    assert torch.allclose(loss, ce + 1.0 * (2 / 2) * kd, atol=1e-6)


def test_first_task_head_gradients_are_reweighted_by_accumulated_norms(tmp_path):
    learner, sc = make(tmp_path, init_cls=3)  # 2 classes would have equal row norms (their logit grads sum to 0)
    task = sc.tasks[0]
    learner.before_task(task)
    learner.prior = log_prior(learner.class_counts(task))
    batches = [train_batch(learner, range(3), n, shuffle=True, seed=3) for n in (8, 5)]
    accum = torch.zeros(3, dtype=torch.float64)
    for x, y in batches:
        learner.train()
        gw, gb = torch.autograd.grad(learner.losses(x, y, task)[0], [learner.head.weight, learner.head.bias])
        accum += gw.norm(dim=1).double()
        w = (accum.min() / accum).float()
        _backward_step(learner, x, y, task)
        assert torch.allclose(learner.head.weight.grad, gw * w[:, None], atol=1e-6)
        assert torch.allclose(learner.head.bias.grad, gb * w, atol=1e-6)
        with torch.no_grad():  # move the head so that the second step's norms differ
            learner.head.weight -= 0.5 * learner.head.weight.grad
        assert float(w.min()) < 0.95  # the weights are not all 1
    assert torch.allclose(learner.grad_accum, accum)


def test_second_task_head_gradients_match_pilots_formula_and_backbone_keeps_the_full_loss(tmp_path):
    learner, sc = make(tmp_path, **{"method.kd_lambda": 0.5, "method.gammar_r": 2.0})
    run_task(learner, sc.tasks[0])
    task = sc.tasks[1]
    learner.before_task(task)
    assert learner.grad_accum.tolist() == [0.0] * 4  # reset for the task
    learner.prior = log_prior(learner.class_counts(task))
    with torch.no_grad():  # the student's old logits differ from the teacher's: a nonzero KD gradient
        learner.head.weight[:2] += 0.1 * torch.randn_like(learner.head.weight[:2])
    W, b = learner.head.weight, learner.head.bias
    accum = torch.zeros(4, dtype=torch.float64)
    for step in range(2):
        x, y = train_batch(learner, range(4), 8 - step, shuffle=True, seed=3)
        learner.train()
        ce, kd = learner.losses(x, y, task)
        gw, gb = torch.autograd.grad(ce, [W, b], retain_graph=True)
        kw, kb = torch.autograd.grad(kd, [W, b], retain_graph=True)
        block = learner.backbone.model.blocks[0].attn.qkv.weight
        (g_block,) = torch.autograd.grad(ce + 0.5 * (2 / 2) * kd, [block])
        norms = gw.norm(dim=1).double()
        accum += norms
        old, new = accum[:2], accum[2:]
        rs = float(new.mean() / old.mean())
        w = torch.cat([old.min() / old * min(1.0, rs), new.min() / new * min(1.0, rs * math.exp(-2.0 * 2 / 4))])
        r = float((w * norms).norm() / kw[:2].norm(dim=1).double().norm())
        want_w = gw * w.float()[:, None]
        want_w[:2] += r * kw[:2]
        want_b = gb * w.float()
        want_b[:2] += r * kb[:2]
        _backward_step(learner, x, y, task)
        assert torch.allclose(W.grad, want_w, atol=1e-6)
        assert torch.allclose(b.grad, want_b, atol=1e-6)
        torch.testing.assert_close(block.grad, g_block)  # the backbone is not reweighted
        assert not torch.allclose(W.grad, gw + 0.5 * kw, atol=1e-4)  # the plain gradient would fail
        with torch.no_grad():
            W -= 0.5 * W.grad
    assert torch.allclose(learner.grad_accum, accum)


def test_missing_class_in_training_set_is_a_config_error(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    learner.memory = ExemplarMemory(per_class=2)  # as if the budget left the old classes no exemplar
    learner.before_task(sc.tasks[1])
    with pytest.raises(ConfigError, match="memory_size"):
        learner.train_task(sc.tasks[1])


def test_checkpoint_holds_the_accumulated_norms_and_the_replay_rebuilds_them(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:2]:
        run_task(learner, task)
    state = learner.checkpoint_state()
    assert state["grad_accum"].shape == (4,) and bool((state["grad_accum"] > 0).all())
    fresh, _ = make(tmp_path)
    for task in sc.tasks[:2]:
        fresh.before_task(task)
    fresh.load_checkpoint_state(state)
    assert torch.equal(fresh.grad_accum, learner.grad_accum)
    assert torch.equal(fresh.head.weight, learner.head.weight)
    fresh.before_task(sc.tasks[2])
    assert fresh.grad_accum.tolist() == [0.0] * 6 and fresh.head.out_features == 6


def test_resume_matches_the_full_run(tmp_path):
    over = tiny_overrides("dgr", **FAST, **{"scenario.increment": 4})  # 3 tasks: 2, 4, 4 classes
    assert_resume_matches_full(over, tmp_path, ("accuracy_matrix", "avg_acc", "last_acc", "class_order", "variants"))


def test_run_records_nme_beside_the_cnn_accuracy(tmp_path):
    m = ptcl.run(None, tiny_overrides("dgr", **FAST), out=tmp_path / "r", quiet=True, max_tasks=2)
    assert set(m["variants"]) == {"nme"}
    assert all(math.isfinite(a) for a in m["accuracy_per_task"])


def test_defaults_follow_pilot_and_bad_options_are_errors():
    cfg = build_config(None, ["method.name=dgr"]).method
    assert (cfg.epochs, cfg.init_epochs, cfg.lr, cfg.init_lr, cfg.batch_size) == (20, 20, 1e-3, 1e-3, 128)
    assert (cfg.weight_decay, cfg.init_weight_decay, cfg.scheduler) == (5e-4, 5e-4, "cosine")
    assert (cfg.kd_lambda, cfg.gammar_r, cfg.T, cfg.memory_size, cfg.fixed_memory) == (1.0, 1.0, 2.0, 2000, False)
    with pytest.raises(ConfigError, match="gammar_r"):
        build_config(None, ["method.name=dgr", "method.gammar_r=-1"])
    with pytest.raises(ConfigError, match="T"):
        build_config(None, ["method.name=dgr", "method.T=0"])

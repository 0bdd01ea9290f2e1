"""Coil (ptcl.methods.coil): Sinkhorn plans and marginals, the transported classifier
initialisation, the teacher's distillation, the retrospective term, structure and resume."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_resume_matches_full, make_learner, run_task, tiny_overrides, train_batch

import ptcl.methods.coil  # noqa: F401  (registers "coil" until ptcl.methods imports it)
from ptcl.errors import ConfigError
from ptcl.methods.coil import (
    Coil,
    class_prototypes,
    prospective_init,
    retrospective_weights,
    sinkhorn_plan,
    transport_marginals,
)
from ptcl.methods.rehearsal import softmax_kd

FAST = {"method.epochs": 1, "method.batch_size": 8, "method.fixed_memory": True, "method.memory_per_class": 2}
WIDTH = 32  # vit_tiny_test's feature width


def make(tmp_path, **extra) -> tuple[Coil, object]:
    learner, sc = make_learner(tmp_path, "coil", {**FAST, **extra})
    assert isinstance(learner, Coil)
    return learner, sc


# -- transport, by hand -------------------------------------------------------------------------
def test_sinkhorn_plan_of_a_2x2_example_matches_the_closed_form_and_the_marginals():
    cost = torch.tensor([[0.0, 1.0], [2.0, 0.5]], dtype=torch.float64)
    reg = 0.464
    a, b = transport_marginals(2, 2, 2, "pilot")  # 2 old, 2 new: every entry 1/2, equal masses
    plan = sinkhorn_plan(a, b, cost, reg)
    torch.testing.assert_close(plan.sum(1), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(0), torch.full((2,), 0.5, dtype=torch.float64))
    # uniform 2x2 marginals: plan [[p, 1/2 - p], [1/2 - p, p]] with p^2 / (1/2 - p)^2 = K11 K22 / (K12 K21)
    s = math.exp(-(cost[0, 0] + cost[1, 1] - cost[0, 1] - cost[1, 0]).item() / reg / 2)
    p = s / (2 * (1 + s))
    want = torch.tensor([[p, 0.5 - p], [0.5 - p, p]], dtype=torch.float64)
    torch.testing.assert_close(plan, want, rtol=0, atol=1e-7)


def test_pilot_marginals_of_unequal_masses_give_the_uniform_plans_direction():
    g = torch.Generator().manual_seed(0)
    old, new = F.normalize(torch.randn(4, 5, generator=g), dim=1), F.normalize(torch.randn(2, 5, generator=g), dim=1)
    # prospective: rows the 4 old classes (mass 1), columns the 2 new (mass 2/4 in PILOT)
    cost = torch.cdist(old.double(), new.double(), p=3.0)
    a, b = transport_marginals(4, 2, 4, "pilot")
    assert torch.equal(a, torch.full((4,), 0.25)) and torch.equal(b, torch.full((2,), 0.25))
    plan = sinkhorn_plan(a, b, cost, 0.464)
    torch.testing.assert_close(plan.sum(1), torch.full((4,), 0.25, dtype=torch.float64))  # rows: a
    torch.testing.assert_close(plan.sum(0), torch.full((2,), 0.5, dtype=torch.float64))  # cols: b * sum a / sum b
    ua, ub = transport_marginals(4, 2, 4, "uniform")
    uniform = sinkhorn_plan(ua, ub, cost, 0.464)
    torch.testing.assert_close(uniform.sum(1), ua.double())
    torch.testing.assert_close(uniform.sum(0), ub.double())
    torch.testing.assert_close(plan, uniform, rtol=1e-6, atol=1e-9)
    # retrospective: rows the 2 new classes (mass 2/4), columns the 4 old (mass 1): half the uniform plan
    a, b = transport_marginals(2, 4, 4, "pilot")
    retro = sinkhorn_plan(a, b, cost.T + 1e-8, 0.464)
    torch.testing.assert_close(retro.sum(1), torch.full((2,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(retro.sum(0), torch.full((4,), 0.125, dtype=torch.float64))
    ua, ub = transport_marginals(2, 4, 4, "uniform")
    torch.testing.assert_close(retro * 2, sinkhorn_plan(ua, ub, cost.T + 1e-8, 0.464), rtol=1e-6, atol=1e-9)


def test_pilot_retrospective_plan_underflows_to_zero_when_old_classes_are_three_times_the_new():
    g = torch.Generator().manual_seed(1)
    old, new = F.normalize(torch.randn(8, 32, generator=g), dim=1), F.normalize(torch.randn(2, 32, generator=g), dim=1)
    cost = torch.cdist(new.double(), old.double(), p=3.0) + 1e-8
    plan = sinkhorn_plan(*transport_marginals(2, 8, 8, "pilot"), cost, 0.464)
    assert torch.all(plan == 0)  # as in PILOT: the retrospective term then has no gradient
    uniform = sinkhorn_plan(*transport_marginals(2, 8, 8, "uniform"), cost, 0.464)
    torch.testing.assert_close(uniform.sum(0), torch.full((8,), 1 / 8, dtype=torch.float64))
    torch.testing.assert_close(uniform.sum(1), torch.full((2,), 1 / 2, dtype=torch.float64))


def test_prospective_init_is_the_plan_weighted_sum_of_normalised_old_rows_at_the_old_mean_norm():
    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # 2 old classes, row norms 3 and 1
    plan = torch.tensor([[0.4, 0.1], [0.1, 0.4]], dtype=torch.float64)  # (old, new)
    init = prospective_init(w, plan)
    hat = 2 * torch.tensor([[0.4, 0.1, 0.0], [0.1, 0.4, 0.0]])  # K * plan^T normalize(w)
    gamma = 2.0 / hat.norm(dim=1).mean()  # mean old norm (3 + 1) / 2 over the mean new norm
    torch.testing.assert_close(init, hat * gamma)
    torch.testing.assert_close(init.norm(dim=1).mean(), w.norm(dim=1).mean())
    # retrospective: the plan (new, old) maps the normalised new rows onto K old weights, times K
    new = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    retro = retrospective_weights(new, plan.T)
    torch.testing.assert_close(retro, 2 * torch.tensor([[0.0, 0.4, 0.1], [0.0, 0.1, 0.4]]))


def test_class_prototypes_are_renormalised_means_of_normalised_features():
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [0.0, -4.0]])
    protos = class_prototypes(feats, torch.tensor([0, 0, 1, 1]), [1, 0])
    torch.testing.assert_close(protos, torch.tensor([[0.0, -1.0], [0.5**0.5, 0.5**0.5]], dtype=torch.float64))


def test_missing_pot_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "ptcl\[coil\]"'):
        make(tmp_path)


def test_defaults_are_pilot_coil_json(tmp_path):
    cfg = make_learner(tmp_path, "coil")[0].cfg
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.milestones, cfg.lr_decay) == (
        10, 1e-3, 64, 5e-4, [80, 120], 0.1)
    assert (cfg.sinkhorn_reg, cfg.norm_term, cfg.reg_term, cfg.T, cfg.new_branch_weight) == (
        0.464, 3.0, 1e-3, 2.0, 1e-3)
    assert cfg.init_epochs is None and cfg.init_lr is None  # no init_* keys: the first task trains alike
    assert (cfg.memory_size, cfg.fixed_memory, cfg.classifier, cfg.scheduler) == (2000, False, "cnn", "multistep")
    with pytest.raises(ConfigError):
        make(tmp_path, **{"method.sinkhorn_marginals": "balanced"})


# -- the learner ---------------------------------------------------------------------------------
def test_head_is_cosine_grows_with_zero_rows_and_keeps_sigma(tmp_path):
    learner, sc = make(tmp_path)
    learner.before_task(sc.tasks[0])
    bound = WIDTH**-0.5
    assert learner.head.weight.shape == (2, WIDTH) and learner.head.weight.abs().max() <= bound
    assert learner.head.sigma.requires_grad and float(learner.head.sigma.detach()) == 1.0
    learner.train_task(sc.tasks[0])
    learner.after_task(sc.tasks[0])
    old, sigma = learner.head.weight.detach().clone(), float(learner.head.sigma.detach())
    assert sigma != 1.0  # trained
    learner.before_task(sc.tasks[1])
    assert learner.head.weight.shape == (4, WIDTH)
    assert torch.equal(learner.head.weight[:2], old) and torch.all(learner.head.weight[2:] == 0)
    assert float(learner.head.sigma.detach()) == sigma
    x, _ = train_batch(learner, range(2), 4)
    learner.eval()
    with torch.no_grad():
        f = learner.backbone(x)
        torch.testing.assert_close(learner.cnn_logits(x),
                                   sigma * F.normalize(f, dim=1) @ F.normalize(learner.head.weight, dim=1).T)


def test_new_rows_start_from_the_prospective_transport_of_the_old_rows(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    task = sc.tasks[1]
    learner.before_task(task)
    old_w = learner.head.weight[:2].detach().clone()
    # by hand: prototypes of all training images of classes 0-1 (old) and 2-3 (new), model after task 0
    data = learner.ctx.data
    pos = data.positions("train", range(4))
    feats = learner._embed_at(pos)
    protos = class_prototypes(feats, torch.from_numpy(data.label["train"][pos]), [0, 1, 2, 3])
    plan = sinkhorn_plan(torch.full((2,), 0.5), torch.full((2,), 0.5), torch.cdist(protos[:2], protos[2:], p=3.0),
                         0.464)
    want = prospective_init(old_w, plan)
    got = learner.prospective_transport(task)
    torch.testing.assert_close(got, want)
    seen = {}

    def spy(x, y, task, epochs=None, epoch=None, batch=None):  # the rows when training starts
        seen.setdefault("rows", learner.head.weight[2:].detach().clone())
        seen.setdefault("branch", learner.ot_new_branch.clone())
        return Coil.loss(learner, x, y, task, epochs, epoch, batch)

    learner.loss = spy
    learner.train_task(task)
    torch.testing.assert_close(seen["rows"], want)
    torch.testing.assert_close(seen["branch"], want)


def test_loss_first_epoch_distils_from_the_teacher_and_the_transported_init(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    x0, y0 = train_batch(learner, range(2))
    learner.eval()
    with torch.no_grad():
        torch.testing.assert_close(learner.loss(x0, y0, sc.tasks[0], 1, 0, 0),
                                   F.cross_entropy(learner.cnn_logits(x0), y0))  # task 0: CE only
        before = learner.cnn_logits(x0)
    task = sc.tasks[1]
    learner.before_task(task)
    learner.ot_new_branch = learner.prospective_transport(task)
    with torch.no_grad():
        learner.head.weight[2:] = learner.ot_new_branch
    assert torch.equal(learner.teacher.module.cnn_logits(x0), before)  # the model after task 0
    x, y = train_batch(learner, range(4))
    with torch.no_grad():
        feats = learner.backbone(x)
        logits = learner.head(feats)
        old = learner.teacher.module.cnn_logits(x)
        lam = 2 / 4
        f = F.normalize(feats, dim=1)
        target = torch.softmax(f @ F.normalize(learner.ot_new_branch, dim=1).T / 2, 1)
        new_branch = -(torch.log_softmax(logits[:, 2:] / 2, 1) * target).sum(1).mean()
        want = lam * softmax_kd(logits[:, :2], old, 2.0) + (1 - lam) * F.cross_entropy(logits, y) + 1e-3 * new_branch
        torch.testing.assert_close(learner.loss(x, y, task, 10, 0, 0), want)
        # the distillation term reads the teacher: another teacher, another loss
        learner.teacher.module.head.weight.mul_(-1)
        assert not torch.allclose(learner.loss(x, y, task, 10, 0, 0), want)


def test_loss_later_epochs_add_the_retrospective_term_recomputed_every_retro_every_batches(tmp_path, monkeypatch):
    learner, sc = make(tmp_path, **{"method.retro_every": 3, "method.reg_term": 0.5})
    run_task(learner, sc.tasks[0])
    task = sc.tasks[1]
    learner.before_task(task)
    learner.ot_new_branch = learner.prospective_transport(task)
    with torch.no_grad():
        learner.head.weight[2:] = learner.ot_new_branch
    calls = []
    real = learner.retrospective_transport
    monkeypatch.setattr(learner, "retrospective_transport", lambda t: calls.append(1) or real(t))
    x, y = train_batch(learner, range(4))
    learner.eval()
    with torch.no_grad():
        got = learner.loss(x, y, task, 4, 2, 0)
        assert len(calls) == 1 and learner.ot_old_branch.shape == (2, WIDTH)
        learner.loss(x, y, task, 4, 2, 1)
        learner.loss(x, y, task, 4, 2, 2)
        assert len(calls) == 1
        learner.loss(x, y, task, 4, 2, 3)
        assert len(calls) == 2
        feats = learner.backbone(x)
        logits = learner.head(feats)
        old = learner.teacher.module.cnn_logits(x)
        cos_old = F.normalize(feats, dim=1) @ F.normalize(learner.ot_old_branch, dim=1).T
        want = (0.5 * softmax_kd(logits[:, :2], old, 2.0) + 0.5 * F.cross_entropy(logits, y)
                + 0.5 * (2 / 4) ** 2 * softmax_kd(cos_old, old, 2.0))
        torch.testing.assert_close(got, want)
    # the retrospective weights: the plan between the new prototypes and the exemplars' of the old classes
    data, mem = learner.ctx.data, learner.memory
    assert sorted(set(mem.labels.tolist())) == [0, 1]
    pos = torch.cat([mem.positions.cpu(), torch.from_numpy(data.positions("train", range(2, 4)))]).numpy()
    labels = torch.cat([mem.labels.cpu(), torch.from_numpy(data.label["train"][data.positions("train", range(2, 4))])])
    protos = class_prototypes(learner._embed_at(pos), labels, [0, 1, 2, 3])
    cost = torch.cdist(protos[2:], protos[:2], p=3.0) + 1e-8
    plan = sinkhorn_plan(torch.full((2,), 0.5), torch.full((2,), 0.5), cost, 0.464)
    torch.testing.assert_close(learner.retrospective_transport(task),
                               retrospective_weights(learner.head.weight[2:].detach(), plan))


def test_two_epochs_train_every_part_and_memory_option(tmp_path):
    learner, sc = make(tmp_path, **{"method.epochs": 2, "method.prospective_prototypes": "memory",
                                    "method.sinkhorn_marginals": "uniform"})
    run_task(learner, sc.tasks[0])
    w0 = learner.backbone.state_dict()["model.blocks.0.attn.qkv.weight"].clone()
    run_task(learner, sc.tasks[1])
    assert learner.ot_old_branch is None and learner.ot_new_branch is None  # cleared after the task
    assert not torch.equal(w0, learner.backbone.state_dict()["model.blocks.0.attn.qkv.weight"])
    assert learner.nme_means.shape == (4, WIDTH) and len(learner.memory) == 8
    assert torch.isfinite(learner.head.weight).all()


def test_checkpoint_replay_rebuilds_same_module_tree(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:3]:
        run_task(learner, task)
    saved = learner.checkpoint_state()
    fresh, _ = make(tmp_path)
    for task in sc.tasks[:3]:
        fresh.before_task(task)
    got = fresh.state_dict()
    assert list(got) == list(saved)
    grown = [k for k, v in saved.items() if got[k].shape != v.shape]
    assert all(k.startswith(("memory.", "nme_means")) for k in grown), grown
    fresh.load_checkpoint_state(saved)
    x, _ = train_batch(learner, range(6), 6)
    learner.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x), learner.predict(x), rtol=0, atol=0)
        torch.testing.assert_close(fresh.nme_logits(x), learner.nme_logits(x), rtol=0, atol=0)


def test_resume_after_task_2_gives_identical_metrics(tmp_path):
    over = tiny_overrides("coil", **{**FAST, "method.epochs": 2, "scenario.increment": 4})  # 3 tasks: 2, 4, 4
    assert_resume_matches_full(over, tmp_path, ("accuracy_matrix", "avg_acc", "last_acc", "class_order"))


def test_bf16_training_runs_the_transport_in_float32(tmp_path):
    learner, sc = make(tmp_path, **{"method.epochs": 2})
    learner.ctx.precision = "bf16"
    run_task(learner, sc.tasks[0])
    seen = []
    real = learner.retrospective_transport
    learner.retrospective_transport = lambda t: seen.append(real(t)) or seen[-1]
    run_task(learner, sc.tasks[1])
    assert seen and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in seen)
    assert torch.isfinite(learner.head.weight).all()

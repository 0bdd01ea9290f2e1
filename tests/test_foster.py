"""FOSTER: boosting with a second (new) extractor beside the frozen old one, compression back to
one extractor, the class-balanced weights and the balanced distillation on hand examples,
resume rebuilding the boosted model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_resume_matches_full, make_learner, run_task, state_copy, tiny_overrides

import ptcl.methods.foster  # noqa: F401  (registers "foster" until ptcl.methods imports it)
from ptcl.backbones.base import Backbone, Preprocess
from ptcl.config import build_config
from ptcl.errors import ConfigError
from ptcl.heads.linear import weight_align
from ptcl.methods.foster import balanced_kd, class_balanced_weights
from ptcl.methods.rehearsal import softmax_kd

FAST = {"method.epochs": 1, "method.init_epochs": 1, "method.compression_epochs": 1, "method.batch_size": 8,
        "method.memory_per_class": 2}
EXTRACTOR_KEY = "patch_embed.proj.weight"  # one per ViT extractor in a state_dict


def extractors(learner) -> int:
    return sum(k.endswith(EXTRACTOR_KEY) for k in learner.state_dict())


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_class_balanced_weights_follow_the_effective_number_formula():
    # beta 0.5, 2 and 6 samples: (1 - b) / (1 - b^n) = 2/3 and 32/63, rescaled to sum to 2
    w = class_balanced_weights([2, 6], 0.5)
    assert torch.allclose(w, torch.tensor([84 / 74, 64 / 74]))
    # PILOT's CIFAR setting: 20 exemplars per old class, 500 images per new class
    w = class_balanced_weights([20] * 10 + [500] * 10, 0.96)
    assert math.isclose(float(w.sum()), 20.0, rel_tol=1e-6)
    old = (1 - 0.96) / (1 - 0.96**20)
    new = (1 - 0.96) / (1 - 0.96**500)
    assert torch.allclose(w[0] / w[-1], torch.tensor(old / new))
    with pytest.raises(ValueError, match="sample"):
        class_balanced_weights([3, 0], 0.9)


def test_balanced_kd_and_kd_on_hand_examples():
    # teacher softmax at T=2 of [0, 2 ln 3] is [1/4, 3/4]; weights [3, 1] make it [1/2, 1/2]
    teacher = torch.tensor([[0.0, 2 * math.log(3)]])
    student = torch.zeros(1, 2)
    assert torch.allclose(balanced_kd(student, teacher, torch.tensor([3.0, 1.0]), 2.0), torch.tensor(math.log(2)))
    # unit weights: plain KD -(1/4 ln 1/2 + 3/4 ln 1/2) = ln 2 as well; with a student [ln 3, 0]:
    s = torch.tensor([[math.log(3), 0.0]])  # log_softmax(s / 2) = ln([sqrt3, 1] / (sqrt3 + 1))
    z = math.sqrt(3) + 1
    want = -(0.25 * math.log(math.sqrt(3) / z) + 0.75 * math.log(1 / z))
    assert torch.allclose(balanced_kd(s, teacher, torch.ones(2), 2.0), torch.tensor(want))
    assert torch.allclose(softmax_kd(s, teacher, 2.0), torch.tensor(want))
    # averaged over the batch, summed over the classes
    two = balanced_kd(torch.cat([student, s]), teacher.repeat(2, 1), torch.tensor([3.0, 1.0]), 2.0)
    w_target = torch.tensor([0.5, 0.5])
    want2 = (math.log(2) - float((w_target * torch.log_softmax(s / 2, 1)).sum())) / 2
    assert torch.allclose(two, torch.tensor(want2))


def test_weight_align_scales_the_new_rows_to_the_old_norm():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert weight_align(w, 1) == pytest.approx(5.0)
    assert torch.equal(w, torch.tensor([[3.0, 4.0], [0.0, 5.0]]))
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert weight_align(w, 1, value=2.0) == pytest.approx(10.0)  # gamma * value ** (1 old / 1 new)


def _learner(tmp_path, **over):
    return make_learner(tmp_path, "foster", {**FAST, **over})


def test_one_extractor_after_every_task_and_two_only_while_boosting(tmp_path):
    learner, sc = _learner(tmp_path)
    run_task(learner, sc.tasks[0])
    assert extractors(learner) == 1 and learner.inference_cost()["backbone_passes"] == 1
    for task in sc.tasks[1:3]:
        learner.before_task(task)
        assert extractors(learner) == 3  # the kept (student) one + the boosted model's old and new
        assert learner.inference_cost()["backbone_passes"] == 2
        learner.train_task(task)
        learner.after_task(task)
        assert learner.boost is None
        assert extractors(learner) == 1 and learner.inference_cost()["backbone_passes"] == 1
        assert learner.head.weight.shape == (task.end, learner.feature_dim)
        assert torch.bincount(learner.memory.labels).tolist() == [2] * task.end
        assert learner.nme_means.shape == (task.end, learner.feature_dim)
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            assert learner.predict(x).shape == (3, task.end)


def test_boosted_model_is_built_from_the_kept_one(tmp_path):
    learner, sc = _learner(tmp_path)
    run_task(learner, sc.tasks[0])
    kept_bb, kept_w, kept_b = state_copy(learner.backbone), learner.head.weight.clone(), learner.head.bias.clone()
    task = sc.tasks[1]
    learner.before_task(task)
    boost, k, d = learner.boost, task.start, learner.feature_dim
    assert same(kept_bb, boost.old_backbone.state_dict()) and same(kept_bb, boost.new_backbone.state_dict())
    assert not any(p.requires_grad for p in boost.old_backbone.parameters())
    assert not any(p.requires_grad for p in boost.oldfc.parameters())
    assert all(p.requires_grad for p in boost.trainable())
    assert boost.fc.weight.shape == (task.end, 2 * d) and boost.fe_fc.weight.shape == (task.end, d)
    assert torch.equal(boost.fc.weight[:k, :d], kept_w) and torch.equal(boost.fc.bias[:k], kept_b)
    assert torch.equal(boost.oldfc.weight, kept_w)
    # the student's head keeps the old rows (PILOT copy_fc(oldfc)) and grows by the new classes
    assert learner.head.weight.shape == (task.end, d) and torch.equal(learner.head.weight[:k], kept_w)
    # train mode leaves the frozen old extractor in eval mode; compression keeps the teacher in eval
    learner.train()
    assert not boost.old_backbone.training and boost.new_backbone.training and learner.backbone.training
    learner.compressing = True
    learner.train()
    assert not boost.training and not any(m.training for m in boost.modules())
    assert learner.backbone.training and learner.head.training


def test_boosting_loss_matches_pilots_three_terms(tmp_path):
    learner, sc = _learner(tmp_path)
    run_task(learner, sc.tasks[0])
    task = sc.tasks[1]
    learner.before_task(task)
    learner.weights = torch.tensor([1.5, 0.5, 1.2, 0.8])
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([task.start, task.start + 1, 0, 1])
    learner.eval()
    out = learner.boost(x)
    with torch.no_grad():
        old = learner.head(learner.backbone(x))[:, : task.start]  # the old model's logits
    assert torch.allclose(out.old_logits, old, atol=1e-6)
    want = (F.cross_entropy(out.logits / learner.weights, y) + F.cross_entropy(out.fe_logits, y)
            + softmax_kd(out.logits[:, : task.start], old, 2.0))
    assert torch.allclose(learner.boosting_loss(x, y, task), want, atol=1e-6)
    learner.cfg.lambda_okd = 0.0
    want0 = F.cross_entropy(out.logits / learner.weights, y) + F.cross_entropy(out.fe_logits, y)
    assert torch.allclose(learner.boosting_loss(x, y, task), want0, atol=1e-6)


@pytest.mark.parametrize("oofc", ["ft", "az"])
def test_boosting_trains_the_new_extractor_only_and_compression_the_student_only(tmp_path, oofc):
    learner, sc = _learner(tmp_path, **{"method.oofc": oofc})
    run_task(learner, sc.tasks[0])
    task = sc.tasks[1]
    learner.before_task(task)
    boost = learner.boost
    old_bb, new_bb = state_copy(boost.old_backbone), state_copy(boost.new_backbone)
    student_bb, student_head, oldfc = state_copy(learner.backbone), state_copy(learner.head), state_copy(boost.oldfc)
    learner.to(learner.device)
    learner.boosting(task)
    # boosting: the old extractor and head are frozen, the kept (student) model untouched
    assert same(old_bb, boost.old_backbone.state_dict()) and same(oldfc, boost.oldfc.state_dict())
    assert same(student_bb, learner.backbone.state_dict()) and same(student_head, learner.head.state_dict())
    assert not same(new_bb, boost.new_backbone.state_dict())
    assert all(p.grad is None for p in boost.old_backbone.parameters())
    counts = torch.tensor([2] * task.start + [6] * task.num_new)  # exemplars, then training images
    assert torch.equal(learner.class_counts(task), counts)
    block = boost.fc.weight[task.start:, : learner.feature_dim]
    assert (block.abs().sum() == 0) == (oofc == "az")
    teacher = state_copy(boost)
    learner.compression(task)
    assert torch.allclose(learner.weights, class_balanced_weights(counts, 0.97))
    assert same(teacher, boost.state_dict())  # the teacher is frozen during compression
    assert not same(student_bb, learner.backbone.state_dict())


def test_resume_rebuilds_the_boosted_model_and_matches_the_full_run(tmp_path):
    over = tiny_overrides("foster", **FAST, **{"scenario.increment": 4})  # 3 tasks: 2, 4, 4 classes
    assert_resume_matches_full(over, tmp_path, ("accuracy_matrix", "avg_acc", "last_acc", "class_order"))


def test_checkpoint_holds_one_extractor_and_loads_after_replayed_before_tasks(tmp_path):
    learner, sc = _learner(tmp_path)
    for task in sc.tasks[:2]:
        run_task(learner, task)
    ckpt = learner.checkpoint_state()
    assert sum(k.endswith(EXTRACTOR_KEY) for k in ckpt) == 1 and not any(k.startswith("boost.") for k in ckpt)
    fresh, _ = _learner(tmp_path)
    for task in sc.tasks[:2]:
        fresh.before_task(task)  # the replay builds a boosted model for task 1 ...
    assert fresh.boost is not None
    fresh.load_checkpoint_state(ckpt)  # ... which a finished task's checkpoint drops
    assert fresh.boost is None and extractors(fresh) == 1
    x = torch.randn(3, 3, 32, 32)
    learner.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x), learner.predict(x), rtol=0, atol=0)


def test_defaults_are_pilots_and_bad_options_are_one_line_errors():
    cfg = build_config(None, ["method.name=foster"]).method
    assert (cfg.beta1, cfg.beta2, cfg.T, cfg.lambda_okd, cfg.oofc) == (0.96, 0.97, 2.0, 1.0, "ft")
    assert (cfg.fixed_memory, cfg.memory_per_class, cfg.epochs, cfg.compression_epochs) == (True, 20, 20, 20)
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.scheduler) == (1e-3, 32, 5e-4, "cosine")
    with pytest.raises(ConfigError, match="oofc"):
        build_config(None, ["method.name=foster", "method.oofc=zero"])
    with pytest.raises(ConfigError, match="beta1"):
        build_config(None, ["method.name=foster", "method.beta1=1"])


def test_frozen_old_cnn_extractor_keeps_its_batchnorm_statistics(tmp_path):
    """A CNN's old extractor stays in eval mode while boosting: its BatchNorm running statistics
    do not move (PILOT ``Learner.train``: ``backbones[0].eval()``)."""
    vit_learner, sc = _learner(tmp_path)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    cnn = Backbone(net, "cnn_test", 8, Preprocess(32, (0.5,) * 3, (0.5,) * 3), kind="cnn")
    learner = type(vit_learner)(vit_learner.cfg, cnn, vit_learner.ctx)
    run_task(learner, sc.tasks[0])
    task = sc.tasks[1]
    learner.before_task(task)
    learner.to(learner.device)
    old_bn, new_bn = learner.boost.old_backbone.model[1], learner.boost.new_backbone.model[1]
    before = old_bn.running_mean.clone()
    assert torch.equal(new_bn.running_mean, before)
    learner.boosting(task)
    tracked = learner.backbone.model[1].num_batches_tracked.item()  # the task-0 training's batches
    assert torch.equal(old_bn.running_mean, before) and old_bn.num_batches_tracked.item() == tracked
    assert not torch.equal(new_bn.running_mean, before)

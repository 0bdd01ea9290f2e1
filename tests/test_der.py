"""DER (ptcl.methods.der): extractor growth, freezing, auxiliary targets, resume."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import (
    assert_resume_matches_full,
    make_learner,
    run_task,
    state_copy,
    tiny_overrides,
    train_batch,
)

import ptcl.methods.der  # noqa: F401  (registers "der" until ptcl.methods imports it)
from ptcl.heads.linear import IncrementalLinear, expand_linear, weight_align
from ptcl.methods.der import DER, aux_targets

FAST = {"method.epochs": 1, "method.init_epochs": 1, "method.batch_size": 8, "method.fixed_memory": True,
        "method.memory_per_class": 2}
WIDTH = 32  # vit_tiny_test's feature width


def make(tmp_path, **extra) -> tuple[DER, object]:
    learner, sc = make_learner(tmp_path, "der", {**FAST, **extra})
    assert isinstance(learner, DER)
    return learner, sc


def test_aux_targets_old_classes_to_zero_new_class_c_to_c_minus_known_plus_one():
    y = torch.tensor([0, 1, 3, 4, 5, 7])
    assert aux_targets(y, 4).tolist() == [0, 0, 0, 1, 2, 4]
    assert aux_targets(y, 0).tolist() == [1, 2, 4, 5, 6, 8]


def test_feature_width_grows_by_one_extractor_per_task(tmp_path):
    learner, sc = make(tmp_path)
    x, _ = train_batch(learner, range(2), 4)
    for t, task in enumerate(sc.tasks[:3]):
        learner.before_task(task)
        assert len(learner.all_extractors()) == t + 1 and len(learner.extractors) == t
        assert learner.feature_dim == WIDTH * (t + 1)
        assert learner.head.weight.shape == (task.end, WIDTH * (t + 1))
        with torch.no_grad():
            assert learner.embed(x).shape == (4, WIDTH * (t + 1))
            assert learner.cnn_logits(x).shape == (4, task.end)
        if t == 0:
            assert learner.aux_head is None
        else:  # the new extractor's features -> the new classes + one "old" class
            assert learner.aux_head.weight.shape == (task.num_new + 1, WIDTH)
        assert learner.inference_cost()["backbone_passes"] == t + 1


def test_new_extractor_copies_previous_and_head_keeps_old_block(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    old_w, old_b = learner.head.weight.detach().clone(), learner.head.bias.detach().clone()
    learner.before_task(sc.tasks[1])
    new = learner.extractors[0]
    assert new is not learner.backbone
    for k, v in learner.backbone.state_dict().items():
        assert torch.equal(v, new.state_dict()[k]), k
    torch.testing.assert_close(learner.head.weight[:2, :WIDTH], old_w, rtol=0, atol=0)
    torch.testing.assert_close(learner.head.bias[:2], old_b, rtol=0, atol=0)
    assert torch.all(learner.head.bias[2:] == 0)  # PILOT SimpleLinear: zero bias
    # the third extractor copies the second (trained in task 1), not the first
    learner.train_task(sc.tasks[1])
    learner.before_task(sc.tasks[2])
    second, third = learner.extractors
    assert all(torch.equal(v, third.state_dict()[k]) for k, v in second.state_dict().items())
    assert not all(torch.equal(v, third.state_dict()[k]) for k, v in learner.backbone.state_dict().items())


def test_old_extractors_frozen_no_gradient_eval_mode_and_bit_identical(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    task = sc.tasks[1]
    learner.before_task(task)
    old = state_copy(learner.backbone)
    assert not any(p.requires_grad or p.grad is not None for p in learner.backbone.parameters())
    assert all(p.requires_grad for p in learner.extractors[0].parameters())
    learner.train()
    assert learner.training and not learner.backbone.training and learner.extractors[0].training
    # a training step's gradient reaches the new extractor and the heads only
    x, y = train_batch(learner, task.classes)
    learner.zero_grad(set_to_none=True)
    learner.loss(x, y, task).backward()
    assert all(p.grad is None for p in learner.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.extractors[0].parameters())
    assert learner.aux_head.weight.grad is not None and learner.head.weight.grad is not None
    learner.zero_grad(set_to_none=True)
    new_before = state_copy(learner.extractors[0])
    learner.train_task(task)
    learner.after_task(task)
    after = learner.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in old.items())
    assert any(not torch.equal(v, learner.extractors[0].state_dict()[k]) for k, v in new_before.items())


def test_batchnorm_statistics_of_old_cnn_extractor_stay(tmp_path):
    learner, sc = make(tmp_path, **{"backbone.name": "efficientnet_lite0", "backbone.pretrained": False,
                                    "backbone.image_size": 32})
    run_task(learner, sc.tasks[0])
    learner.before_task(sc.tasks[1])
    old = state_copy(learner.backbone)
    assert any("running_mean" in k for k in old)
    learner.train_task(sc.tasks[1])
    after = learner.backbone.state_dict()
    changed = [k for k, v in old.items() if not torch.equal(v, after[k])]
    assert not changed, changed[:3]
    stats = [k for k in old if "running_mean" in k]  # the new extractor's statistics did move
    assert any(not torch.equal(old[k], learner.extractors[0].state_dict()[k]) for k in stats)


def test_loss_is_head_ce_plus_weighted_aux_ce(tmp_path):
    learner, sc = make(tmp_path, **{"method.aux_weight": 0.5})
    learner.before_task(sc.tasks[0])
    learner.before_task(sc.tasks[1])
    task = sc.tasks[1]
    x, y = train_batch(learner, range(task.end))
    learner.eval()
    with torch.no_grad():
        feats = learner.features_per_extractor(x)
        expect = F.cross_entropy(learner.head(torch.cat(feats, 1)), y)
        expect = expect + 0.5 * F.cross_entropy(learner.aux_head(feats[-1]), aux_targets(y, task.start))
        torch.testing.assert_close(learner.loss(x, y, task), expect)
        # the first task: the head's cross-entropy only
        first, _ = make(tmp_path)
        first.before_task(sc.tasks[0])
        first.eval()
        x0, y0 = train_batch(first, range(2))
        torch.testing.assert_close(first.loss(x0, y0, sc.tasks[0]), F.cross_entropy(first.cnn_logits(x0), y0))


def test_weight_align_and_expand_linear():
    head = expand_linear(None, 4, 2)
    head = expand_linear(head, 6, 5)
    assert head.weight.shape == (5, 6) and head.bias.shape == (5,)
    with torch.no_grad():
        head.weight[3:] *= 7
    gamma = weight_align(head.weight, 2)
    norms = head.weight.norm(dim=1)
    torch.testing.assert_close(norms[3:].mean(), norms[:3].mean())
    assert gamma < 1
    assert isinstance(head, IncrementalLinear)


def test_checkpoint_replay_rebuilds_same_module_tree(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:3]:
        run_task(learner, task)
    saved = learner.checkpoint_state()
    fresh, _ = make(tmp_path)
    for task in sc.tasks[:3]:
        fresh.before_task(task)  # replayed structure growth, as --resume does
    got = fresh.state_dict()
    assert list(got) == list(saved)
    # same shapes, except the memory's and the NME means' (they load whatever size was saved)
    grown = [k for k, v in saved.items() if got[k].shape != v.shape]
    assert all(k.startswith(("memory.", "nme_means")) for k in grown), grown
    fresh.load_checkpoint_state(saved)
    # the replayed old extractors are frozen as in the uninterrupted run
    for a, b in zip(learner.all_extractors(), fresh.all_extractors(), strict=True):
        assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    x, _ = train_batch(learner, range(6), 6)
    learner.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x), learner.predict(x), rtol=0, atol=0)
        torch.testing.assert_close(fresh.nme_logits(x), learner.nme_logits(x), rtol=0, atol=0)


def test_resume_after_task_2_gives_identical_metrics(tmp_path):
    over = tiny_overrides("der", **FAST, **{"scenario.increment": 4})  # 3 tasks: 2, 4, 4 classes
    assert_resume_matches_full(over, tmp_path, ("accuracy_matrix", "avg_acc", "last_acc", "class_order"))


def test_weight_align_option_rescales_new_rows_after_training(tmp_path):
    learner, sc = make(tmp_path, **{"method.weight_align": True})
    run_task(learner, sc.tasks[0])
    first = learner.head.weight.detach().clone()
    run_task(learner, sc.tasks[1])
    norms = learner.head.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms[2:].mean(), norms[:2].mean())
    assert learner.head.weight.shape == (4, 2 * WIDTH) and not torch.equal(first, learner.head.weight[:2, :WIDTH])

"""iCaRL: the distillation target is the teacher's sigmoid output, NME over exemplar means,
both CNN and NME accuracy recorded, the memory budget kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner, run_task, tiny_overrides

import ptcl
from ptcl.config import build_config
from ptcl.errors import ConfigError
from ptcl.methods.icarl import bce_targets
from ptcl.methods.rehearsal import softmax_kd


def test_bce_targets_are_one_hot_with_the_teachers_sigmoid_for_old_classes():
    y = torch.tensor([3, 0])
    old = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    t = bce_targets(y, old, 4)
    s = torch.sigmoid(old)
    assert torch.equal(t, torch.tensor([[s[0, 0], s[0, 1], 0.0, 1.0], [s[1, 0], s[1, 1], 0.0, 0.0]]))
    # an exemplar of old class 0 keeps the teacher's sigmoid, not its one-hot label
    assert t[1, 0] != 1.0
    assert torch.equal(bce_targets(y, None, 4), F.one_hot(y, 4).float())


def test_softmax_kd_matches_the_hand_formula():
    a, b = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    p = torch.softmax(b / 2, 1)
    want = -(p * torch.log_softmax(a / 2, 1)).sum()
    assert torch.allclose(softmax_kd(a, b, 2.0), want)


def _after_first_task(tmp_path, **over):
    learner, sc = make_learner(tmp_path, "icarl", {"method.epochs": 1, "method.init_epochs": 1,
                                                   "method.batch_size": 8, "method.fixed_memory": True,
                                                   "method.memory_per_class": 2, **over})
    run_task(learner, sc.tasks[0])
    return learner, sc


@pytest.mark.parametrize("loss", ["bce", "ce_kd"])
def test_second_task_loss_distils_from_the_frozen_previous_model(tmp_path, loss):
    learner, sc = _after_first_task(tmp_path, **{"method.loss": loss})
    x = torch.randn(4, 3, 32, 32)
    learner.eval()
    with torch.no_grad():
        before = learner.cnn_logits(x)
    task = sc.tasks[1]
    learner.before_task(task)
    assert learner.teacher is not None
    with torch.no_grad():
        old = learner.teacher.module.cnn_logits(x)
    assert torch.equal(old, before)  # the teacher is the model after task 0 (old classes only)
    y = torch.tensor([task.start, task.start + 1, 0, 1])
    logits = learner.cnn_logits(x)
    got = learner.loss(x, y, task)
    if loss == "bce":
        target = F.one_hot(y, task.end).float()
        target[:, : task.start] = torch.sigmoid(old)
        want = F.binary_cross_entropy_with_logits(logits, target)
    else:
        want = F.cross_entropy(logits, y) + softmax_kd(logits[:, : task.start], old, 2.0)
    assert torch.allclose(got, want, atol=1e-6)
    got.backward()
    assert all(p.grad is None for p in learner.teacher.module.parameters())  # the teacher is never trained


def test_first_task_has_no_teacher_and_plain_targets(tmp_path):
    learner, sc = make_learner(tmp_path, "icarl")
    learner.before_task(sc.tasks[0])
    assert learner.teacher is None
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 0])
    want = F.binary_cross_entropy_with_logits(learner.cnn_logits(x), F.one_hot(y, 2).float())
    assert torch.allclose(learner.loss(x, y, sc.tasks[0]), want)


def test_nme_means_are_normalised_exemplar_means_and_nme_predicts_the_nearest(tmp_path):
    learner, sc = _after_first_task(tmp_path)
    learner.eval()
    data = learner.ctx.data
    pos = learner.memory.positions.numpy()
    x = torch.stack([data.images_at("train", pos)[i][0] for i in range(len(pos))])
    with torch.no_grad():
        f = F.normalize(learner.embed(x), dim=1)
    for c in range(sc.tasks[0].end):
        rows = f[learner.memory.labels == c]
        assert len(rows) == 2
        assert torch.allclose(learner.nme_means[c], F.normalize(rows.mean(0), dim=0), atol=1e-5)
    with torch.no_grad():
        pred = learner.predict(x).argmax(1)
        nearest = torch.cdist(f, learner.nme_means).argmin(1)
    assert torch.equal(pred, nearest)


@pytest.mark.parametrize("fixed", [True, False])
def test_memory_budget_after_every_task(tmp_path, fixed):
    over = {"method.fixed_memory": fixed, "method.memory_per_class": 3, "method.memory_size": 10,
            "method.epochs": 1, "method.init_epochs": 1, "method.batch_size": 8}
    learner, sc = make_learner(tmp_path, "icarl", over)
    for task in sc.tasks[:3]:
        run_task(learner, task)
        counts = torch.bincount(learner.memory.labels, minlength=task.end)
        want = 3 if fixed else 10 // task.end
        assert counts.tolist() == [want] * task.end
        assert learner.nme_means.shape == (task.end, learner.feature_dim)


def test_run_records_cnn_and_nme_accuracy(tmp_path):
    m = ptcl.run(None, tiny_overrides("icarl", **{"method.epochs": 1, "method.init_epochs": 1,
                                                  "method.batch_size": 8}), out=tmp_path / "r", quiet=True)
    assert set(m["variants"]) == {"cnn"}
    assert len(m["variants"]["cnn"]["accuracy_per_task"]) == m["num_tasks"]
    for r in m["rows"]:
        v = r["variants"]["cnn"]
        assert set(v) == {"accuracy", "accuracy_row", "old_acc", "new_acc"}
    m2 = ptcl.run(None, tiny_overrides("icarl", **{"method.epochs": 1, "method.init_epochs": 1,
                                                   "method.batch_size": 8, "method.classifier": "cnn"}),
                  out=tmp_path / "c", quiet=True)
    # the same training: the CNN accuracy of one run is the reported accuracy of the other
    assert m2["accuracy_per_task"] == m["variants"]["cnn"]["accuracy_per_task"]
    assert m2["variants"]["nme"]["accuracy_per_task"] == m["accuracy_per_task"]


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="loss"):
        build_config(None, ["method.name=icarl", "method.loss=kl"])
    with pytest.raises(ConfigError, match="memory_size"):
        build_config(None, ["method.name=icarl", "method.memory_size=0"])


def test_a_total_memory_smaller_than_the_classes_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"memory_size=3 keeps no exemplar per class once all 10 classes"):
        make_learner(tmp_path, "icarl", {"method.memory_size": 3})

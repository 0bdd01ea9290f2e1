"""The teacher snapshot: frozen, shares the pre-trained weights, outside the learner's
state, without the run context, and rebuilt identically after a resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_overrides
from test_determinism import assert_same_tensors, checkpoint

from ptcl.config import TrainConfig
from ptcl.engine.runner import run
from ptcl.heads.linear import IncrementalLinear
from ptcl.methods.base import IMAGES, Learner
from ptcl.registry import METHODS
from ptcl.train.snapshot import Snapshot

NAME = "kd_test"


@dataclass
class KDConfig(TrainConfig):
    name: str = NAME
    epochs: int = 2
    batch_size: int = 8
    temperature: float = 2.0


class KD(Learner):
    """A minimal LwF-style learner: the previous model is the teacher of the old logits."""

    config_cls = KDConfig
    inputs = IMAGES

    def __init__(self, cfg, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        self.head = IncrementalLinear(backbone.feature_dim)
        self.teacher: Snapshot | None = None

    def before_task(self, task) -> None:
        self.teacher = Snapshot(self) if task.index > 0 else None  # the model after task - 1
        self.head.grow(task.num_new)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train_task(self, task) -> None:
        T = self.cfg.temperature

        def step(x, y):
            logits = self.predict(x)
            loss = F.cross_entropy(logits, y)
            if self.teacher is not None:
                old = self.teacher.module.predict(x)
                loss = loss + F.kl_div(F.log_softmax(logits[:, : task.start] / T, 1),
                                       F.softmax(old / T, 1), reduction="batchmean")
            return loss

        data = self.ctx.data.images("train", task.classes, train_transform=True)
        self.fit(data, step, self.head.parameters(), desc=f"task {task.index}", seed=task.index)


@pytest.fixture
def kd_method():
    METHODS.register(NAME)(KD)
    yield NAME
    METHODS._items.pop(NAME)


def test_snapshot_shares_frozen_weights_and_stays_out_of_the_state(tmp_path, kd_method):
    from helpers import make_learner

    learner, sc = make_learner(tmp_path, NAME)
    learner.before_task(sc.tasks[0])
    learner.train_task(sc.tasks[0])
    learner.before_task(sc.tasks[1])
    teacher = learner.teacher
    assert teacher is not None and teacher.module.ctx is None and learner.ctx is not None
    assert not any("teacher" in k for k in learner.state_dict())
    shared = {p.data_ptr() for p in learner.backbone.parameters()}
    assert {p.data_ptr() for p in teacher.module.backbone.parameters()} == shared  # no second copy
    assert teacher.module.head.weight.data_ptr() != learner.head.weight.data_ptr()
    assert not any(p.requires_grad for p in teacher.module.parameters())
    before = teacher.module.head.weight.clone()
    learner.train_task(sc.tasks[1])
    assert torch.equal(teacher.module.head.weight, before)  # the teacher does not train
    assert learner.head.weight.shape[0] == 4 and before.shape[0] == 2


def test_snapshot_copies_a_trained_backbone(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    snap = Snapshot(net)
    assert snap.shared == 0 and snap.module[0].weight.data_ptr() != net[0].weight.data_ptr()
    x = torch.randn(2, 3)
    torch.testing.assert_close(snap(x), net(x))


def test_resumed_run_rebuilds_the_teacher(tmp_path, kd_method):
    over = [*tiny_overrides(NAME), "scenario.init_cls=4", "scenario.increment=3"]
    full = run(None, over, out=tmp_path / "full", quiet=True)
    run(None, over, out=tmp_path / "part", quiet=True, max_tasks=1)
    resumed = run(resume=tmp_path / "part", quiet=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    last = full["num_tasks"] - 1
    assert_same_tensors(checkpoint(Path(full["run_dir"]), last), checkpoint(tmp_path / "part", last),
                        "KD with a teacher: resumed vs uninterrupted")

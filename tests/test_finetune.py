"""finetune's PILOT option: old-class logits masked from the second task on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner

from ptcl.config import build_config
from ptcl.errors import ConfigError


@pytest.mark.parametrize("mask", [False, True])
def test_mask_old_logits_loss(tmp_path, mask):
    learner, sc = make_learner(tmp_path, "finetune", {"method.mask_old_logits": mask})
    for t in sc.tasks[:2]:
        learner.before_task(t)
    task = sc.tasks[1]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([task.start, task.start + 1, task.start, task.start + 1])
    loss = learner.loss(x, y, task)
    logits = learner.predict(x)
    want = F.cross_entropy(logits[:, task.start:], y - task.start) if mask else F.cross_entropy(logits, y)
    assert torch.allclose(loss, want)
    learner.head.zero_grad(set_to_none=True)
    loss.backward()
    old_rows = torch.cat([learner.head.weight.grad[:task.start].flatten(), learner.head.bias.grad[:task.start]])
    # masked: the old classes' head rows get no gradient; unmasked they are pushed down
    assert (old_rows.abs().sum() == 0) == mask
    first = learner.loss(x, torch.zeros(4, dtype=torch.long), sc.tasks[0])
    assert torch.allclose(first, F.cross_entropy(learner.predict(x), torch.zeros(4, dtype=torch.long)))


def test_joint_rejects_mask_old_logits():
    with pytest.raises(ConfigError, match="mask_old_logits"):
        build_config(None, ["method.name=joint", "method.mask_old_logits=true"])

"""The shared train loop: gradient clipping is applied to every step when configured."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ptcl.config import TrainConfig
from ptcl.errors import ConfigError
from ptcl.train.loop import fit


def one_step(clip: float | None) -> torch.Tensor:
    module = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(module.weight)
    loader = DataLoader(TensorDataset(torch.ones(1, 4), torch.zeros(1)), batch_size=1)
    cfg = TrainConfig(epochs=1, lr=1.0, momentum=0.0, scheduler="constant", clip_grad=clip)
    fit(module, loader, lambda x, y: 10.0 * module(x).sum(), module.parameters(), cfg, torch.device("cpu"), quiet=True)
    return module.weight.detach()


def test_clip_grad_bounds_the_step_norm():
    torch.testing.assert_close(one_step(0.5).norm(), torch.tensor(0.5))  # gradient norm 20 -> 0.5
    torch.testing.assert_close(one_step(None).norm(), torch.tensor(20.0))


def test_clip_grad_must_be_positive():
    with pytest.raises(ConfigError, match="clip_grad"):
        TrainConfig(clip_grad=0.0)

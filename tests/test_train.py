"""The shared train loop: gradient clipping is applied to every step when configured; the
lr schedules (CODA-Prompt's official cosine); an optimiser (state) kept across fits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ptcl.config import TrainConfig
from ptcl.errors import ConfigError
from ptcl.train.callbacks import Callback
from ptcl.train.loop import fit
from ptcl.train.optim import OptimizerMemory, coda_cosine, make_optimizer

CPU = torch.device("cpu")


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


# -- lr schedules ---------------------------------------------------------------------------
def epoch_lrs(scheduler: str, epochs: int, lr: float = 0.1) -> list[float]:
    """The lr of each epoch's steps (two steps per epoch) under ``scheduler``."""
    module = torch.nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.ones(4, 2), torch.zeros(4)), batch_size=2)
    seen: list[list[float]] = []

    class Spy(Callback):
        def on_epoch_start(self, state):
            seen.append([])

        def after_backward(self, state):
            seen[-1].append(state.optimizer.param_groups[0]["lr"])

    cfg = TrainConfig(epochs=epochs, lr=lr, scheduler=scheduler)
    fit(module, loader, lambda x, y: module(x).sum(), module.parameters(), cfg, CPU, quiet=True, callbacks=[Spy()])
    assert all(len(set(e)) == 1 for e in seen)  # stepped per epoch, not per step
    return [e[0] for e in seen]


@pytest.mark.parametrize("epochs", [2, 5, 20])
def test_coda_cosine_is_the_official_cosine_schedule(epochs):
    """GT-RIPL/CODA-Prompt utils/schedulers.py: lr_e = lr cos(99 pi e / (200 (K - 1)))."""
    got = epoch_lrs("coda_cosine", epochs)
    official = [0.1 * math.cos(99 * math.pi * e / (200 * (epochs - 1))) for e in range(epochs)]
    assert got == pytest.approx(official, rel=1e-12)
    assert got[0] == 0.1 and got[-1] == pytest.approx(0.1 * math.cos(0.495 * math.pi))
    plain = epoch_lrs("cosine", epochs)
    assert plain[0] == got[0] and all(abs(a - b) > 1e-4 for a, b in zip(plain[1:], got[1:], strict=True))
    if epochs == 20:
        assert sum(got) / sum(plain) == pytest.approx(1.211, abs=1e-3)  # the issue's ~20% more lr


def test_coda_cosine_with_one_epoch_keeps_the_lr():
    assert epoch_lrs("coda_cosine", 1) == [0.1]
    assert coda_cosine(7, 5) == coda_cosine(4, 5)  # held after the last epoch


# -- an optimiser kept across fits ------------------------------------------------------------
def sgd_fit(params, module: torch.nn.Module, cfg: TrainConfig) -> list[float]:
    """One batch per epoch; returns the lr at the start of each epoch."""
    loader = DataLoader(TensorDataset(torch.ones(2, 3), torch.zeros(2)), batch_size=2)
    lrs: list[float] = []

    class Spy(Callback):
        def on_epoch_start(self, state):
            lrs.append(state.optimizer.param_groups[0]["lr"])

    fit(module, loader, lambda x, y: module(x).pow(2).sum(), params, cfg, CPU, quiet=True, callbacks=[Spy()])
    return lrs


def test_fit_with_an_existing_optimizer_keeps_its_momentum():
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.9, scheduler="constant")
    module = torch.nn.Linear(3, 1, bias=False)
    opt = make_optimizer(module.parameters(), cfg)
    sgd_fit(opt, module, cfg)
    buf = opt.state[module.weight]["momentum_buffer"].clone()
    w = module.weight.detach().clone()
    fresh = copy.deepcopy(module)
    sgd_fit(fresh.parameters(), fresh, cfg)  # a new optimiser: its momentum starts at zero
    sgd_fit(opt, module, cfg)
    grad = 2 * 2 * (w @ torch.ones(3)) * torch.ones(1, 3)  # d/dw sum_i (w x_i)^2 over two x = 1
    torch.testing.assert_close(fresh.weight.detach(), w - 0.1 * grad)
    torch.testing.assert_close(module.weight.detach(), w - 0.1 * (0.9 * buf + grad))


def test_fit_with_an_existing_optimizer_restarts_the_schedule():
    cfg = TrainConfig(epochs=2, lr=0.1, momentum=0.9, scheduler="coda_cosine")
    module = torch.nn.Linear(3, 1)
    opt = make_optimizer(module.parameters(), cfg)
    first = sgd_fit(opt, module, cfg)
    assert opt.param_groups[0]["lr"] < 0.1  # annealed at the end of the first fit
    assert sgd_fit(opt, module, cfg) == first == [0.1, pytest.approx(0.1 * math.cos(0.495 * math.pi))]


def test_optimizer_memory_carries_state_by_name_and_pads_grown_rows():
    cfg = TrainConfig(optimizer="adam", amsgrad=True, lr=0.01, epochs=1)
    memory = OptimizerMemory()
    head = torch.nn.Parameter(torch.randn(2, 3))
    other = torch.nn.Parameter(torch.randn(3))
    opt = memory.optimizer([("head", head), ("other", other)], cfg)
    (head.sum() * 2 + other.sum()).backward()
    opt.step()
    memory.remember(opt)
    assert set(memory.state) == {"head", "other"}
    assert set(memory.state["head"]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    grown = torch.nn.Parameter(torch.cat([head.detach(), torch.randn(2, 3)]))  # a head that grew by 2 rows
    opt2 = memory.optimizer([("head", grown)], cfg)
    st = opt2.state[grown]
    assert float(st["step"]) == 1.0
    torch.testing.assert_close(st["exp_avg"][:2], opt.state[head]["exp_avg"])
    assert torch.equal(st["exp_avg"][2:], torch.zeros(2, 3)) and torch.equal(st["max_exp_avg_sq"][2:], torch.zeros(2, 3))
    # the state survives a state_dict round trip (a checkpoint) into a fresh memory
    owner = torch.nn.Module()
    owner.memory = memory
    sd = owner.state_dict()
    assert {"memory.head.exp_avg", "memory.other.step"} <= set(sd)
    restored = torch.nn.Module()
    restored.memory = OptimizerMemory()
    assert restored.load_state_dict(sd, strict=True) is not None
    assert restored.memory.state.keys() == memory.state.keys()
    for k, v in memory.state["head"].items():
        assert torch.equal(restored.memory.state["head"][k], v)
    with pytest.raises(ValueError, match="does not fit"):
        memory.optimizer([("head", torch.nn.Parameter(torch.randn(2, 4)))], cfg)

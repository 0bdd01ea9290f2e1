"""Per-step and per-epoch hooks of the one train loop (:func:`~ptcl.train.fit`).

A method that needs to act inside training (merge weights after every optimiser step,
update an EMA copy, log a statistic) passes :class:`Callback` s instead of counting steps
inside its loss. Each hook gets the loop's :class:`LoopState`. When each fires:

``on_epoch_start``
    before the first batch of an epoch;
``after_backward``
    after ``loss.backward()``, before gradient clipping and the optimiser step
    (gradients are in ``.grad``);
``after_step``
    after the optimiser step and the per-step lr update;
``on_epoch_end``
    after the epoch's last step and the per-epoch lr update (``state.epoch_loss`` set).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LoopState:
    """Where the loop is: ``epoch`` and ``step`` (within the epoch) count from 0."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    global_step: int
    optimizer: torch.optim.Optimizer
    loss: float = float("nan")  # the current step's loss
    epoch_loss: float = float("nan")  # mean loss of the finished epoch
    desc: str = ""  # the fit's description (``fit(desc=...)``, e.g. ``task 1``)


class Callback:
    """Base class: override the hooks you need (see the module docstring)."""

    def on_epoch_start(self, state: LoopState) -> None:
        pass

    def after_backward(self, state: LoopState) -> None:
        pass

    def after_step(self, state: LoopState) -> None:
        pass

    def on_epoch_end(self, state: LoopState) -> None:
        pass


class EpochEnd(Callback):
    """``fn(state, lr, seconds)`` after every epoch: ``lr`` is the first parameter group's
    learning rate when the epoch started (a per-epoch schedule's lr for the whole epoch, a
    per-step schedule's first), ``seconds`` the epoch's wall time (its first batch's wait
    for data included). The run's loggers watch training with it
    (:class:`ptcl.report.loggers.RunLoggers`)."""

    def __init__(self, fn: Callable[[LoopState, float, float], None]) -> None:
        self.fn = fn
        self._lr, self._t0 = float("nan"), 0.0

    def on_epoch_start(self, state: LoopState) -> None:
        self._lr = float(state.optimizer.param_groups[0]["lr"])
        self._t0 = time.perf_counter()

    def on_epoch_end(self, state: LoopState) -> None:
        self.fn(state, self._lr, time.perf_counter() - self._t0)


class AfterStep(Callback):
    """``fn(state)`` after every optimiser step."""

    def __init__(self, fn: Callable[[LoopState], None]) -> None:
        self.fn = fn

    def after_step(self, state: LoopState) -> None:
        self.fn(state)

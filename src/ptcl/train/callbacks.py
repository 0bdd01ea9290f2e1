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


class AfterStep(Callback):
    """``fn(state)`` after every optimiser step."""

    def __init__(self, fn: Callable[[LoopState], None]) -> None:
        self.fn = fn

    def after_step(self, state: LoopState) -> None:
        self.fn(state)

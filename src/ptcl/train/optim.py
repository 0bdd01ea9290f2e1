"""Optimiser and learning-rate schedule factories of the one train loop.

Optimisers (``TrainConfig.optimizer``): ``sgd`` (``momentum``, ``nesterov``), ``adam`` and
``adamw`` (``betas``, ``eps``, ``amsgrad``), all with ``weight_decay``. A parameter group
may set its own ``lr``.

Schedules (``TrainConfig.scheduler``), over the ``epochs`` of one :func:`~ptcl.train.fit`:

* ``cosine``: cosine annealing stepped once per epoch (LAMDA-PILOT's
  ``CosineAnnealingLR(T_max=epochs)``);
* ``cosine_step``: cosine annealing stepped after every optimiser step;
* ``multistep``: the lr times ``lr_decay`` at each epoch in ``milestones``;
* ``constant``.

``warmup_steps`` (not with ``cosine``) multiplies the lr by ``(step + 1) / warmup_steps``
for the first optimiser steps (linear warmup).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ptcl.config import TrainConfig

OPTIMIZERS: dict[str, Callable[[list, TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                        nesterov=c.nesterov),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay, betas=tuple(c.betas),
                                          eps=c.eps, amsgrad=c.amsgrad),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay, betas=tuple(c.betas),
                                            eps=c.eps, amsgrad=c.amsgrad),
}


def make_optimizer(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``params``: tensors or param-group dicts (a group may set its own ``lr``).

    Raises ``ValueError`` when no parameter is given."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters were given to the optimiser")
    return OPTIMIZERS[cfg.optimizer](params, cfg)


class LRSchedule:
    """The lr schedule of one :func:`~ptcl.train.fit` call; the loop calls :meth:`after_step`
    after every optimiser step and :meth:`after_epoch` after every epoch."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: TrainConfig, epochs: int, steps_per_epoch: int) -> None:
        self.opt, self.cfg = opt, cfg
        self.epochs, self.steps_per_epoch = max(epochs, 1), max(steps_per_epoch, 1)
        self.base = [g["lr"] for g in opt.param_groups]
        self.step_count = 0
        self.epoch = 0
        # PILOT's per-epoch cosine, bit for bit (torch's recursive form)
        self.torch_cosine = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
                             if cfg.scheduler == "cosine" else None)
        self._apply()

    def factor(self) -> float:
        """The lr multiplier at the current step (not for ``cosine``)."""
        cfg = self.cfg
        if cfg.scheduler == "cosine_step":
            total = self.epochs * self.steps_per_epoch
            f = 0.5 * (1 + math.cos(math.pi * min(self.step_count, total) / total))
        elif cfg.scheduler == "multistep":
            f = cfg.lr_decay ** sum(1 for m in cfg.milestones if m <= self.epoch)
        else:
            f = 1.0
        if cfg.warmup_steps and self.step_count < cfg.warmup_steps:
            f *= (self.step_count + 1) / cfg.warmup_steps
        return f

    def _apply(self) -> None:
        if self.torch_cosine is not None:
            return
        f = self.factor()
        for g, base in zip(self.opt.param_groups, self.base):
            g["lr"] = base * f

    def after_step(self) -> None:
        self.step_count += 1
        if self.cfg.scheduler in ("cosine_step",) or self.cfg.warmup_steps:
            self._apply()

    def after_epoch(self) -> None:
        self.epoch += 1
        if self.torch_cosine is not None:
            self.torch_cosine.step()
        else:
            self._apply()

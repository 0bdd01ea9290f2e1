"""Optimiser and learning-rate schedule factories of the one train loop.

Optimisers (``TrainConfig.optimizer``): ``sgd`` (``momentum``, ``nesterov``), ``adam`` and
``adamw`` (``betas``, ``eps``, ``amsgrad``), all with ``weight_decay``. A parameter group
may set its own ``lr``.

Schedules (``TrainConfig.scheduler``), over the ``epochs`` of one :func:`~ptcl.train.fit`:

* ``cosine``: cosine annealing stepped once per epoch (LAMDA-PILOT's
  ``CosineAnnealingLR(T_max=epochs)``);
* ``cosine_step``: cosine annealing stepped after every optimiser step;
* ``multistep``: the lr times ``lr_decay`` at each epoch in ``milestones``;
* ``constant``;
* ``coda_cosine``: CODA-Prompt's ``CosineSchedule`` (official GT-RIPL/CODA-Prompt
  ``utils/schedulers.py``, stepped once per epoch from the second epoch on in
  ``learners/default.py`` ``learn_batch``): in epoch ``e`` of ``K`` (from 0) the lr is
  ``lr * cos(99 pi e / (200 (K - 1)))``, from ``lr`` down to ``lr * cos(0.495 pi)`` ~
  ``0.016 lr`` in the last epoch, never 0 (:func:`coda_cosine`). Its mean over the epochs
  is higher than ``cosine``'s (K = 20: 0.636 vs 0.525 of ``lr``, +21%).

``warmup_steps`` (not with ``cosine``) multiplies the lr by ``(step + 1) / warmup_steps``
for the first optimiser steps (linear warmup).

:class:`OptimizerMemory` carries one optimiser's state (momentum, Adam moments) from one
:func:`~ptcl.train.fit` to the next (e.g. across tasks, as some official codes build their
optimiser once), also through a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

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


def coda_cosine(epoch: int, epochs: int) -> float:
    """CODA-Prompt's lr factor in epoch ``epoch`` (from 0) of ``epochs`` = K:
    ``cos(99 pi e / (200 (K - 1)))`` (official ``utils/schedulers.py`` ``CosineSchedule``),
    held at its last value after the last epoch; 1 when ``epochs == 1`` (where the official
    formula divides by zero)."""
    if epochs <= 1:
        return 1.0
    return math.cos(99 * math.pi * min(epoch, epochs - 1) / (200 * (epochs - 1)))


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
        elif cfg.scheduler == "coda_cosine":
            f = coda_cosine(self.epoch, self.epochs)
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


class OptimizerMemory(nn.Module):
    """One optimiser's state (SGD momentum buffers, Adam moments and step counts) carried
    from one :func:`~ptcl.train.fit` to the next, by parameter name::

        opt = memory.optimizer(named_parameters, cfg)  # new optimiser, remembered state
        fit(module, loader, step, opt, cfg, device)
        memory.remember(opt)

    is one optimiser kept across the fits, as an official code that builds its optimiser
    once for all tasks. A parameter that grew along its first dimension since it was
    remembered (a growing head) keeps the state of its old rows; its new rows start with
    zero state, as the untouched rows of a full-size head would. The state of parameters
    not given to a later optimiser is kept as it is.

    The state is part of the owner's ``state_dict`` (``<attribute>.<parameter name>.<state
    key>``), so a checkpoint stores it and loading it restores it (any keys under the
    prefix are accepted). Tensors stay on the device they were trained on; they are moved
    to the parameter's device when restored.
    """

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._names: dict[int, str] = {}

    def optimizer(self, named: Iterable[tuple[str, torch.Tensor]], cfg: TrainConfig) -> torch.optim.Optimizer:
        """A new optimiser (:func:`make_optimizer`) over the ``(name, parameter)`` pairs,
        holding the remembered state of every parameter of the same name.

        Raises ``ValueError`` when a remembered state does not fit its parameter (other than
        by new rows along the first dimension)."""
        named = list(named)
        opt = make_optimizer([p for _, p in named], cfg)
        self._names = {id(p): n for n, p in named}
        for name, p in named:
            if name in self.state:
                opt.state[p] = {k: _grown(v, p, f"{name}.{k}") for k, v in self.state[name].items()}
        return opt

    def remember(self, opt: torch.optim.Optimizer) -> None:
        """Keep ``opt``'s state (an optimiser from :meth:`optimizer`) for the next one."""
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p)
                if st:
                    self.state[self._names[id(p)]] = {
                        k: (v.detach().clone() if torch.is_tensor(v) else torch.as_tensor(v))
                        for k, v in st.items() if v is not None
                    }

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, st in self.state.items():
            for k, v in st.items():
                destination[f"{prefix}{name}.{k}"] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        self.state = {}
        for key, v in state_dict.items():
            if key.startswith(prefix):
                name, k = key[len(prefix):].rsplit(".", 1)
                self.state.setdefault(name, {})[k] = v.clone()


def _grown(v: torch.Tensor, p: torch.Tensor, what: str) -> torch.Tensor:
    """State tensor ``v`` for parameter ``p``: as is, or zero-padded along dim 0 for the
    rows ``p`` gained; a scalar (a step count) as is."""
    if v.dim() == 0 or v.shape == p.shape:
        return v.to(p.device)
    if v.dim() != p.dim() or v.shape[1:] != p.shape[1:] or v.shape[0] > p.shape[0]:
        raise ValueError(f"remembered optimiser state {what} of shape {tuple(v.shape)} does not fit "
                         f"the parameter of shape {tuple(p.shape)}")
    pad = v.new_zeros((p.shape[0] - v.shape[0], *v.shape[1:]))
    return torch.cat([v, pad]).to(p.device)

"""The one training loop every method uses (:func:`fit`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ptcl.config import TrainConfig
from ptcl.errors import TrainingDiverged
from ptcl.train.callbacks import Callback, LoopState
from ptcl.train.optim import LRSchedule, make_optimizer

log = logging.getLogger(__name__)


def to_device(x, device: torch.device):
    """Move a tensor, or a tuple/list of tensors, to ``device``."""
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x.to(device, non_blocking=True)


def fit(
    module: nn.Module,
    loader: DataLoader,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Iterable | torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    epochs: int | None = None,
    desc: str = "train",
    quiet: bool = False,
    callbacks: Sequence[Callback] = (),
) -> list[float]:
    """Train ``module`` for ``epochs`` (default ``cfg.epochs``); ``step(x, y) -> loss``.

    ``loader`` yields ``(x, y)`` batches each epoch; ``x`` may be a tuple of tensors (e.g.
    images and their cached query features). ``params``: tensors or param-group dicts (a
    new optimiser is made from ``cfg``), or an existing ``torch.optim.Optimizer``, used as
    it is: its state (momentum, Adam moments) carries over from earlier fits and each
    group's lr restarts from its first value (``initial_lr``). The lr schedule comes from
    ``cfg`` (:mod:`ptcl.train.optim`); ``cfg.clip_grad`` clips the global gradient norm;
    ``callbacks`` are called per step and per epoch (:mod:`ptcl.train.callbacks`).
    Returns the mean loss of each epoch.

    Raises :class:`~ptcl.errors.TrainingDiverged` at the first step whose loss is NaN or
    infinite (before that step changes any weight), naming the epoch and step.
    """
    epochs = cfg.epochs if epochs is None else epochs
    if isinstance(params, torch.optim.Optimizer):
        opt = params
        for g in opt.param_groups:  # the schedule restarts from the first lr
            g["lr"] = g.setdefault("initial_lr", g["lr"])
    else:
        opt = make_optimizer(params, cfg)
    sched = LRSchedule(opt, cfg, epochs, len(loader))
    state = LoopState(0, epochs, 0, len(loader), 0, opt)
    module.train()
    losses = []
    bar = tqdm(range(epochs), desc=desc, disable=quiet, leave=False, unit="epoch")
    for epoch in bar:
        state.epoch, state.step = epoch, 0
        for cb in callbacks:
            cb.on_epoch_start(state)
        total, n = 0.0, 0
        for i, (x, y) in enumerate(loader):
            x, y = to_device(x, device), y.to(device, non_blocking=True)
            loss = step(x, y)
            value = float(loss.detach())
            if not math.isfinite(value):
                clip = "set method.clip_grad (e.g. 1.0)" if cfg.clip_grad is None else "lower method.clip_grad"
                raise TrainingDiverged(
                    f"the loss became {value} in epoch {epoch + 1}/{epochs}, step {i + 1}/{len(loader)} "
                    f"of {desc!r} (method.lr={cfg.lr:g}); lower method.lr or {clip}"
                )
            state.step, state.loss = i, value
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for cb in callbacks:
                cb.after_backward(state)
            if cfg.clip_grad is not None:
                clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad)
            opt.step()
            sched.after_step()
            state.global_step += 1
            for cb in callbacks:
                cb.after_step(state)
            total += value * len(y)
            n += len(y)
        sched.after_epoch()
        losses.append(total / max(n, 1))
        state.epoch_loss = losses[-1]
        for cb in callbacks:
            cb.on_epoch_end(state)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        log.info("%s epoch %d/%d loss %.4f", desc, epoch + 1, epochs, losses[-1])
    module.eval()
    return losses

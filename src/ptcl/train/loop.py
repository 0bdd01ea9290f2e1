"""The one training loop every method uses (:func:`fit`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ptcl.config import TrainConfig
from ptcl.data.loading import split_text, timed, timer_of
from ptcl.dist import all_mean
from ptcl.errors import TrainingDiverged
from ptcl.precision import autocast
from ptcl.train.callbacks import Callback, LoopState
from ptcl.train.distributed import sync_callbacks
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
    precision: str = "fp32",
) -> list[float]:
    """Train ``module`` for ``epochs`` (default ``cfg.epochs``); ``step(x, y) -> loss``.

    ``loader`` yields ``(x, y)`` batches each epoch; ``x`` may be a tuple of tensors (e.g.
    images and their cached query features). ``params``: tensors or param-group dicts (a
    new optimiser is made from ``cfg``), or an existing ``torch.optim.Optimizer``, used as
    it is: its state (momentum, Adam moments) carries over from earlier fits and each
    group's lr restarts from its first value (``initial_lr``). The lr schedule comes from
    ``cfg`` (:mod:`ptcl.train.optim`); ``cfg.clip_grad`` clips the global gradient norm;
    ``callbacks`` are called per step and per epoch (:mod:`ptcl.train.callbacks`).
    ``precision="bf16"`` runs ``step`` (the forward and the loss) under bf16 autocast
    (:mod:`ptcl.precision`); the backward pass, clipping and the optimiser step run outside
    it, on float32 parameters and gradients.
    Logs one line per fit: the seconds blocked on ``loader`` for the next batch (data wait)
    vs the rest (compute), added to the run's total when ``loader`` carries one
    (:class:`~ptcl.data.loading.InputTimer`, from :meth:`~ptcl.data.server.DataManager.loader`).
    Under torchrun (several ranks) ``loader`` serves this rank's slice of every batch
    (:meth:`ptcl.data.server.DataManager.loader`) and the optimiser's gradients are averaged
    over the ranks right after ``loss.backward()`` (:mod:`ptcl.train.distributed`).
    Returns the mean loss of each epoch (under torchrun, averaged over the ranks).

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
    callbacks = [*sync_callbacks(module, opt), *callbacks]  # torchrun: gradient all-reduce first
    state = LoopState(0, epochs, 0, len(loader), 0, opt, desc=desc)
    module.train()
    losses = []
    bar = tqdm(range(epochs), desc=desc, disable=quiet, leave=False, unit="epoch")
    wait, t_fit = [0.0], time.perf_counter()  # seconds blocked on the loader; the fit's start
    for epoch in bar:
        state.epoch, state.step = epoch, 0
        for cb in callbacks:
            cb.on_epoch_start(state)
        total, n = 0.0, 0
        for i, (x, y) in enumerate(timed(loader, wait)):
            x, y = to_device(x, device), y.to(device, non_blocking=True)
            with autocast(device, precision):
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
        losses.append(all_mean(total / max(n, 1)))  # the mean over the ranks (one process: as is)
        state.epoch_loss = losses[-1]
        for cb in callbacks:
            cb.on_epoch_end(state)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        log.info("%s epoch %d/%d loss %.4f", desc, epoch + 1, epochs, losses[-1])
    compute = time.perf_counter() - t_fit - wait[0]
    log.info("%s: %d epochs, %s", desc, epochs, split_text(wait[0], compute))
    if (timer := timer_of(loader)) is not None:  # the run's per-task total (ptcl.data.loading)
        timer.add(wait[0], compute)
    module.eval()
    return losses

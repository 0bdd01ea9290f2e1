"""The one training loop and the optimiser / scheduler factory every method uses."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ptcl.config import TrainConfig
from ptcl.errors import TrainingDiverged

log = logging.getLogger(__name__)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
}


def make_optimizer(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``params``: tensors or param-group dicts (a group may set its own ``lr``)."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters were given to the optimiser")
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def to_device(x, device: torch.device):
    """Move a tensor, or a tuple/list of tensors, to ``device``."""
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x.to(device, non_blocking=True)


def fit(
    module: nn.Module,
    loader: DataLoader,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Iterable,
    cfg: TrainConfig,
    device: torch.device,
    epochs: int | None = None,
    desc: str = "train",
    quiet: bool = False,
) -> list[float]:
    """Train ``module`` for ``epochs`` (default ``cfg.epochs``); ``step(x, y) -> loss``.

    ``x`` may be a tuple of tensors (e.g. images and their cached query features).

    The scheduler steps once per epoch (cosine over the epochs, as in LAMDA-PILOT).
    Returns the mean loss of each epoch.

    Raises :class:`~ptcl.errors.TrainingDiverged` at the first step whose loss is NaN or
    infinite (before that step changes any weight), naming the epoch and step.
    """
    epochs = cfg.epochs if epochs is None else epochs
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg, epochs)
    module.train()
    losses = []
    bar = tqdm(range(epochs), desc=desc, disable=quiet, leave=False, unit="epoch")
    for epoch in bar:
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad is not None:
                clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad)
            opt.step()
            total += value * len(y)
            n += len(y)
        sched.step()
        losses.append(total / max(n, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        log.info("%s epoch %d/%d loss %.4f", desc, epoch + 1, epochs, losses[-1])
    module.eval()
    return losses

"""Data-parallel training inside the one train loop (:func:`ptcl.train.fit`) under torchrun.

Every method trains through ``fit(module, loader, step, params, ...)`` with a ``step(x, y)
-> loss`` closure over its own modules, which ``DistributedDataParallel`` cannot wrap. The
equivalent is done here as a loop callback, first in ``fit``'s callback list:

* at the start of ``fit``: every parameter of the optimiser takes rank 0's values (what
  DDP does when it wraps a model), so all ranks start a fit from identical weights;
* after ``loss.backward()`` (before clipping and the optimiser step, and before the
  method's own ``after_backward`` callbacks): the gradients of the optimiser's parameters
  are averaged over the ranks (:func:`ptcl.dist.average_gradients_`). Each rank's loader
  serves its slice of the same global batch (:class:`ptcl.dist.ShardedBatches`) with equal
  slice sizes, so the average is the gradient of the global batch's mean loss;
* after the optimiser step: BatchNorm running statistics (``running_mean``/``running_var``
  of every ``_BatchNorm`` in ``module``) are averaged over the ranks, so every buffer stays
  identical on every rank as well (DDP broadcasts rank 0's instead).

What still differs from one process: each rank's forward sees ``batch_size / W`` images
(BatchNorm *batch* statistics and any other in-batch computation use that slice, not the
whole batch); the all-reduce sums in another order (float rounding); a short last batch is
padded with repeated images; random draws inside ``step`` (dropout) come from each rank's
global generator, which is seeded identically on every rank but draws for fewer images.
"""

from __future__ import annotations

import torch
from torch import nn

from ptcl import dist
from ptcl.train.callbacks import Callback, LoopState


class GradientSync(Callback):
    """Averages gradients and BatchNorm running statistics over the ranks (module docstring)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var) if b is not None]
        dist.broadcast_tensors(self.params)
        dist.broadcast_tensors(self.buffers)

    def after_backward(self, state: LoopState) -> None:
        dist.average_gradients_(self.params)

    def after_step(self, state: LoopState) -> None:
        dist.average_(self.buffers)


def sync_callbacks(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[Callback]:
    """``[GradientSync]`` when this process is one of several ranks, else ``[]``."""
    return [GradientSync(module, optimizer)] if dist.world_size() > 1 else []

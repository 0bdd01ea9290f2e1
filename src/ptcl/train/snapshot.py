"""Frozen snapshots of a model: the teacher of distillation (LwF-style KD), the old weights
of EMA or Fisher merging.

:class:`Snapshot` copies a module at one moment, with three guarantees:

* **no second pre-trained backbone**: tensors that are frozen and unchanged pre-trained
  weights (by default: every parameter and buffer with ``requires_grad=False`` inside
  ``module.backbone``, when the module has one and does not train it) are shared with the
  live module, not copied; everything else (heads, prompts, adapters, statistics, a trained
  backbone) is copied;
* **not part of the learner's state**: a ``Snapshot`` is a plain object, so assigning it
  to a module attribute does not register it: it never enters ``state_dict`` or a
  checkpoint, and the optimiser never sees it;
* **no run context**: attributes named ``ctx`` (the data server, the scenario) are set to
  ``None`` in the copy instead of being copied.

After ``--resume`` a snapshot is rebuilt by taking it where the method takes it in an
uninterrupted run, **in** ``before_task``: the engine replays ``before_task`` for the
finished tasks and loads the last checkpoint before the next task's ``before_task``, so a
snapshot taken at the start of task ``t`` holds the state after task ``t - 1`` in both
cases. (A snapshot taken in ``after_task`` would be missing after a resume.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def frozen_pretrained(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a snapshot of ``module`` shares: parameters and buffers of
    ``module.backbone`` that do not require grad, unless the module trains its backbone
    (``updates_backbone``)."""
    backbone = getattr(module, "backbone", None)
    if not isinstance(backbone, nn.Module) or getattr(module, "updates_backbone", False):
        return []
    return [p for p in backbone.parameters() if not p.requires_grad] + list(backbone.buffers())


class Snapshot:
    """A frozen copy of ``module`` taken now (see the module docstring).

    ``share``: tensors to share instead of copying (default :func:`frozen_pretrained`).
    Calling the snapshot runs the copy's ``forward`` in eval mode without gradients;
    ``snapshot.module`` is the copy (all its parameters have ``requires_grad=False``).
    """

    def __init__(self, module: nn.Module, share: Iterable[torch.Tensor] | None = None) -> None:
        shared = list(frozen_pretrained(module) if share is None else share)
        memo: dict[int, Any] = {id(t): t for t in shared}
        for m in module.modules():  # the run context is never copied
            ctx = m.__dict__.get("ctx")
            if ctx is not None:
                memo[id(ctx)] = None
        self.module: nn.Module = copy.deepcopy(module, memo)
        self.module.requires_grad_(False)
        self.module.eval()
        self.shared = len(shared)

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot's tensors (e.g. the old weights for a merge); detached copies are
        not made: do not modify them in place."""
        return self.module.state_dict()

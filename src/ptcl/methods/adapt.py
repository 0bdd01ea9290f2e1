"""First-session adaptation, shared by APER, RanPAC and FeCAM.

The pre-trained backbone is tuned on the first task only (a PEFT module, or all its
weights for ``finetune``) with a temporary cosine head and cross-entropy, then frozen for
the rest of the stream (Zhou et al., IJCV 2024; McDonnell et al., NeurIPS 2023).

* The tuning module is attached in the learner's first ``before_task``, so a resumed run rebuilds
  the same module tree before loading a checkpoint.
* After tuning, the adapted features of the selected train/test images are extracted once
  and cached on disk under a hash of the adapted weights: later tasks never run the
  backbone again, and a rerun with the same adapted weights reads them from disk.
* The plain pre-trained features come from the feature cache (computed before tuning),
  so no second copy of the backbone is needed, even for ``finetune``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.backbones.base import Backbone
from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.linear import CosineHead
from ptcl.methods.base import Learner, require_vit
from ptcl.options import option
from ptcl.peft import TuningHandle, attach, mark_only_tuning_trainable
from ptcl.peft.base import check_options

log = logging.getLogger(__name__)

Tuning = Literal["none", "finetune", "adapter", "ssf", "vpt_shallow", "vpt_deep"]


_PILOT_APER = "LAMDA-PILOT exps/aper_*.json (APER, CIFAR-100)"


@dataclass
class FirstSessionConfig(TrainConfig):
    """Options of first-session tuning (LAMDA-PILOT's APER defaults: 20 epochs, SGD,
    lr 0.01, batch 48, weight decay 5e-4, cosine; adapter bottleneck 64; 5 VPT tokens).

    ``head_scale`` is the initial scale ``sigma`` of the temporary cosine head (learnable;
    the official code starts it at 1). See :func:`temporary_head` for when to raise it."""

    tuning: Tuning = option(
        "adapter", "first-session tuning module: none (frozen backbone), finetune (all weights), adapter "
        "(AdaptFormer), ssf, vpt_shallow or vpt_deep (ViT only: adapter, vpt_*)",
        source=f"{_PILOT_APER} (the adapter variant)")
    epochs: int = option(20, "first-session training epochs (first task only)", source=f"{_PILOT_APER} (tuned_epoch)")
    lr: float = option(0.01, "first-session learning rate", source=f"{_PILOT_APER} (init_lr)")
    batch_size: int = option(48, "first-session batch size", source=_PILOT_APER)
    weight_decay: float = option(5e-4, source=_PILOT_APER)
    tuning_options: dict[str, Any] = option(
        help="options of the tuning module (e.g. bottleneck, num_prompts; see ptcl.peft); {}: its defaults "
        "(adapter bottleneck 64, 5 VPT tokens)", factory=dict, source="ptcl default")
    head_scale: float = option(
        1.0, "initial scale sigma of the temporary cosine head (learnable); about 16 for backbones with "
        "large feature norms (DINOv2)", gt=0, source="PILOT / RanPAC CosineLinear (sigma starts at 1)")


def temporary_head(dim: int, num_classes: int, scale: float) -> CosineHead:
    """The cosine head (learnable scale, initialised to ``scale``) that trains a tuning module.

    The gradient that reaches the features through ``sigma * cos(f, w)`` is proportional to
    ``sigma / ||f||``, and the learnable ``sigma`` itself moves by at most about ``2 lr`` per
    step (before momentum). At the official ``sigma = 1``, a backbone with large feature
    norms (the DINOv2 ViT-S/14 at 112 px: ``||f|| ~ 42``) barely moves in a short schedule:
    APER's first-task loss went 1.385 -> 1.364 in 85 steps on 4 classes. A
    default-initialised linear head passes the features a gradient of scale
    ``||w|| ~ 1/sqrt(3)``, which the cosine head matches at ``sigma ~ 0.6 ||f||``;
    ``head_scale=16`` (loss 1.42 -> 0.86 in 170 steps) is what the measured DINOv2 results
    in the README use.
    """
    head = CosineHead(dim, sigma=scale, learn_sigma=True)
    head.grow(num_classes)
    return head


def check_tuning(backbone: Backbone, cfg: FirstSessionConfig) -> None:
    """Raise the :class:`ConfigError` of a ViT-only ``cfg.tuning`` on a CNN backbone, or of
    ``cfg.tuning_options`` the tuning module does not take (at set-up, before any task)."""
    if cfg.tuning not in ("none", "finetune", "ssf"):
        require_vit(backbone, f"method.tuning={cfg.tuning}", " (use method.tuning=ssf, finetune or none)")
    if cfg.tuning != "none":
        check_options(cfg.tuning, cfg.tuning_options)
    elif cfg.tuning_options:
        raise ConfigError(f"method.tuning_options {cfg.tuning_options} are set but method.tuning is none; "
                          "remove them or choose a tuning module")


def attach_tuning(backbone: Backbone, cfg: FirstSessionConfig) -> TuningHandle | None:
    """Attach ``cfg.tuning`` to the backbone (``none``: nothing)."""
    check_tuning(backbone, cfg)
    if cfg.tuning == "none":
        return None
    handle = attach(backbone.model, cfg.tuning, **cfg.tuning_options)
    backbone.requires_grad_(False)
    return handle


def tune_first_session(
    learner: nn.Module, backbone: Backbone, handle: TuningHandle | None, task: Task, cfg: FirstSessionConfig
) -> list[float]:
    """Train the tuning module (+ a temporary head) on ``task``'s images, then freeze.

    The temporary head is a cosine classifier with a learnable scale (initialised to
    ``cfg.head_scale``, 1 as LAMDA-PILOT's and RanPAC's ``CosineLinear``).
    """
    if handle is None:
        return []
    head = temporary_head(backbone.feature_dim, task.num_new, cfg.head_scale).to(learner.device)
    if handle.module.trains_backbone:
        backbone.requires_grad_(True)
    else:
        mark_only_tuning_trainable(backbone.model)
    data = learner.ctx.data.images("train", task.classes, train_transform=True)
    start = task.start

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(backbone(x)), y - start)

    params = [*handle.parameters(), *(p for p in head.parameters() if p.requires_grad)]
    losses = learner.fit(data, step, params, cfg, desc=f"first-session {cfg.tuning}", seed=task.index)
    backbone.requires_grad_(False)
    backbone.eval()
    log.info("first-session %s tuning: loss %.4f -> %.4f", cfg.tuning, losses[0], losses[-1])
    return losses


def adapted_features(learner: nn.Module, backbone: Backbone, split: str) -> torch.Tensor:
    """Features of the whole selected ``split`` under the current (adapted) backbone, cached
    on disk under a hash of its weights."""
    return learner.ctx.data.cached_features(split, backbone, backbone.state_fingerprint())


class FirstSessionFeatures(Learner):
    """First-session tuning shared by RanPAC and FeCAM: the tuning module is attached by the
    first ``before_task`` (so the frozen-weights snapshot after ``__init__`` excludes it, and
    a resumed run rebuilds it before loading), trained by the first ``train_task``; then the
    adapted features are served from the feature cache (and memoised per split)."""

    def _init_tuning(self, cfg: FirstSessionConfig) -> None:
        check_tuning(self.backbone, cfg)  # a bad tuning/backbone pair fails now, before any task
        self.handle: TuningHandle | None = None
        self.updates_backbone = cfg.tuning == "finetune"
        self._adapted: dict[str, torch.Tensor] = {}

    def _attach(self, task: Task) -> None:
        if task.is_first:
            self.handle = attach_tuning(self.backbone, self.cfg)  # type: ignore[arg-type]
            self.backbone.to(self.device)

    def _tune(self, task: Task) -> None:
        if task.is_first and self.handle is not None:
            self.to(self.device)
            tune_first_session(self, self.backbone, self.handle, task, self.cfg)  # type: ignore[arg-type]
            self._adapted.clear()

    def features(self, split: str, classes: Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
        if self.handle is None:
            return super().features(split, classes)
        if split not in self._adapted:
            self._adapted[split] = adapted_features(self, self.backbone, split)
        data = self.ctx.data
        pos = torch.from_numpy(data.positions(split, classes))
        return self._adapted[split][pos], data.labels(split, classes)

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(state)
        self._adapted.clear()

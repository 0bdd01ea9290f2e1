"""Sequential fine-tuning (the lower bound) and joint training (the upper bound).

``finetune`` trains the whole backbone and a growing linear head with cross-entropy on
each new task's data only: it forgets catastrophically and bounds methods from below.
``joint`` trains on the data of all classes seen so far at every task: it is the
non-incremental reference that bounds methods from above. Neither is a paper's method.

ptcl's defaults: SGD (momentum 0.9) lr 0.01, cosine, 10 epochs, batch 48, weight decay 5e-4,
gradient clipping at global norm 1 as in ViT fine-tuning, cross-entropy over all seen
classes.

LAMDA-PILOT's finetune (``models/finetune.py``, ``exps/finetune.json``; the published
baseline rows), selected by the ``finetune_*`` files in ``configs/``: SGD (momentum 0.9) lr
1e-3, 20 epochs, batch 128, milestones beyond the last epoch (a constant lr), weight decay
5e-4 on the first task and 2e-4 after (ptcl has one value: the configs use 2e-4, the first
task differs), no clipping, and from the second task on the loss is the cross-entropy of
the current task's logits only (``logits[:, known_classes:]`` against ``y - known_classes``):
``mask_old_logits: true``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.linear import IncrementalLinear
from ptcl.methods.base import IMAGES, Learner
from ptcl.options import option
from ptcl.registry import METHODS


@dataclass
class FinetuneConfig(TrainConfig):
    name: str = option("finetune")
    epochs: int = option(10, source="ptcl default")
    lr: float = option(0.01, source="ptcl default (LAMDA-PILOT's ViT setting: SGD, momentum 0.9, cosine)")
    batch_size: int = option(48, source="ptcl default")
    weight_decay: float = option(5e-4, source="ptcl default")
    # Global-norm clipping at 1, as in ViT fine-tuning (Dosovitskiy et al., ICLR 2021, App. B.1.1):
    # without it SGD at lr 0.01 diverges on DINOv2 ViT-S/14 (loss 2.2 -> 19 in 10 steps).
    clip_grad: float | None = option(1.0, source="ViT fine-tuning (Dosovitskiy et al., ICLR 2021, App. B.1.1)")
    mask_old_logits: bool = option(
        False, "from the second task on, cross-entropy over the current task's logits only (old classes "
        "masked), as LAMDA-PILOT's finetune; false: over all seen classes",
        source="ptcl default (PILOT models/finetune.py _update_representation: true)")


@dataclass
class JointConfig(FinetuneConfig):
    name: str = option("joint")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_old_logits:
            raise ConfigError("method.mask_old_logits is a finetune option: joint trains on every seen "
                              "class's data, so no logits may be masked; drop it")


@METHODS.register("finetune")
class Finetune(Learner):
    """Finetune: the whole backbone and a growing linear head trained on each new task only (lower bound)."""

    config_cls = FinetuneConfig
    inputs = IMAGES
    updates_backbone = True

    def __init__(self, cfg: FinetuneConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        backbone.requires_grad_(True)
        self.head = IncrementalLinear(backbone.feature_dim)

    def before_task(self, task: Task) -> None:
        self.head.grow(task.num_new)

    def train_classes(self, task: Task) -> range:
        return range(task.start, task.end)

    def train_task(self, task: Task) -> None:
        data = self.ctx.data.images("train", self.train_classes(task), train_transform=True)
        self.to(self.device)
        self.fit(data, functools.partial(self.loss, task=task), self.parameters(),
                 desc=f"task {task.index}", seed=task.index)

    def loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """Cross-entropy over the seen classes, or (``mask_old_logits``, after the first task)
        over the current task's classes only."""
        logits = self.predict(x)
        if self.cfg.mask_old_logits and task.index > 0:
            return F.cross_entropy(logits[:, task.start:], y - task.start)
        return F.cross_entropy(logits, y)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@METHODS.register("joint")
class Joint(Finetune):
    """Joint: trains on all seen classes' data at every task (upper bound)."""

    config_cls = JointConfig

    def train_classes(self, task: Task) -> range:
        return range(0, task.end)

"""SimpleCIL: class-mean prototypes of a frozen pre-trained backbone + cosine classifier.

Zhou, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need." IJCV 2024 (arXiv:2303.07338).

The backbone is never trained. After each task the prototype of every new class is the
mean of its training features (eval transform, as in LAMDA-PILOT's ``replace_fc``), and a
test image is assigned to the class of highest cosine similarity. Features come from the
feature cache, so a T-task run costs one backbone pass over the data.

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/simplecil_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptcl.config import MethodConfig
from ptcl.data.scenario import Task
from ptcl.heads.class_statistics import class_means
from ptcl.heads.linear import CosineHead
from ptcl.methods.base import FEATURES, Learner
from ptcl.options import option
from ptcl.registry import METHODS


@dataclass
class SimpleCILConfig(MethodConfig):
    name: str = option("simplecil")


@METHODS.register("simplecil")
class SimpleCIL(Learner):
    """SimpleCIL: class-mean prototypes of a frozen backbone and a cosine classifier (Zhou et al., IJCV 2024)."""

    config_cls = SimpleCILConfig
    inputs = FEATURES

    def __init__(self, cfg: SimpleCILConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        self.head = CosineHead(backbone.feature_dim)

    def before_task(self, task: Task) -> None:
        self.head.grow(task.num_new)

    def after_task(self, task: Task) -> None:
        feats, labels = self.ctx.data.features("train", task.classes)
        self.head.weight.data[task.start : task.end] = class_means(feats, labels, task.classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

"""FeCAM: per-class feature covariances and a Mahalanobis classifier on a frozen model.

Goswami, Liu, Twardowski, van de Weijer. "FeCAM: Exploiting the Heterogeneity of Class
Distributions in Exemplar-Free Continual Learning." NeurIPS 2023 (arXiv:2309.14062).

The backbone stays frozen (the paper's pre-trained-ViT setting, the authors'
``FeCAM_vit_*.py``); ``tuning`` optionally tunes it on the first task first, as
LAMDA-PILOT's FeCAM does with an adapter. For every new class the mean and the shrunk,
correlation-normalised covariance of its (transformed) training features are stored; a
sample goes to the class of smallest Mahalanobis distance (see :mod:`ptcl.heads.gaussian`).
Old classes' statistics never change, and no data is kept. A class with fewer than 3
distinct training samples (its covariance would be zero or rank one; with one sample the
authors' code gives it a zero precision, so it takes every prediction) is shrunk towards
the mean covariance of the classes learned so far, with a warning naming it
(:mod:`ptcl.heads.class_statistics`); a class without samples raises ``DataError``.

Defaults (github.com/dipamgoswami/FeCAM): ``FeCAM_vit_cifar100.py`` -- L2-normalised
features, one shrinkage with ``gamma1 = 1, gamma2 = 0``, correlation normalisation,
``pinv``; ``FeCAM_vit_imagenet-r.py`` uses ``gamma1 = gamma2 = 10``. Tukey's transform
(``beta = 0.5``, ``exps/FeCAM_cifar100.json``) needs non-negative features: ``tukey=auto``
applies it to CNN backbones (post-ReLU pooled features, as their ResNet-18 runs, which also
shrink twice with ``gamma1 = gamma2 = 1``) and not to ViTs (as their ViT scripts).
Deviations: the features are the backbone's pooled output (the CLS token for the ViT-B/16
configs, as theirs); the first-session options follow LAMDA-PILOT ``exps/fecam.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.gaussian import GaussianHead
from ptcl.methods.adapt import FirstSessionConfig, FirstSessionFeatures, Tuning
from ptcl.methods.base import FEATURES
from ptcl.registry import METHODS


@dataclass
class FeCAMConfig(FirstSessionConfig):
    name: str = "fecam"
    tuning: Tuning = "none"
    tukey: Literal["auto", "always", "never"] = "auto"
    beta: float = 0.5
    gamma1: float = 1.0
    gamma2: float = 0.0
    shrink_steps: int = 1
    normalize_cov: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for n in ("beta", "gamma2"):
            if getattr(self, n) < 0:
                raise ConfigError(f"method.{n} must be >= 0, got {getattr(self, n)}")
        if self.gamma1 <= 0 or self.shrink_steps < 1:
            raise ConfigError(
                f"method.gamma1 must be > 0 and method.shrink_steps >= 1 (the covariance must be "
                f"positive definite), got gamma1={self.gamma1}, shrink_steps={self.shrink_steps}"
            )


@METHODS.register("fecam")
class FeCAM(FirstSessionFeatures):
    config_cls = FeCAMConfig
    inputs = FEATURES

    def __init__(self, cfg: FeCAMConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        self._init_tuning(cfg)
        use_tukey = cfg.tukey == "always" or (cfg.tukey == "auto" and backbone.kind == "cnn")
        self.head = GaussianHead(
            backbone.feature_dim, cfg.beta if use_tukey else None, cfg.gamma1, cfg.gamma2,
            cfg.shrink_steps, cfg.normalize_cov,
        )

    def before_task(self, task: Task) -> None:
        self._attach(task)
        self.head.grow(task.num_new)

    def train_task(self, task: Task) -> None:
        self._tune(task)
        feats, labels = self.features("train", task.classes)
        self.head.fit(feats, labels, task.classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

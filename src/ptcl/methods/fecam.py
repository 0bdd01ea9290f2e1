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

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/fecam_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ptcl.data.scenario import Task
from ptcl.heads.gaussian import GaussianHead
from ptcl.methods.adapt import FirstSessionConfig, FirstSessionFeatures, Tuning
from ptcl.methods.base import FEATURES
from ptcl.options import option
from ptcl.registry import METHODS

_VIT = "official FeCAM FeCAM_vit_cifar100.py"
_PILOT = "LAMDA-PILOT exps/fecam.json"


@dataclass
class FeCAMConfig(FirstSessionConfig):
    name: str = option("fecam")
    tuning: Tuning = option("none", source="FeCAM paper, pre-trained ViT setting (frozen backbone)")
    epochs: int = option(20, source=_PILOT)
    lr: float = option(0.01, source=_PILOT)
    batch_size: int = option(48, source=_PILOT)
    weight_decay: float = option(5e-4, source=_PILOT)
    tukey: Literal["auto", "always", "never"] = option(
        "auto", "Tukey's transform x^beta before L2 normalisation: auto = on CNN backbones only (non-negative "
        "features), always, never", source="ptcl (the authors' ResNet runs use it, their ViT scripts do not)")
    beta: float = option(0.5, "Tukey exponent beta (0: log)", ge=0, source="official FeCAM exps/FeCAM_cifar100.json")
    gamma1: float = option(1.0, "covariance shrinkage: gamma1 x mean diagonal added to the diagonal (> 0: "
                           "positive definite)", gt=0, source=f"{_VIT} (ImageNet-R: 10)")
    gamma2: float = option(0.0, "covariance shrinkage: gamma2 x mean off-diagonal added off the diagonal", ge=0,
                           source=f"{_VIT} (ImageNet-R: 10)")
    shrink_steps: int = option(1, "times the shrinkage is applied", ge=1,
                               source=f"{_VIT} (once; the authors' ResNet runs: twice)")
    normalize_cov: bool = option(True, "normalise each covariance to a correlation matrix", source=_VIT)


@METHODS.register("fecam")
class FeCAM(FirstSessionFeatures):
    """FeCAM: per-class covariances and a Mahalanobis classifier on frozen features (Goswami et al., NeurIPS 2023)."""

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

"""RanPAC: random projections and a ridge classifier on a pre-trained model.

McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel. "RanPAC: Random Projections and
Pre-trained Models for Continual Learning." NeurIPS 2023 (arXiv:2307.02251).

Implemented as in the official code (github.com/RanPAC/RanPAC, ``RanPAC.py``/``inc_net.py``;
also LAMDA-PILOT ``models/ranpac.py``):

* Phase 1 (``tuning != none``, default ``adapter``): the backbone is tuned on the first
  task with a PEFT module (:mod:`ptcl.methods.adapt`), then frozen. The classifier uses the
  adapted features only (RanPAC does not concatenate them with the pre-trained ones).
* Phase 2 (every task): features ``f`` -> ``h = relu(f @ W_rand)``, ``W_rand`` fixed N(0, 1)
  of size ``feature_dim x M`` (``M = 10000``); ``G += h h^T`` and ``Q += h y^T`` over the
  task's samples (old data is never read again); ``lambda`` chosen on an 80/20 split of
  the current task from ``10^-8 .. 10^8`` (the official grid); ``W = (G + lambda I)^-1 Q``;
  logits ``h @ W``. See :mod:`ptcl.heads.ridge`. With one or two samples per class (not
  handled by the official code) a split that fits no sample of some class is redrawn per
  class, a task whose classes all have one sample keeps the previous lambda, and a class
  without samples raises ``DataError``.

Defaults: RanPAC ``args/cifar224_publish.csv`` (adapter, 20 epochs, SGD lr 0.01, batch 48,
weight decay 5e-4, cosine to 0, M = 10000). Deviations: the lambda grid is searched with one
eigendecomposition instead of one solve per value (same solutions); the final solve switches to
float64 when ill-conditioned. The first-session head is a cosine classifier with a learnable
scale, as the official ``CosineLinear`` (:mod:`ptcl.methods.adapt`).

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/ranpac_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ptcl.config import _seed
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.ridge import RidgeHead
from ptcl.methods.adapt import FirstSessionConfig, FirstSessionFeatures, Tuning
from ptcl.methods.base import FEATURES
from ptcl.options import option
from ptcl.registry import METHODS

log = logging.getLogger(__name__)


_PUBLISH = "official RanPAC args/cifar224_publish.csv (CIFAR-100)"


@dataclass
class RanPACConfig(FirstSessionConfig):
    """``M = 0`` skips the random projection (ridge on the features themselves)."""

    name: str = option("ranpac")
    tuning: Tuning = option("adapter", source=_PUBLISH)
    epochs: int = option(20, source=_PUBLISH)
    lr: float = option(0.01, source=_PUBLISH)
    batch_size: int = option(48, source=_PUBLISH)
    weight_decay: float = option(5e-4, source=_PUBLISH)
    M: int = option(10000, "width of the random ReLU projection; 0: ridge on the features themselves", ge=0,
                    source=f"{_PUBLISH} (M = 10000)")
    projection_seed: int | None = option(
        None, "seed of the random projection W_rand, an integer in [0, 2**32 - 1]; null: the run's seed",
        source="ptcl")
    lambda_exp_min: int = option(-8, "ridge lambda grid: 10^lambda_exp_min .. 10^lambda_exp_max (powers of 10)",
                                 source="official RanPAC RanPAC.py (10^-8 .. 10^8)")
    lambda_exp_max: int = option(8, "ridge lambda grid: largest power of 10 (>= lambda_exp_min)",
                                 source="official RanPAC RanPAC.py (10^-8 .. 10^8)")
    val_fraction: float = option(0.2, "fraction of the current task's samples held out to choose lambda",
                                 gt=0, lt=1, source="official RanPAC RanPAC.py (80/20 split)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection_seed is not None:
            _seed(self, "method", "projection_seed")
        if self.lambda_exp_min > self.lambda_exp_max:
            raise ConfigError(
                f"method.lambda_exp_min ({self.lambda_exp_min}) must be <= lambda_exp_max ({self.lambda_exp_max})"
            )

    @property
    def lambdas(self) -> list[float]:
        return [10.0**e for e in range(self.lambda_exp_min, self.lambda_exp_max + 1)]


@METHODS.register("ranpac")
class RanPAC(FirstSessionFeatures):
    """RanPAC: first-session tuning, a random ReLU projection and a ridge classifier (McDonnell et al., NeurIPS 2023)."""

    config_cls = RanPACConfig
    inputs = FEATURES
    test_options: ClassVar[dict] = {"M": 64}

    def __init__(self, cfg: RanPACConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        self._init_tuning(cfg)
        seed = ctx.seed if cfg.projection_seed is None else cfg.projection_seed
        self.head = RidgeHead(backbone.feature_dim, cfg.M, seed)

    def before_task(self, task: Task) -> None:
        self._attach(task)
        self.head.grow(task.num_new)

    def train_task(self, task: Task) -> None:
        self._tune(task)
        x, y = self.features("train", task.classes)
        gen = torch.Generator().manual_seed(self.ctx.seed + task.index)
        self.head.fit_task(x, y, task.classes, self.cfg.lambdas, self.cfg.val_fraction, gen)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

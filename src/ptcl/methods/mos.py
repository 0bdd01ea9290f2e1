"""MOS: model surgery with merged per-task adapters and self-refined adapter retrieval.

Sun, Zhou, Zhao, Gan, Zhan, Ye. "MOS: Model Surgery for Pre-Trained Model-Based
Class-Incremental Learning." AAAI 2025 (arXiv:2412.09441). Official code:
github.com/sun-hailong/AAAI25-MOS (also LAMDA-PILOT ``models/mos.py``, ``backbone/vit_mos.py``).

Implemented (defaults of PILOT ``exps/mos.json``):

* one AdaptFormer adapter set per task (bottleneck 16); task ``t``'s set starts from task
  ``t-1``'s trained weights (the official ``cur_adapter`` is never re-initialised) and is
  trained with a linear head over all seen classes (old classes masked, head lr x0.1) by
  cross-entropy plus ``reg`` x an orthogonality loss: cross-entropy of the similarity matrix
  (``/ 0.8``) of [old class means; batch features] against the identity;
* adapter merging: after every optimiser step ``A_t <- (1 - m) A_t + m mean_{k<t} A_k``
  (``adapter_momentum`` ``m = 0.1``), so the new adapter keeps the old adapters' knowledge;
* per class the mean and covariance of its features under its task's adapter; from task
  1 on, classifier alignment trains the head on features sampled from these Gaussians
  (``batch_size * 5`` per class per epoch, 30 epochs, lr 0.005, SGD, cosine);
* prototypes (class means under adapter 0) form a cosine classifier that gives the first
  guess of the task; self-refined retrieval then classifies with that task's adapter
  features and the head, moves to the task of that prediction, and repeats until the task
  is stable (at most 4 evaluations); with ``ensemble`` the output is
  ``softmax(head logits) + softmax((t + 1) * prototype cosine)``.

Deviations: the official code also applies the merge in place inside every block of every
forward pass (``reweight_adapter`` is called per block, for training, class statistics and
test forwards, so stored adapters keep drifting towards the mean of the earlier ones while
being evaluated); here the merge follows the paper (once per optimiser step) and stored
adapters are frozen, so their features are extracted once and cached like EASE's. Only the
``covariance`` and ``variance`` class statistics are implemented (not ``multi-centroid``).
Not in the official code: a class with fewer than 3 distinct samples (covariance zero or
rank one) is shrunk towards the mean covariance of the classes with enough samples of its
task and of every earlier class, with a warning; the Cholesky factors add jitter where one
fails (the official ``torch.linalg.cholesky`` raises), both from
:mod:`ptcl.heads.class_statistics`, shared with SLCA.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ptcl.backbones.base import Backbone
from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.class_statistics import (
    SharedCovariance,
    cholesky_factors,
    class_gaussians,
    class_means,
    sample_gaussians,
)
from ptcl.heads.linear import IncrementalLinear
from ptcl.methods.base import FEATURES, Learner
from ptcl.methods.ease import SubspaceMixin, only
from ptcl.peft import TuningHandle
from ptcl.registry import METHODS
from ptcl.seeding import generator
from ptcl.train.callbacks import AfterStep

log = logging.getLogger(__name__)

ORTH_TEMPERATURE = 0.8
HEAD_LR_SCALE = 0.1
COV_RIDGE = 1e-4  # added to every class covariance (unchanged from the previous implementation)


@dataclass
class MOSConfig(TrainConfig):
    """PILOT ``exps/mos.json`` (CIFAR-100): 20 epochs, SGD lr 0.03, batch 48, weight decay
    5e-4, cosine; ``ffn_num=16``; ``adapter_momentum=0.1``; ``reg=0.1``; ``ensemble=true``;
    ``crct_epochs=30``; ``ca_lr=0.005``; covariance statistics; 4 retrieval steps."""

    name: str = "mos"
    epochs: int = 20
    lr: float = 0.03
    batch_size: int = 48
    weight_decay: float = 5e-4
    bottleneck: int = 16
    adapter_momentum: float = 0.1
    reg: float = 0.1
    ensemble: bool = True
    ca_epochs: int = 30
    ca_lr: float = 0.005
    ca_storage: Literal["covariance", "variance"] = "covariance"
    refine_steps: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck <= 0 or self.refine_steps <= 0 or self.ca_lr <= 0:
            raise ConfigError("method.bottleneck, method.refine_steps and method.ca_lr must be > 0")
        if self.ca_epochs < 0 or self.reg < 0:
            raise ConfigError("method.ca_epochs and method.reg must be >= 0")
        if not 0 <= self.adapter_momentum <= 1:
            raise ConfigError(f"method.adapter_momentum must be in [0, 1], got {self.adapter_momentum}")


@torch.no_grad()
def adapter_mean(handles: list[TuningHandle]) -> dict[str, torch.Tensor]:
    """Parameter-wise mean of the adapter sets ``handles`` (empty for none)."""
    if not handles:
        return {}
    sets = [dict(h.module.named_parameters()) for h in handles]
    return {k: torch.stack([s[k] for s in sets]).mean(0) for k in sets[0]}


@torch.no_grad()
def merge_adapter(current: TuningHandle, target: dict[str, torch.Tensor], momentum: float) -> None:
    """``current <- (1 - momentum) current + momentum * target`` in place (no-op without a
    target: the first task has no earlier adapters)."""
    if not target or momentum == 0:
        return
    for name, p in current.module.named_parameters():
        p.mul_(1 - momentum).add_(target[name], alpha=momentum)


def orth_loss(feats: torch.Tensor, old_means: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``M M^T / 0.8`` against the identity, ``M = [old means; feats]``."""
    m = torch.cat([old_means.to(feats), feats])
    sim = m @ m.T / ORTH_TEMPERATURE
    return F.cross_entropy(sim, torch.arange(len(m), device=m.device))


@METHODS.register("mos")
class MOS(SubspaceMixin, Learner):
    config_cls = MOSConfig
    inputs = FEATURES
    test_options = {"ca_epochs": 2}

    def __init__(self, cfg: MOSConfig, backbone: Backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        self._base_fp = backbone.fingerprint()
        self.handles: list[TuningHandle] = []
        self._memo: dict[tuple[str, int], torch.Tensor] = {}
        d = self.dim = backbone.feature_dim
        self.head = IncrementalLinear(d)
        self.register_buffer("protos", torch.zeros(0, d))  # adapter-0 class means (retrieval)
        self.register_buffer("means", torch.zeros(0, d))  # class means under their task's adapter
        cov_shape = (d, d) if cfg.ca_storage == "covariance" else (d,)
        self.register_buffer("covs", torch.zeros(0, *cov_shape))
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))

    def before_task(self, task: Task) -> None:
        self.add_adapter_set(task, self.cfg.bottleneck)
        self.head.grow(task.num_new)
        n = task.num_new
        self.protos = torch.cat([self.protos, self.protos.new_zeros(n, self.dim)])
        self.means = torch.cat([self.means, self.means.new_zeros(n, self.dim)])
        self.covs = torch.cat([self.covs, self.covs.new_zeros(n, *self.covs.shape[1:])])
        self.class_task = torch.cat([self.class_task, self.class_task.new_full((n,), task.index)])

    # -- training ----------------------------------------------------------------------
    def train_task(self, task: Task) -> None:
        t, cfg = task.index, self.cfg
        h, target = self.handles[t], adapter_mean(self.handles[:t])
        if t > 0:  # continue from the previous task's adapter
            h.load_state_dict(self.handles[t - 1].state_dict())
        h.module.requires_grad_(True)
        self.to(self.device)
        data = self.ctx.data.images("train", task.classes, train_transform=True)
        old_means = self.means[: task.start]

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            feats = self.backbone(x)
            logits = F.linear(feats, self.head.weight[task.start :], self.head.bias[task.start :])
            return F.cross_entropy(logits, y - task.start) + cfg.reg * orth_loss(feats, old_means)

        groups = [{"params": h.parameters(), "lr": cfg.lr},
                  {"params": list(self.head.parameters()), "lr": cfg.lr * HEAD_LR_SCALE}]
        merge = AfterStep(lambda _: merge_adapter(h, target, cfg.adapter_momentum))  # every step
        with only(self.handles, t):
            losses = self.fit(data, step, groups, desc=f"task {t} adapter", seed=t, callbacks=[merge])
        h.module.requires_grad_(False)
        log.info("MOS task %d adapter: loss %.4f -> %.4f", t, losses[0], losses[-1])

        self.class_statistics(task)
        if t > 0 and cfg.ca_epochs > 0:
            self.align_classifier(task)

    @torch.no_grad()
    def class_statistics(self, task: Task) -> None:
        """Prototypes (adapter 0) and Gaussians (the task's adapter) of the new classes; a class
        with fewer than 3 distinct samples is shrunk towards the mean covariance of the others
        (:mod:`ptcl.heads.class_statistics`); a class without samples raises ``DataError``."""
        feats, labels = self.subspace_train(task.index, task.classes)
        proto_feats, proto_labels = self.subspace_train(0, task.classes)
        self.protos[task.start : task.end] = class_means(proto_feats, proto_labels, task.classes).to(self.protos)
        shared = SharedCovariance.of(self.covs[: task.start], COV_RIDGE)
        means, covs = class_gaussians(feats, labels, task.classes, COV_RIDGE, shared)
        for i, c in enumerate(task.classes):
            self.means[c] = means[i].to(self.means)
            self.covs[c] = (covs[i] if self.cfg.ca_storage == "covariance" else covs[i].diagonal()).to(self.covs)

    def align_classifier(self, task: Task) -> None:
        """Train the head on features sampled from every seen class's Gaussian."""
        cfg = self.cfg
        per_class = cfg.batch_size * 5
        if cfg.ca_storage == "covariance":
            chol = cholesky_factors(self.covs[: task.end]).to(self.means)
        else:
            chol = torch.diag_embed(self.covs[: task.end].sqrt())
        labels = torch.arange(task.end).repeat_interleave(per_class)
        means = self.means[: task.end]

        gen = generator(self.ctx.seed, "mos-alignment", task.index, device=means.device)

        def step(y_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # fresh samples per epoch
            return F.cross_entropy(self.head(sample_gaussians(means, chol, y, gen)), y)

        ca = dataclasses.replace(cfg, lr=cfg.ca_lr, epochs=cfg.ca_epochs, batch_size=per_class)
        losses = self.fit(TensorDataset(labels, labels), step, self.head.parameters(), cfg=ca,
                          desc=f"task {task.index} alignment", seed=1000 + task.index)
        log.info("MOS task %d classifier alignment: loss %.4f -> %.4f", task.index, losses[0], losses[-1])

    # -- inference ---------------------------------------------------------------------
    def task_of(self, logits: torch.Tensor) -> torch.Tensor:
        return self.class_task[logits.argmax(1)]

    @torch.no_grad()
    def retrieve(self, feats: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Self-refined retrieval. ``feats``: (B, tasks, D); ``start``: first-guess task per
        sample. Returns the head logits of the adapter each sample settles on."""
        rows = torch.arange(len(feats), device=feats.device)
        cur, done = start.clone(), torch.zeros_like(start, dtype=torch.bool)
        final = torch.empty(len(feats), self.head.out_features, device=feats.device)
        for it in range(self.cfg.refine_steps):
            logits = self.head(feats[rows, cur])
            final[~done] = logits[~done]
            nxt = self.task_of(logits)
            done = done | (nxt == cur) | (it + 1 == self.cfg.refine_steps)
            cur = torch.where(done, cur, nxt)
            if bool(done.all()):
                break
        return final

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        feats = x.reshape(len(x), -1, self.dim)
        orig = F.normalize(feats[:, 0], dim=1) @ F.normalize(self.protos, dim=1).T
        final = self.retrieve(feats, self.task_of(orig))
        if not self.cfg.ensemble:
            return final
        return F.softmax(final, dim=1) + F.softmax(orig * feats.shape[1], dim=1)

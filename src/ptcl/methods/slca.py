"""SLCA: Slow Learner with Classifier Alignment.

Zhang, Wang, Kang, Chen, Wei. "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model." ICCV 2023 (arXiv:2303.05118). Defaults follow the
authors' code (github.com/GengDavid/SLCA, ``models/slca.py``, ``exps/slca/*.json``).

Implemented, per task:

1. *Slow learner*: the whole backbone and a new linear head for the task's classes are
   trained with cross-entropy on the current task's data only (old classes' logits are
   masked out; old heads are frozen). SGD, the backbone's lr is the head's lr times
   ``backbone_lr_scale`` (1/100), step decay at ``milestones``. As in the official backbone
   (``convs/vits.py``, ``vit_base_patch16_224_in21k``: ``del model.norm; model.norm =
   nn.LayerNorm(768)``), the ViT's final LayerNorm (the one the pooled feature passes
   last) is not the pre-trained one but a fresh ``nn.LayerNorm`` (weight 1, bias 0, torch's
   ``eps`` 1e-5), made when the learner is built and trained with the rest of the backbone
   at the backbone's lr (``models/slca.py`` gives ``convnet.parameters()`` to that group;
   with ``backbone_lr_scale = 0`` it stays fresh); ``fresh_norm: false`` keeps the
   pre-trained norm. Checkpoints always store it.
2. *Class statistics*: mean and covariance (+ ``cov_ridge`` * I) of each new class's
   features (eval transform, current backbone). Old classes keep the statistics from the
   task that taught them (exemplar-free); they are buffers, so checkpoints restore them.
   Not in the official code: a class with fewer than 3 distinct samples (whose covariance
   is zero or rank one, so its sampled features would collapse onto its mean or a line) is
   shrunk towards the mean covariance of the classes with enough samples of this task and
   of every earlier class, with a warning (:mod:`ptcl.heads.class_statistics`); the
   Cholesky factors fall back to an eigen-decomposition where even jitter fails.
3. *Classifier alignment* (from the second task on): the heads of all seen classes are
   fine-tuned on features sampled from N(mu_c, Sigma_c) (``ca_samples`` per class and
   epoch, freshly drawn each epoch) with the logit normalisation of the official code
   (logits divided by the mean over tasks of each task's logit L2 norm and by the
   temperature ``ca_logit_norm``). The sampling loop is :mod:`ptcl.methods.alignment`,
   shared with MOS; the normalisation, mean shrinking and head copies are SLCA's own.

As in the official code, the aligned head is used for prediction, but the next task starts
from the heads before alignment (``fc.backup()``/``fc.recall()``): both are kept. Also as
in the official code (not described in the paper), the sampled means of a class learned at
task ``t`` are scaled by ``1 - s + s (t+1)/(T+1)`` at task ``T`` (``ca_mean_shrink`` = s).

The step decay is the official ``MultiStepLR`` (``scheduler=multistep``, one optimiser over
all epochs, so the SGD momentum carries across the milestones as in the official code; an
earlier ptcl version restarted training at each milestone and lost the momentum there).
``scheduler=cosine`` replaces the step decay if asked.

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/slca_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.backbones.base import Backbone
from ptcl.config import TrainConfig
from ptcl.data.features import extract_features
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.class_statistics import SharedCovariance, class_gaussians
from ptcl.heads.linear import IncrementalLinear
from ptcl.methods.alignment import classifier_alignment
from ptcl.methods.base import IMAGES, Learner
from ptcl.options import option
from ptcl.registry import METHODS

log = logging.getLogger(__name__)


_CODE = "official SLCA models/slca.py"
_EXP = "official SLCA exps/slca/slca_cifar.json"


@dataclass
class SLCAConfig(TrainConfig):
    """``lr`` is the head's learning rate; the backbone's is ``lr * backbone_lr_scale``."""

    name: str = option("slca")
    epochs: int = option(20, source=_EXP)
    lr: float = option(0.01, "learning rate of the new head (the backbone's: lr x backbone_lr_scale)",
                       source=f"{_CODE} (lrate)")
    batch_size: int = option(128, source=f"{_CODE} (PILOT exps/slca.json: 64)")
    weight_decay: float = option(5e-4, source=_CODE)
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant"] = option(
        "multistep", source=f"{_CODE} (MultiStepLR)")
    milestones: list[int] = option(factory=lambda: [18], source=_EXP)
    lr_decay: float = option(0.1, source=f"{_CODE} (lrate_decay)")
    backbone_lr_scale: float = option(
        0.01, "backbone lr = lr x this; 0: frozen backbone (the paper's 'w/o SL' ablation)", ge=0,
        source=f"{_CODE} (bcb_lrscale 1/100)")
    ca_epochs: int = option(5, "classifier-alignment epochs per task (from the second task on); 0: none", ge=0,
                            source=_EXP)
    ca_lr: float = option(0.01, "classifier-alignment learning rate (SGD, cosine)", gt=0,
                          source=f"{_CODE} (the alignment uses lrate)")
    ca_batch_size: int = option(256, "classifier-alignment batch size (sampled features)", gt=0,
                                source=f"{_CODE} (one class's samples per step)")
    ca_samples: int = option(256, "features sampled per class and alignment epoch", gt=0,
                             source=f"{_CODE} (num_sampled_pcls)")
    ca_logit_norm: float = option(0.1, "temperature of the alignment's logit normalisation; 0: plain cross-entropy",
                                  ge=0, source=f"{_EXP} (ca_with_logit_norm)")
    ca_mean_shrink: float = option(
        0.1, "s: at task T the sampled mean of a class from task t is scaled by 1 - s + s (t+1)/(T+1)",
        ge=0, lt=1, source=f"{_CODE} (0.9 + 0.1 (t+1)/(T+1))")
    cov_ridge: float = option(1e-4, "added to the diagonal of every class covariance", ge=0,
                              source="official SLCA models/base.py (_compute_class_mean)")
    fresh_norm: bool = option(
        True, "replace the ViT's pre-trained final LayerNorm by a fresh one (weight 1, bias 0, eps 1e-5), "
        "trained at the backbone's lr", source="official SLCA convs/vits.py (del model.norm; "
        "model.norm = nn.LayerNorm(768))")


def task_normalised_logits(logits: torch.Tensor, bounds: list[int], temperature: float) -> torch.Tensor:
    """SLCA's logit normalisation: ``logits / (mean_t ||logits[:, task t]||_2) / temperature``.

    ``bounds`` are the class boundaries of the tasks, ``[0, end_0, end_1, ...]``.
    """
    norms = torch.stack([logits[:, a:b].norm(dim=1) + 1e-7 for a, b in zip(bounds[:-1], bounds[1:])], 1)
    return logits / norms.mean(1, keepdim=True) / temperature


def fresh_final_norm(backbone: Backbone) -> str:
    """Replace the final LayerNorm of a timm ViT (``fc_norm`` where the model pools through
    one, else ``norm``) by a fresh ``nn.LayerNorm`` (weight 1, bias 0, torch's default
    ``eps`` 1e-5) on the same device, as the official SLCA backbone does. Returns its
    attribute name in ``backbone.model``.

    Raises :class:`ConfigError` when the backbone has no final LayerNorm (a CNN)."""
    model = backbone.model
    for name in ("fc_norm", "norm"):
        old = getattr(model, name, None)
        if isinstance(old, nn.LayerNorm):
            new = nn.LayerNorm(old.normalized_shape).to(device=old.weight.device, dtype=old.weight.dtype)
            new.requires_grad_(old.weight.requires_grad)
            setattr(model, name, new)
            return name
    raise ConfigError(f"method.fresh_norm needs a ViT whose features pass a final LayerNorm; {backbone.name} "
                      "has none: set method.fresh_norm=false")


@METHODS.register("slca")
class SLCA(Learner):
    """SLCA: a slow-learning backbone, then classifier alignment on sampled class Gaussians (Zhang et al., ICCV 2023)."""

    config_cls = SLCAConfig
    inputs = IMAGES
    test_options = {"ca_epochs": 2, "ca_samples": 16, "ca_batch_size": 16}

    def __init__(self, cfg: SLCAConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        self.updates_backbone = cfg.backbone_lr_scale > 0
        dim = backbone.feature_dim
        self.head = IncrementalLinear(dim)  # per-task heads as trained (before alignment)
        self.aligned = IncrementalLinear(dim)  # after classifier alignment: used to predict
        self.register_buffer("class_means", torch.zeros(0, dim))
        self.register_buffer("class_covs", torch.zeros(0, dim, dim))
        if cfg.fresh_norm:
            name = fresh_final_norm(backbone)
            # no longer a pre-trained tensor: checkpoints store it even with a frozen backbone
            self._pretrained_keys -= {f"backbone.model.{name}.weight", f"backbone.model.{name}.bias"}

    def before_task(self, task: Task) -> None:
        self.head.grow(task.num_new)
        self.aligned.grow(task.num_new)
        dim = self.backbone.feature_dim
        dev = self.class_means.device
        self.class_means = torch.cat([self.class_means, torch.zeros(task.num_new, dim, device=dev)])
        self.class_covs = torch.cat([self.class_covs, torch.zeros(task.num_new, dim, dim, device=dev)])

    # -- 1. slow learner ---------------------------------------------------------------
    def param_groups(self, head: nn.Module) -> list[dict]:
        """Optimiser groups: the backbone at ``lr * backbone_lr_scale``, the head at ``lr``."""
        cfg: SLCAConfig = self.cfg  # type: ignore[assignment]
        groups = [{"params": list(head.parameters()), "lr": cfg.lr}]
        if cfg.backbone_lr_scale > 0:
            groups.insert(0, {"params": list(self.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_scale})
        return groups

    def train_task(self, task: Task) -> None:
        self.to(self.device)
        dim = self.backbone.feature_dim
        new = nn.Linear(dim, task.num_new).to(self.device)
        nn.init.trunc_normal_(new.weight, std=0.02)
        nn.init.zeros_(new.bias)
        self.backbone.requires_grad_(self.updates_backbone)
        data = self.ctx.data.images("train", task.classes, train_transform=True)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(new(self.backbone(x)), y - task.start)  # current logits only

        self.fit(data, step, self.param_groups(new), desc=f"task {task.index}", seed=100 * task.index)
        self.backbone.requires_grad_(False)
        with torch.no_grad():
            self.head.weight[task.start : task.end] = new.weight
            self.head.bias[task.start : task.end] = new.bias

    # -- 2. class statistics and 3. classifier alignment ----------------------------------
    def after_task(self, task: Task) -> None:
        self.store_class_stats(task)
        self.align(task)

    @torch.no_grad()
    def store_class_stats(self, task: Task) -> None:
        """Mean and covariance of the new classes' train features (eval transform); a class
        with fewer than 3 distinct samples is shrunk towards the mean covariance of the
        others (this task's classes with enough samples and every earlier class), see
        :mod:`ptcl.heads.class_statistics`."""
        data = self.ctx.data
        ds = data.images("train", task.classes, train_transform=False)
        self.backbone.eval()
        feats = extract_features(self.backbone, ds, data.batch_size, data.num_workers, self.device,
                                 desc="slca stats", quiet=self.ctx.quiet)
        labels = torch.from_numpy(ds.labels)
        shared = SharedCovariance.of(self.class_covs[: task.start], self.cfg.cov_ridge)
        means, covs = class_gaussians(feats, labels, task.classes, self.cfg.cov_ridge, shared)
        for i, c in enumerate(task.classes):
            self.class_means[c] = means[i].to(self.class_means)
            self.class_covs[c] = covs[i].to(self.class_covs)

    def sampling_means(self, task: Task) -> torch.Tensor:
        """Class means to sample around at ``task`` (the official code's mean shrinking)."""
        s = self.cfg.ca_mean_shrink
        factor = torch.ones(task.end, 1, device=self.class_means.device)
        for t in self.ctx.scenario.tasks[: task.index + 1]:
            factor[t.start : t.end] = 1 - s + s * (t.index + 1) / (task.index + 1)
        return self.class_means[: task.end] * factor

    def alignment_init(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (``C x D``) and bias (``C``) of the seen classes' heads that the classifier
        alignment of ``task`` starts from (and that predict where it does not run). SLCA: the
        per-task heads as trained; CoFiMA overrides it with its merged heads."""
        return self.head.weight, self.head.bias

    def align(self, task: Task) -> list[float]:
        """Fine-tune the heads of all seen classes on features sampled from their Gaussians
        (:func:`ptcl.methods.alignment.classifier_alignment`) with SLCA's logit normalisation
        and mean shrinking, on a copy of :meth:`alignment_init` (the per-task heads: kept for
        the next task)."""
        cfg: SLCAConfig = self.cfg  # type: ignore[assignment]
        weight, bias = self.alignment_init(task)
        with torch.no_grad():
            self.aligned.weight.copy_(weight)
            self.aligned.bias.copy_(bias)
        if task.index == 0 or cfg.ca_epochs == 0:
            return []
        n = task.end
        head = nn.Linear(self.backbone.feature_dim, n).to(self.device)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        bounds = [0, *(t.end for t in self.ctx.scenario.tasks[: task.index + 1])]

        def normalise(logits: torch.Tensor) -> torch.Tensor:
            return task_normalised_logits(logits, bounds, cfg.ca_logit_norm)

        ca_cfg = dataclasses.replace(cfg, lr=cfg.ca_lr, batch_size=cfg.ca_batch_size, scheduler="cosine",
                                     epochs=cfg.ca_epochs)
        losses = classifier_alignment(
            self, head, self.sampling_means(task), self.class_covs[:n], cfg.ca_samples, ca_cfg,
            stream="slca-alignment", task=task.index, seed=100 * task.index + 99, desc=f"align {task.index}",
            logits=normalise if cfg.ca_logit_norm > 0 else None,
        )
        with torch.no_grad():
            self.aligned.weight.copy_(head.weight)
            self.aligned.bias.copy_(head.bias)
        return losses

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.aligned(self.backbone(x))

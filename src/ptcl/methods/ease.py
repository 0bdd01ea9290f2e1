"""EASE: an expandable ensemble of per-task adapter subspaces with prototype complement.

Zhou, Sun, Ye, Zhan. "Expandable Subspace Ensemble for Pre-Trained Model-Based
Class-Incremental Learning." CVPR 2024 (arXiv:2403.12030). Official code:
github.com/sun-hailong/CVPR24-Ease (also LAMDA-PILOT ``models/ease.py``).

Implemented as in the official code (defaults of its ``exps/ease_cifar_in21k.json``):

* every task ``t`` attaches a fresh AdaptFormer adapter set (bottleneck 64, scale 0.1,
  dropout 0.1, "lora" init) trained with a temporary cosine head (learnable scale) and
  cross-entropy on the task's images, with every other adapter set bypassed; it is
  frozen afterwards;
* the feature of an image is the concatenation of the ``[CLS]`` features of the ViT run
  with one adapter set at a time (``use_init_ptm=false``: no pre-trained sub-space);
* after task ``t`` the new classes' prototypes (class means, eval transform) are written in
  every sub-space ``0..t``; old classes' prototypes in the sub-spaces of later tasks are
  synthesised by the semantic-guided complement: for old task ``i`` and later sub-space
  ``d``, with reference classes ``R`` (classes of tasks ``>= d``), ``P[c, d] = sum_r
  softmax_r(cos(P[c, i], P[r, i])) P[r, d]`` (``recalc_sim=true`` recomputes every pair
  ``i < d <= t`` each task; ``false`` fills only the new sub-space, the paper's Eq.);
* prediction: cosine per sub-space, re-weighted: a class's own task's sub-space has weight
  1, each other sub-space ``alpha / t`` (``forward_reweight``, ``alpha=0.1``).

Each sub-space's features of the selected train and test images are extracted once, after
its task, and cached on disk under a hash of the pre-trained weights and that adapter's
weights, so a run costs one backbone pass per adapter. Only the new classes' training
features are ever used (exemplar-free). Not implemented: the optional pre-trained sub-space
(``use_init_ptm``/``beta``) and the exemplar variant (``use_old_data``).

The adapter sets are :class:`ptcl.experts.Experts` keyed by task (shared with MOS): one
active at a time, each sub-space's features cached on disk.

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/ease_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptcl.backbones.base import Backbone
from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.experts import Experts, subspace_reweight
from ptcl.heads.class_statistics import class_means
from ptcl.methods.adapt import temporary_head
from ptcl.methods.base import FEATURES, Learner, require_vit
from ptcl.options import option
from ptcl.registry import METHODS

log = logging.getLogger(__name__)


def complement(old_i: torch.Tensor, ref_i: torch.Tensor, ref_d: torch.Tensor) -> torch.Tensor:
    """Prototypes of old classes in a new sub-space ``d``: each row of ``old_i`` (old classes
    in their own sub-space ``i``) mixes the rows of ``ref_d`` (reference classes in ``d``) with
    weights ``softmax(cos(old_i, ref_i))`` over the reference classes (official code, no
    temperature)."""
    sim = F.normalize(old_i, dim=1) @ F.normalize(ref_i, dim=1).T
    return F.softmax(sim, dim=1) @ ref_d


# --------------------------------------------------------------------- method
_OFFICIAL = "official EASE exps/ease_cifar_in21k.json (CVPR24-Ease)"


@dataclass
class EASEConfig(TrainConfig):
    """Official defaults (CVPR24-Ease ``exps/ease_cifar_in21k.json``): 20 epochs per task,
    SGD lr 0.025, momentum 0.9, batch 48, weight decay 5e-4, cosine; ``ffn_num=64``;
    ``alpha=0.1``; ``recalc_sim=true``. ``head_scale``: initial scale of each task's
    temporary cosine head (official: 1; see :func:`ptcl.methods.adapt.temporary_head`)."""

    name: str = option("ease")
    epochs: int = option(20, source=_OFFICIAL)
    lr: float = option(0.025, source=_OFFICIAL)
    batch_size: int = option(48, source=_OFFICIAL)
    weight_decay: float = option(5e-4, source=_OFFICIAL)
    bottleneck: int = option(64, "bottleneck width of each task's AdaptFormer adapter", gt=0,
                             source=f"{_OFFICIAL} (ffn_num)")
    alpha: float = option(0.1, "prediction weight alpha / t of the sub-spaces other than a class's own (own: 1)",
                          ge=0, source=_OFFICIAL)
    recalc_sim: bool = option(True, "recompute every old class's prototype complement in every later sub-space "
                              "each task; false: fill only the new sub-space (the paper's Eq.)", source=_OFFICIAL)
    head_scale: float = option(1.0, "initial scale of each task's temporary cosine head (learnable)", gt=0,
                               source="official EASE code (CosineLinear sigma starts at 1)")


@METHODS.register("ease")
class EASE(Learner):
    """EASE: per-task adapter sub-spaces, old prototypes completed by semantic similarity (Zhou et al., CVPR 2024)."""

    config_cls = EASEConfig
    inputs = FEATURES

    def __init__(self, cfg: EASEConfig, backbone: Backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        require_vit(backbone, "EASE")  # at set-up, before the run folder exists
        self.experts = Experts(backbone, ctx.data)  # adapter set of task t under key t
        self.dim = backbone.feature_dim
        self.register_buffer("protos", torch.zeros(0, 0, self.dim))  # (classes, sub-spaces, D)
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))

    def before_task(self, task: Task) -> None:
        require_vit(self.backbone, "EASE")
        self.experts.add(task.index, "adapter", bottleneck=self.cfg.bottleneck)
        c, s = self.protos.shape[:2]
        grown = self.protos.new_zeros(task.end, s + 1, self.dim)
        grown[:c, :s] = self.protos
        self.protos = grown
        self.class_task = torch.cat([self.class_task, self.class_task.new_full((task.num_new,), task.index)])

    def train_task(self, task: Task) -> None:
        t = task.index
        head = temporary_head(self.dim, task.num_new, self.cfg.head_scale)
        self.to(self.device)
        head.to(self.device)
        data = self.ctx.data.images("train", task.classes, train_transform=True)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(self.backbone(x)), y - task.start)

        with self.experts.training(t) as h:
            losses = self.fit(data, step, [*h.parameters(), *head.parameters()],
                              desc=f"task {t} adapter", seed=t)
        log.info("EASE task %d adapter: loss %.4f -> %.4f", t, losses[0], losses[-1])

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        t = task.index
        for s in range(t + 1):  # new classes: real prototypes in every sub-space
            feats, labels = self.experts.features("train", task.classes, [s])
            self.protos[task.start : task.end, s] = class_means(feats, labels, task.classes).to(self.protos)
        for i in range(t):  # old tasks: synthesised prototypes in later sub-spaces
            old = (self.class_task == i).nonzero().squeeze(1)
            for d in range(i + 1, t + 1) if self.cfg.recalc_sim else [t]:
                ref = (self.class_task >= d).nonzero().squeeze(1)
                self.protos[old, d] = complement(self.protos[old, i], self.protos[ref, i], self.protos[ref, d])

    def features(self, split: str, classes: Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated features of every adapter sub-space (``S * D`` columns)."""
        return self.experts.features(split, classes)

    def inference_cost(self) -> dict[str, int]:
        """An ensemble: one backbone pass per adapter set (the feature concatenates every
        sub-space's), so the cost grows by one pass per task."""
        n = len(self.experts)
        return {**super().inference_cost(), "backbone_passes": n, "experts_run": n}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        s = self.protos.shape[1]
        xs = F.normalize(x.view(len(x), s, self.dim), dim=2)
        cos = torch.einsum("bsd,csd->bcs", xs, F.normalize(self.protos, dim=2))
        return subspace_reweight(cos, self.class_task, self.cfg.alpha)

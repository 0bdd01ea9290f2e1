"""DER: a new feature extractor per task, features concatenated, exemplar rehearsal.

Yan, Xie, He. "DER: Dynamically Expandable Representation for Class Incremental Learning."
CVPR 2021. Official code: https://github.com/Rhyssiyan/DER-ClassIL.pytorch; the reference for
pre-trained backbones is LAMDA-PILOT ``models/der.py``, ``utils/inc_net.py`` ``DERNet`` and
``exps/der.json``.

Per task ``t`` (PILOT ``DERNet.update_fc`` and ``models/der.py``):

* **a new extractor**: from the second task on, the extractors so far are frozen
  (``requires_grad`` off, and kept in eval mode while the model trains, so their
  BatchNorm statistics and dropout stay fixed, as PILOT's ``Learner.train`` does) and a new
  one is appended whose weights are a **copy of the previous extractor** (PILOT builds a
  pre-trained backbone and loads ``backbones[-2]``'s state into it). The first extractor is
  ``self.backbone`` itself; the later ones live in ``self.extractors`` (an ``nn.ModuleList``
  grown in :meth:`DER.before_task`, so ``--resume`` rebuilds the same module tree);
* **features**: the concatenation of every extractor's pooled features,
  ``(B, D * (t + 1))`` (``D``: one extractor's width); the head, the exemplar herding and the
  nearest-mean-of-exemplars classifier all use it (PILOT ``extract_vector``);
* **the head** over the concatenated features grows: a new linear layer over the wider
  features and all seen classes whose block ``[:old classes, :old width]`` is copied from
  the previous head; the rest (new classes, and the old classes' weights on the new
  extractor's features) is freshly initialised as PILOT's ``SimpleLinear``
  (``kaiming_uniform_(nonlinearity="linear")``, zero bias). The whole head trains;
* **the auxiliary head** (from the second task on): a fresh linear layer on the **new
  extractor's features only**, over the task's new classes plus one "old" class; its
  targets map every old class to 0 and new class ``c`` to ``c - known + 1``
  (:func:`aux_targets`). Loss: ``CE(head) + aux_weight * CE(aux head)`` over the task's
  images and the exemplars (PILOT: weight 1);
* **the memory** (:mod:`ptcl.methods.rehearsal`): after training, herding on the
  concatenated features, budgets as PILOT; NME is recorded beside the CNN accuracy.

Where ptcl differs from PILOT / the paper:

* the paper's channel masks with the sparsity loss and the pruning, and its second,
  class-balanced classifier re-learning stage, are not implemented, as in PILOT (its
  ``models/der.py`` says so);
* weight aligning (WA, Zhao et al. CVPR 2020: the new classes' head rows rescaled to the
  old rows' mean norm) is commented out in PILOT ``models/der.py``; here it is the option
  ``weight_align`` (default false: PILOT's behaviour);
* PILOT builds an auxiliary head in the first task too but never uses it there; ptcl
  builds it from the second task on (``aux_head`` is ``None`` in the first task);
* the head's old classes keep their old rows over the old features (as PILOT); the
  initialisation of the new parts draws from the run's seeded generator, not PILOT's.

Defaults: LAMDA-PILOT ``exps/der.json`` (ViT-B/16, CIFAR-100 B0 Inc10): 10 epochs per task
(``init_epoch``, ``epochs``), SGD lr 1e-3, momentum 0.9, batch 32, weight decay 5e-4 on the
first task and 2e-4 after, step decay by 0.1 at milestones beyond the 10 epochs (so a
constant lr), memory 2000 shared. PILOT's ``T: 2`` is not read by ``models/der.py``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.backbones.base import Backbone
from ptcl.data.scenario import Task
from ptcl.heads.linear import IncrementalLinear, expand_linear, simple_linear, weight_align
from ptcl.methods.rehearsal import RehearsalConfig, RehearsalLearner
from ptcl.options import option
from ptcl.registry import METHODS

log = logging.getLogger("ptcl.methods.der")

_PILOT = "LAMDA-PILOT exps/der.json"


@dataclass
class DERConfig(RehearsalConfig):
    name: str = option("der")
    epochs: int = option(10, "training epochs per task after the first", gt=0, source=f"{_PILOT} (epochs)")
    lr: float = option(1e-3, "learning rate after the first task", gt=0, source=f"{_PILOT} (lrate)")
    batch_size: int = option(32, "training batch size", gt=0, source=_PILOT)
    weight_decay: float = option(2e-4, "weight decay after the first task", ge=0, source=_PILOT)
    milestones: list[int] = option(help="multistep milestones after the first task (beyond the epochs: constant)",
                                   gt=0, factory=lambda: [80, 120, 150], source=_PILOT)
    lr_decay: float = option(0.1, "multistep lr factor", gt=0, source=f"{_PILOT} (lrate_decay)")
    init_epochs: int | None = option(10, "epochs of the first task", gt=0, source=f"{_PILOT} (init_epoch)")
    init_lr: float | None = option(1e-3, "learning rate of the first task", gt=0, source=_PILOT)
    init_weight_decay: float | None = option(5e-4, "weight decay of the first task", ge=0, source=_PILOT)
    init_milestones: list[int] | None = option(help="multistep milestones of the first task", gt=0,
                                               factory=lambda: [60, 120, 170], source=_PILOT)
    init_lr_decay: float | None = option(0.1, "multistep lr factor of the first task", gt=0, source=_PILOT)
    aux_weight: float = option(
        1.0, "weight of the auxiliary loss (new extractor's features -> new classes + one 'old' class) from the "
        "second task on", ge=0, source="LAMDA-PILOT models/der.py (loss_clf + loss_aux; the paper's lambda_a)")
    weight_align: bool = option(
        False, "after each task from the second on, rescale the new classes' head rows to the old rows' mean norm "
        "(WA)", source="LAMDA-PILOT utils/inc_net.py DERNet.weight_align (commented out in models/der.py)")



def aux_targets(y: torch.Tensor, known: int) -> torch.Tensor:
    """The auxiliary head's targets ``(B,)`` for labels ``y`` ``(B,)``: 0 for an old class
    (``y < known``), ``y - known + 1`` for a new one (PILOT ``models/der.py``
    ``_update_representation``)."""
    return torch.where(y >= known, y - known + 1, torch.zeros_like(y))


@METHODS.register("der")
class DER(RehearsalLearner):
    """DER: one extractor per task, concatenated features, rehearsal (Yan et al., CVPR 2021)."""

    config_cls = DERConfig

    def __init__(self, cfg: DERConfig, backbone: Backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        backbone.requires_grad_(True)
        self.extractors = nn.ModuleList()
        self.head: IncrementalLinear | None = None
        self.aux_head: IncrementalLinear | None = None

    # -- structure -----------------------------------------------------------------------
    def all_extractors(self) -> list[Backbone]:
        """Every extractor in task order: ``self.backbone`` first."""
        return [self.backbone, *self.extractors]  # type: ignore[list-item]

    @property
    def feature_dim(self) -> int:
        """Width of the concatenated features: one extractor's width per extractor."""
        return self.backbone.feature_dim * len(self.all_extractors())

    def before_task(self, task: Task) -> None:
        """Freeze the old extractors and append a copy of the last one (from the second task
        on), then grow the head and build the auxiliary head. Deterministic structure:
        replayed on ``--resume`` before the checkpoint is loaded."""
        if task.index > 0:
            last = self.all_extractors()[-1]
            for extractor in self.all_extractors():
                extractor.requires_grad_(False)
                for p in extractor.parameters():  # the last task's gradients: memory only
                    p.grad = None
            new = copy.deepcopy(last)
            new.requires_grad_(True)
            self.extractors.append(new)
        device = next(self.backbone.parameters()).device
        self.head = expand_linear(self.head, self.feature_dim, task.end, device)
        width = self.backbone.feature_dim
        self.aux_head = simple_linear(width, task.num_new + 1, device) if task.index > 0 else None
        log.debug("DER task %d: %d extractors, feature width %d", task.index, len(self.all_extractors()),
                  self.feature_dim)

    def train(self, mode: bool = True) -> DER:
        """As ``nn.Module.train``, but the old extractors (all but the last) stay in eval
        mode (PILOT ``models/der.py`` ``Learner.train``: BatchNorm statistics of old
        extractors are not updated)."""
        super().train(mode)
        if mode:
            for extractor in self.all_extractors()[:-1]:
                extractor.eval()
        return self

    # -- forward -------------------------------------------------------------------------
    def features_per_extractor(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each extractor's features ``(B, D)`` of images ``x`` (uint8 or normalised)."""
        if x.dtype == torch.uint8:  # normalise once: every extractor shares the preprocessing
            x = self.backbone.normalize(x)
        return [extractor(x) for extractor in self.all_extractors()]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated features ``(B, feature_dim)`` (PILOT ``DERNet.extract_vector``)."""
        return torch.cat(self.features_per_extractor(x), dim=1)

    # -- training ------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """``CE(head(concat features), y)`` plus, from the second task on,
        ``aux_weight * CE(aux_head(new extractor's features), aux_targets(y, task.start))``."""
        feats = self.features_per_extractor(x)
        loss = F.cross_entropy(self.head(torch.cat(feats, dim=1)), y)  # type: ignore[misc]
        if self.aux_head is not None:
            aux = F.cross_entropy(self.aux_head(feats[-1]), aux_targets(y, task.start))
            loss = loss + self.cfg.aux_weight * aux  # type: ignore[attr-defined]
        return loss

    def train_task(self, task: Task) -> None:
        self.to(self.device)
        params = [p for p in self.parameters() if p.requires_grad]
        self.fit_task(task, lambda x, y: self.loss(x, y, task), params)
        if self.cfg.weight_align and task.index > 0:  # type: ignore[attr-defined]
            gamma = weight_align(self.head.weight, task.num_new)  # type: ignore[union-attr]
            log.info("DER task %d: weight aligning, gamma %.4f", task.index, gamma)

    def after_task(self, task: Task) -> None:
        self.update_memory(task)

    def inference_cost(self) -> dict[str, int]:
        """One full pass of every extractor per image; the parameters used to predict
        (extractors and head; the auxiliary head only trains)."""
        n = len(self.all_extractors())
        aux = {id(p) for p in self.aux_head.parameters()} if self.aux_head is not None else set()
        params = sum(p.numel() for p in self.parameters() if id(p) not in aux)
        return {"backbone_passes": n, "experts_run": n, "parameters": params}

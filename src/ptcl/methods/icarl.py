"""iCaRL: exemplar rehearsal, distillation from the previous model, nearest-mean-of-exemplars.

Rebuffi, Kolesnikov, Sperl, Lampert. "iCaRL: Incremental Classifier and Representation
Learning." CVPR 2017. Official code: https://github.com/srebuffi/iCaRL (Theano/TensorFlow);
the reference for pre-trained backbones is LAMDA-PILOT ``models/icarl.py`` and
``exps/icarl.json``.

Per task: the model (the whole backbone and a growing linear head) trains on the task's
images plus the exemplars; from the second task on the previous model (a frozen
:class:`~ptcl.train.snapshot.Snapshot`, the teacher) supplies distillation targets; then the
new classes' exemplars are chosen by herding on the trained model's features, the old ones
shrink to the budget, and the class means of the exemplars give the nearest-mean-of-exemplars
classifier (:mod:`ptcl.methods.rehearsal`).

Two losses (``loss``):

* ``bce`` (the paper, Alg. 3, and its official code; default): binary cross-entropy with
  sigmoid outputs over all seen classes, whose targets are the one-hot label for the new
  classes' outputs and the **teacher's sigmoid outputs** for the old classes' outputs (for
  every sample, exemplars included); the mean over samples and outputs, as the official
  ``sigmoid_cross_entropy_with_logits`` + ``reduce_mean``;
* ``ce_kd`` (LAMDA-PILOT): cross-entropy over all seen classes plus the softmax
  distillation ``-sum softmax(teacher / T) * log_softmax(old logits / T)`` per sample
  (``T = 2``), averaged over the batch. ``ptcl run --pilot-config exps/icarl.json`` selects it
  (and ``classifier: cnn``: PILOT's headline curve is the CNN's, NME beside it).

Classification (``classifier``): ``nme`` (the paper's nearest mean of exemplars; default);
the trained head's (CNN) accuracy is recorded beside it (``metrics.json`` ``variants.cnn``),
as PILOT reports both.

The head grows as PILOT's ``IncrementalNet.update_fc``: a new ``SimpleLinear`` layer
(Kaiming-uniform weights, zero bias) with the old rows copied.

Defaults: LAMDA-PILOT ``exps/icarl.json`` (ViT-B/16): 20 epochs at SGD lr 1e-3 (momentum 0.9)
per task, batch 128, weight decay 5e-4 on the first task and 2e-4 after, step decay by 0.1
at milestones that lie beyond the 20 epochs (so a constant lr), memory 2000 shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ptcl.data.scenario import Task
from ptcl.heads.linear import IncrementalLinear, expand_linear
from ptcl.methods.rehearsal import Classifier, RehearsalConfig, RehearsalLearner, softmax_kd
from ptcl.options import option
from ptcl.registry import METHODS

_PILOT = "LAMDA-PILOT exps/icarl.json"


@dataclass
class ICaRLConfig(RehearsalConfig):
    name: str = option("icarl")
    epochs: int = option(20, "training epochs per task after the first", gt=0, source=f"{_PILOT} (epochs)")
    lr: float = option(1e-3, "learning rate after the first task", gt=0, source=f"{_PILOT} (lrate)")
    batch_size: int = option(128, "training batch size", gt=0, source=_PILOT)
    weight_decay: float = option(2e-4, "weight decay after the first task", ge=0, source=_PILOT)
    milestones: list[int] = option(help="multistep milestones after the first task (beyond the epochs: constant)",
                                   gt=0, factory=lambda: [80, 120], source=_PILOT)
    lr_decay: float = option(0.1, "multistep lr factor", gt=0, source=f"{_PILOT} (lrate_decay)")
    init_epochs: int | None = option(20, "epochs of the first task", gt=0, source=f"{_PILOT} (init_epoch)")
    init_lr: float | None = option(1e-3, "learning rate of the first task", gt=0, source=_PILOT)
    init_weight_decay: float | None = option(5e-4, "weight decay of the first task", ge=0, source=_PILOT)
    init_milestones: list[int] | None = option(help="multistep milestones of the first task", gt=0,
                                               factory=lambda: [60, 120, 170], source=_PILOT)
    init_lr_decay: float | None = option(0.1, "multistep lr factor of the first task", gt=0, source=_PILOT)
    loss: Literal["bce", "ce_kd"] = option(
        "bce", "bce: sigmoid BCE, old classes' targets = the teacher's sigmoid outputs (paper); ce_kd: "
        "cross-entropy + softmax distillation at temperature T (LAMDA-PILOT)",
        source="Rebuffi et al., CVPR 2017, Alg. 3 (PILOT models/icarl.py: ce_kd)")
    T: float = option(2.0, "ce_kd: distillation temperature", gt=0, source=f"{_PILOT} (T)")
    classifier: Classifier = option(
        "nme", "the classifier whose accuracy the run reports: nme (nearest mean of exemplars, the paper's) or "
        "cnn (the trained head); the other one's is recorded under metrics.json variants",
        source="Rebuffi et al., CVPR 2017, Sec. 2.1")


def bce_targets(y: torch.Tensor, teacher_logits: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """iCaRL's BCE targets ``(B, num_classes)``: one-hot labels ``y`` ``(B,)``, with the
    first ``K`` columns replaced by ``sigmoid(teacher_logits)`` (``(B, K)``, the previous
    model's outputs for the old classes) where a teacher is given."""
    target = F.one_hot(y, num_classes).float()
    if teacher_logits is not None:
        target[:, : teacher_logits.shape[1]] = torch.sigmoid(teacher_logits.float())
    return target


@METHODS.register("icarl")
class ICaRL(RehearsalLearner):
    """iCaRL: rehearsal + distillation + nearest-mean-of-exemplars (Rebuffi et al., CVPR 2017)."""

    config_cls = ICaRLConfig

    def __init__(self, cfg: ICaRLConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        backbone.requires_grad_(True)
        self.head: IncrementalLinear | None = None

    def before_task(self, task: Task) -> None:
        self.take_teacher(task)
        # PILOT's IncrementalNet.update_fc: a SimpleLinear head (Kaiming-uniform, zero bias), old rows copied
        device = next(self.backbone.parameters()).device
        self.head = expand_linear(self.head, self.backbone.feature_dim, task.end, device)

    def train_task(self, task: Task) -> None:
        self.to(self.device)
        self.fit_task(task, lambda x, y: self.loss(x, y, task), self.parameters())

    def after_task(self, task: Task) -> None:
        self.update_memory(task)

    def loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """The task's loss on a batch (see the module docstring)."""
        cfg: ICaRLConfig = self.cfg  # type: ignore[assignment]
        logits = self.cnn_logits(x)
        old = None
        if self.teacher is not None:
            with torch.no_grad():
                old = self.teacher.module.cnn_logits(x)  # type: ignore[operator]
        if cfg.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), bce_targets(y, old, logits.shape[1]))
        loss = F.cross_entropy(logits, y)
        if old is not None:
            loss = loss + softmax_kd(logits[:, : old.shape[1]], old, cfg.T)
        return loss

"""FOSTER: feature boosting and compression for class-incremental learning.

Wang, Zhou, Ye, Zhan. "FOSTER: Feature Boosting and Compression for Class-Incremental
Learning." ECCV 2022. Official code: https://github.com/G-U-N/ECCV22-FOSTER; the reference
for pre-trained backbones is LAMDA-PILOT ``models/foster.py``, ``utils/inc_net.py``
(``FOSTERNet``) and ``exps/foster.json``.

The kept model is one extractor (``backbone``) and a linear head (``head``) over the seen
classes, plus the exemplar memory (:mod:`ptcl.methods.rehearsal`). Per task:

* **task 0**: the extractor and the head train with cross-entropy (``init_epochs``,
  ``init_lr``, ``init_weight_decay``);
* **boosting** (later tasks, ``epochs``): ``before_task`` builds a two-extractor model
  (:class:`BoostedNet`, PILOT's ``FOSTERNet`` after ``update_fc``): the old extractor
  (frozen, eval mode), a new extractor initialised as a copy of it, a head ``fc`` over the
  concatenated features ``[old, new]`` (``2 D``) and all seen classes (its old classes'
  block on the old features copied from the old head, the rest freshly initialised),
  ``fe_fc`` (new features -> all seen classes) and ``oldfc`` (the old head, frozen). Loss
  per batch (``K`` old classes, ``w`` the class-balanced weights of ``beta1``,
  :func:`class_balanced_weights`)::

      CE(logits / w, y) + CE(fe_logits, y) + lambda_okd * KD_T(logits[:, :K], old_logits)

  with ``KD_T(a, b) = -sum softmax(b / T) log_softmax(a / T)`` averaged over the batch.
  ``oofc`` ``az`` zeroes (and keeps at zero) the new classes' weights on the old features;
  ``ft`` trains them. ``is_teacher_wa`` rescales the new classes' rows of ``fc`` after
  boosting (weight aligning, :func:`weight_align`);
* **compression** (``compression_epochs``): the kept model (the student: the old extractor
  and the old head with new rows, i.e. PILOT's fresh ``_snet`` loaded with
  ``backbones[0]`` and ``copy_fc(oldfc)``) learns from the boosted model's logits with the
  balanced distillation of ``beta2`` (:func:`balanced_kd`), SGD at ``lr`` without weight
  decay (``compression_weight_decay``); ``is_student_wa`` weight-aligns its head after.
  The two-extractor model is then dropped: after every task the model has exactly one
  extractor, so a checkpoint holds the student only and ``before_task`` of the next task
  rebuilds the boosted model from it (``load_checkpoint_state`` drops a boosted model left
  by the replayed ``before_task``);
* the memory is updated with the student (herding on its features) and the NME means
  recomputed.

Where ptcl differs from PILOT:

* **the student is the evaluated model**. PILOT keeps the two-extractor teacher as
  ``_network`` until the next task starts, so its reported CNN/NME accuracy and its exemplar
  selection after task ``t >= 1`` use the teacher (2 extractors, ``2 D``-dim features); the
  compressed student's accuracy is only logged ("darknet eval"). Here the run reports the
  student (one extractor: the cost FOSTER's compression is for), and herding / NME use its
  features;
* the class counts of the balanced weights are the samples the task actually trains on:
  the exemplars held per old class and the training images per new class (PILOT: the
  budget ``memory_per_class`` or ``memory_size // K`` per old class, and 500 per new class
  on CIFAR-100, hard-coded). They agree whenever every class has at least the budget's images;
* the compression stage shuffles its data with the same seed as the boosting stage (PILOT:
  one loader that keeps shuffling);
* ``epochs`` is PILOT's ``boosting_epochs``;
* the boosted model holds its own copy of the old extractor from ``before_task`` on, so a
  task holds three extractors (the kept one, the old and the new) in both stages (PILOT: two
  while boosting, three while compressing).

Defaults: LAMDA-PILOT ``exps/foster.json`` (ViT-B/16, CIFAR-100): 20 epochs per stage, SGD
lr 1e-3 (momentum 0.9) with per-epoch cosine annealing, batch 32, weight decay 5e-4 (none in
compression), beta1 0.96, beta2 0.97, T 2, lambda_okd 1, oofc ``ft``, no weight aligning,
20 exemplars per class (``fixed_memory`` true).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptcl.data.scenario import Task
from ptcl.heads.linear import IncrementalLinear, simple_linear, weight_align
from ptcl.methods.rehearsal import RehearsalConfig, RehearsalLearner, softmax_kd
from ptcl.options import option
from ptcl.registry import METHODS

log = logging.getLogger(__name__)

_PILOT = "LAMDA-PILOT exps/foster.json"
_CODE = "LAMDA-PILOT models/foster.py"


@dataclass
class FOSTERConfig(RehearsalConfig):
    """FOSTER's options: PILOT ``exps/foster.json``'s keys (``boosting_epochs`` is ``epochs``)."""

    name: str = option("foster")
    epochs: int = option(20, "boosting epochs of every task after the first", gt=0,
                         source=f"{_PILOT} (boosting_epochs)")
    lr: float = option(1e-3, "learning rate of boosting and compression (tasks after the first)", gt=0,
                       source=f"{_PILOT} (lr)")
    batch_size: int = option(32, "training batch size", gt=0, source=f"{_PILOT} (batch_size)")
    weight_decay: float = option(5e-4, "weight decay of boosting (tasks after the first)", ge=0,
                                 source=f"{_PILOT} (weight_decay)")
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant", "coda_cosine"] = option(
        "cosine", source=f"{_CODE} (CosineAnnealingLR, T_max = the stage's epochs)")
    init_epochs: int | None = option(20, "epochs of the first task", gt=0, source=f"{_PILOT} (init_epochs)")
    init_lr: float | None = option(1e-3, "learning rate of the first task", gt=0, source=f"{_PILOT} (init_lr)")
    init_weight_decay: float | None = option(5e-4, "weight decay of the first task", ge=0,
                                             source=f"{_PILOT} (init_weight_decay)")
    init_milestones: list[int] | None = option(None, source=f"{_CODE} (cosine schedule: no milestones)")
    init_lr_decay: float | None = option(None, source=f"{_CODE} (cosine schedule: no step decay)")
    memory_size: int = option(2000, source=f"{_PILOT} (memory_size)")
    memory_per_class: int = option(20, source=f"{_PILOT} (memory_per_class)")
    fixed_memory: bool = option(True, source=f"{_PILOT} (fixed_memory)")
    compression_epochs: int = option(20, "epochs of the compression (distillation into one extractor)", gt=0,
                                     source=f"{_PILOT} (compression_epochs)")
    compression_weight_decay: float = option(
        0.0, "weight decay of the compression", ge=0,
        source=f"{_CODE} _feature_compression (SGD without weight_decay)")
    beta1: float = option(0.96, "boosting: beta of the class-balanced weights (effective number of samples) "
                          "that divide the logits of the cross-entropy", gt=0, lt=1, source=f"{_PILOT} (beta1)")
    beta2: float = option(0.97, "compression: beta of the class-balanced weights of the balanced distillation",
                          gt=0, lt=1, source=f"{_PILOT} (beta2)")
    T: float = option(2.0, "distillation temperature (boosting KD and compression)", gt=0, source=f"{_PILOT} (T)")
    lambda_okd: float = option(1.0, "boosting: weight of the distillation from the old model", ge=0,
                               source=f"{_PILOT} (lambda_okd)")
    oofc: Literal["ft", "az"] = option(
        "ft", "boosting: the new classes' weights on the old extractor's features: ft trains them, az keeps "
        "them at zero", source=f"{_PILOT} (oofc)")
    is_teacher_wa: bool = option(False, "weight-align the boosted model's head after boosting",
                                 source=f"{_PILOT} (is_teacher_wa)")
    is_student_wa: bool = option(False, "weight-align the student's head after compression",
                                 source=f"{_PILOT} (is_student_wa)")
    wa_value: float = option(1.0, "weight aligning: gamma is multiplied by wa_value ** (old / new classes)",
                             gt=0, source=f"{_PILOT} (wa_value)")


# -- the pieces of the losses ------------------------------------------------------------------


def class_balanced_weights(counts: torch.Tensor | np.ndarray | list[int], beta: float) -> torch.Tensor:
    """FOSTER's per-class weights ``(C,)`` from the samples per class ``counts`` ``(C,)``
    (Cui et al.'s effective number of samples, PILOT ``models/foster.py`` ``_train``):
    ``w_c = (1 - beta) / (1 - beta ** n_c)``, rescaled to sum to ``C``. Rarer classes get the
    larger weight. Raises ``ValueError`` for a class without samples."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if n.dim() != 1 or len(n) == 0 or bool((n < 1).any()):
        raise ValueError(f"class_balanced_weights needs >= 1 sample per class, got {n.tolist()}")
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(n)).float()


def balanced_kd(logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor, T: float) -> torch.Tensor:
    """PILOT's ``BKD`` (FOSTER's compression loss): the teacher's ``softmax(teacher / T)``
    ``(B, C)`` times the class weights ``(C,)``, renormalised per sample, is the target of
    ``-sum_c target_c log_softmax(logits / T)_c``, summed over classes and averaged over the batch."""
    target = torch.softmax(teacher_logits / T, 1) * weights.to(teacher_logits)
    target = target / target.sum(1, keepdim=True)
    return -(target * torch.log_softmax(logits / T, 1)).sum() / len(logits)


def pilot_init_rows(head: IncrementalLinear, start: int) -> None:
    """Re-initialise the rows ``start:`` of ``head`` as PILOT's ``SimpleLinear`` does
    (``kaiming_uniform_(nonlinearity="linear")``: uniform in ``+-sqrt(3 / in)``; bias 0)."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight[start:], nonlinearity="linear")
        if head.bias is not None:
            head.bias[start:] = 0.0


class BoostOutput(NamedTuple):
    logits: torch.Tensor
    """``(B, seen classes)``: ``fc`` on the concatenated features."""
    fe_logits: torch.Tensor
    """``(B, seen classes)``: ``fe_fc`` on the new extractor's features."""
    old_logits: torch.Tensor
    """``(B, old classes)``: the old head on the old extractor's features (no gradient)."""


class BoostedNet(nn.Module):
    """The boosting stage's two-extractor model (PILOT ``FOSTERNet`` after ``update_fc``).

    Built from the kept model: ``old_backbone`` (a frozen copy of the kept extractor),
    ``new_backbone`` (a trainable copy of it: PILOT loads ``backbones[-2]``'s state into the
    new one), ``oldfc`` (a frozen copy of the kept head, ``K`` classes), ``fc``
    (``2 D -> num_classes``, PILOT-initialised, its block ``[:K, :D]`` copied from the old
    head) and ``fe_fc`` (``D -> num_classes``)."""

    def __init__(self, backbone: nn.Module, head: IncrementalLinear, num_classes: int) -> None:
        super().__init__()
        d = head.in_features
        k = head.out_features
        self.old_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.new_backbone = copy.deepcopy(backbone).requires_grad_(True)
        self.oldfc = copy.deepcopy(head).requires_grad_(False)
        self.fc = simple_linear(2 * d, num_classes)
        self.fe_fc = simple_linear(d, num_classes)
        with torch.no_grad():
            self.fc.weight[:k, :d] = head.weight
            if head.bias is not None:
                self.fc.bias[:k] = head.bias
        self.feature_dim = d

    def forward(self, x: torch.Tensor) -> BoostOutput:
        """``x``: images as :meth:`Backbone.forward` takes them."""
        with torch.no_grad():
            old = self.old_backbone(x)
            old_logits = self.oldfc(old)
        new = self.new_backbone(x)
        return BoostOutput(self.fc(torch.cat([old, new], 1)), self.fe_fc(new), old_logits)

    def trainable(self) -> list[nn.Parameter]:
        """What boosting trains: the new extractor, ``fc`` and ``fe_fc``."""
        return [*self.new_backbone.parameters(), *self.fc.parameters(), *self.fe_fc.parameters()]


@METHODS.register("foster")
class FOSTER(RehearsalLearner):
    """FOSTER: boosting with a second extractor, compression back to one (Wang et al., ECCV 2022)."""

    config_cls = FOSTERConfig
    #: tests: 2 exemplars per class, one epoch in every stage
    test_options = {**RehearsalLearner.test_options, "compression_epochs": 1}

    def __init__(self, cfg: FOSTERConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        backbone.requires_grad_(True)
        self.head = IncrementalLinear(backbone.feature_dim)
        self.boost: BoostedNet | None = None
        self.compressing = False
        #: the current stage's class-balanced weights ``(seen classes,)`` (beta1, then beta2)
        self.weights = torch.ones(0)

    # -- structure -----------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        """Task 0: grow the head. Later: build the boosted model from the kept one, then grow the
        kept (student) head by the new classes (PILOT's student ``fc``: the old rows copied)."""
        self.boost = None
        self.compressing = False
        if task.index > 0:
            self.boost = BoostedNet(self.backbone, self.head, task.end)
        k = self.head.out_features
        self.head.grow(task.num_new)
        pilot_init_rows(self.head, k)

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint holds a finished task's student only: drop a boosted model built by the
        replayed ``before_task`` first."""
        self.boost = None
        self.compressing = False
        super().load_checkpoint_state(state)

    def train(self, mode: bool = True) -> FOSTER:
        """As :meth:`nn.Module.train`, but the frozen parts stay in eval mode (PILOT
        ``Learner.train``): the old extractor and head of the boosted model always, the whole
        boosted model during compression (the teacher)."""
        super().train(mode)
        if mode and self.boost is not None:
            if self.compressing:
                self.boost.eval()
            else:
                self.boost.old_backbone.eval()
                self.boost.oldfc.eval()
        return self

    # -- training ------------------------------------------------------------------------------
    def train_task(self, task: Task) -> None:
        self.to(self.device)
        if task.index == 0:
            self.backbone.requires_grad_(True)
            self.head.requires_grad_(True)
            self.fit_task(task, self.plain_loss, [*self.backbone.parameters(), *self.head.parameters()])
            return
        self.boosting(task)
        self.compression(task)
        self.boost = None
        self.compressing = False

    def boosting(self, task: Task) -> None:
        """Train the boosted model's new extractor and heads (see the module docstring)."""
        cfg: FOSTERConfig = self.cfg  # type: ignore[assignment]
        boost = self.boost
        assert boost is not None, "before_task builds the boosted model"
        self.compressing = False
        self.backbone.requires_grad_(False)
        self.head.requires_grad_(False)
        counts = self.class_counts(task)
        self.weights = class_balanced_weights(counts, cfg.beta1).to(self.device)
        log.info("task %d boosting: samples per class %s, class weights %s", task.index, counts.tolist(),
                 [round(w, 4) for w in self.weights.tolist()])
        hook = None
        if cfg.oofc == "az":
            k, d = task.start, boost.feature_dim
            with torch.no_grad():
                boost.fc.weight[k:, :d] = 0.0

            def zero_block(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad[k:, :d] = 0.0
                return grad

            hook = boost.fc.weight.register_hook(zero_block)
        try:
            self.fit_task(task, lambda x, y: self.boosting_loss(x, y, task), boost.trainable(),
                          desc=f"task {task.index} boosting")
        finally:
            if hook is not None:
                hook.remove()
        if cfg.is_teacher_wa:
            gamma = weight_align(boost.fc.weight.data, task.num_new, cfg.wa_value)
            log.info("task %d: teacher weight aligning, gamma %.4f", task.index, gamma)

    def compression(self, task: Task) -> None:
        """Distil the boosted model into the kept single-extractor student (balanced KD)."""
        cfg: FOSTERConfig = self.cfg  # type: ignore[assignment]
        assert self.boost is not None, "before_task builds the boosted model"
        self.boost.requires_grad_(False)
        self.compressing = True
        self.backbone.requires_grad_(True)
        self.head.requires_grad_(True)
        self.weights = class_balanced_weights(self.class_counts(task), cfg.beta2).to(self.device)
        stage = dataclasses.replace(cfg.task_config(task), epochs=cfg.compression_epochs,
                                    weight_decay=cfg.compression_weight_decay)
        self.fit_task(task, self.compression_loss, [*self.backbone.parameters(), *self.head.parameters()],
                      desc=f"task {task.index} compression", cfg=stage)
        if cfg.is_student_wa:
            gamma = weight_align(self.head.weight.data, task.num_new, cfg.wa_value)
            log.info("task %d: student weight aligning, gamma %.4f", task.index, gamma)

    def after_task(self, task: Task) -> None:
        self.boost = None
        self.compressing = False
        self.update_memory(task)

    # -- losses --------------------------------------------------------------------------------
    def plain_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Task 0: cross-entropy of the kept model."""
        return F.cross_entropy(self.cnn_logits(x), y)

    def boosting_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """Logit-adjusted CE + ``fe_fc`` CE + ``lambda_okd`` KD from the old model (module docstring)."""
        cfg: FOSTERConfig = self.cfg  # type: ignore[assignment]
        assert self.boost is not None
        out = self.boost(x)
        logits = out.logits.float()
        loss = F.cross_entropy(logits / self.weights.to(logits), y) + F.cross_entropy(out.fe_logits.float(), y)
        return loss + cfg.lambda_okd * softmax_kd(logits[:, : task.start], out.old_logits.float(), cfg.T)

    def compression_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Balanced KD of the student's logits from the boosted model's (``y`` unused, as in PILOT)."""
        cfg: FOSTERConfig = self.cfg  # type: ignore[assignment]
        assert self.boost is not None
        with torch.no_grad():
            teacher = self.boost(x).logits.float()
        return balanced_kd(self.cnn_logits(x).float(), teacher, self.weights, cfg.T)

    # -- prediction ----------------------------------------------------------------------------
    def inference_cost(self) -> dict[str, int]:
        """One backbone pass once a task is done (the boosted model, two, exists only during a task)."""
        cost = super().inference_cost()
        cost["backbone_passes"] = 1 if self.boost is None else 2
        return cost

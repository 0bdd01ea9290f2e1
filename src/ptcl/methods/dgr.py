"""DGR: gradient reweighting of the classifier for imbalanced class-incremental learning.

He. "Gradient Reweighting: Towards Imbalanced Class-Incremental Learning." CVPR 2024
(arXiv 2402.18528). Official code: https://github.com/JiangpengHe/imbalanced_cil (its
``src/approach/DGR.py`` for CNNs trained from scratch; its pre-trained-model setup is
LAMDA-PILOT's). The reference here is LAMDA-PILOT ``models/dgr.py`` and ``exps/dgr.json``
(``models/dgr.py`` has no docstring; PILOT's README lists it as this paper).

Per task the whole model (backbone and a growing linear head, PILOT ``IncrementalNet``)
trains on the task's images plus the exemplars (:mod:`ptcl.methods.rehearsal`), with:

* **a prior-adjusted cross-entropy** (PILOT ``regularized_cn``): ``CE(logits + log p, y)``
  where ``p_c = n_c / sum n`` are the class frequencies of this task's training set (the
  task's images plus the exemplars: the old classes are rare) over all seen classes;
* **distillation** from the second task on: PILOT's ``_KD_loss`` on the old classes' logits
  at temperature ``T`` against the teacher (the model after the previous task,
  :class:`~ptcl.train.snapshot.Snapshot`). The loss that trains the **backbone** is
  ``L_ce + kd_lambda * old / new * L_kd`` (``old``, ``new``: the numbers of old and new
  classes);
* **gradient reweighting of the head** (after ``loss.backward()``, before the optimiser
  step; :class:`HeadReweighting`). The per-row gradient norms of ``L_ce`` w.r.t. the head
  weight, ``||dL_ce/dW_c||``, are summed over the task's steps so far (``grad_accum``, reset
  at each task). With those sums ``a_c`` (:func:`reweighting`):

  - first task: ``w_c = min_k a_k / a_c``;
  - later tasks: per group, ``w_c = min_{k in group} a_k / a_c`` for the old classes and for
    the new ones, then the old classes' times ``rs_old = min(1, mean a_new / mean a_old)`` and
    the new ones' times ``rs_new = min(1, mean a_new / mean a_old * exp(-gammar_r * old / seen))``;

  and the **distribution-aware KD** scale (:func:`kd_ratio`)
  ``r = || (w_c ||dL_ce/dW_c||)_c || / || (||dL_kd/dW_c||)_{c old} ||`` (this step's norms)
  balances the KD gradient against the reweighted CE gradient. The head's gradients are
  then replaced (weight rows and bias alike, :func:`reweighted_head_gradients`): an old
  class's by ``w_c dL_ce/dW_c + r dL_kd/dW_c``, a new class's by ``w_c dL_ce/dW_c`` (first
  task: ``w_c dL_ce/dW_c``). ``kd_lambda`` thus weighs the KD term in the backbone's
  gradient only; the head's KD gradient is scaled by ``r``.

The SGD optimiser (momentum 0.9) then adds the weight decay; the lr follows
``CosineAnnealingLR(T_max=epochs)`` stepped per epoch (``scheduler: cosine``). After
training the new classes' exemplars are chosen by herding and the NME means recomputed;
the CNN (head) accuracy is reported, the NME one recorded beside it (as PILOT reports both).

Where ptcl differs from PILOT:

* when the KD gradient of the head is exactly zero (e.g. the first step of a task, where
  the student's old logits can equal the teacher's bit for bit), PILOT's ``r`` is
  ``x / 0 = inf`` and ``inf * 0`` makes the head's gradients NaN; here ``r`` is 0 then
  (the KD term contributes its zero gradient). Otherwise the same;
* a seen class without a training sample (a memory budget below one exemplar per class)
  has ``log p = -inf`` and a zero accumulated gradient, which makes PILOT's weights NaN;
  here it is a :class:`~ptcl.errors.ConfigError` before training;
* under torchrun the per-loss head gradients are averaged over the ranks before the
  statistics are taken (the global batch's, as PILOT's single process has);
* the official CNN code's distribution-aware KD on the logits (``_DAKD``, mixing the
  student's and the teacher's logits by the class prior and an imbalance ratio) and its
  ``clipgrad`` are not in PILOT's pre-trained-model version and are not implemented;
* the head grows as PILOT's ``update_fc`` (old rows copied, new rows
  ``kaiming_uniform_(nonlinearity="linear")``, zero bias) but draws from the run's seeded
  generator.

Defaults: LAMDA-PILOT ``exps/dgr.json`` (ViT-B/16, CIFAR-100 B0 Inc10): 20 epochs per
task, SGD lr 1e-3, batch 128, weight decay 5e-4 (first task and later ones), cosine
schedule, ``lambda`` 1, ``gammar_r`` 1, ``T`` 2, memory 2000 shared.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ptcl import dist
from ptcl.backbones.base import Backbone
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.linear import IncrementalLinear, expand_linear
from ptcl.methods.rehearsal import RehearsalConfig, RehearsalLearner, softmax_kd
from ptcl.options import option
from ptcl.registry import METHODS
from ptcl.train.callbacks import Callback, LoopState

log = logging.getLogger("ptcl.methods.dgr")

_PILOT = "LAMDA-PILOT exps/dgr.json"


@dataclass
class DGRConfig(RehearsalConfig):
    name: str = option("dgr")
    epochs: int = option(20, "training epochs per task after the first", gt=0, source=f"{_PILOT} (epochs)")
    lr: float = option(1e-3, "learning rate after the first task", gt=0, source=f"{_PILOT} (lrate)")
    batch_size: int = option(128, "training batch size", gt=0, source=f"{_PILOT} (batch_size)")
    weight_decay: float = option(5e-4, "weight decay after the first task", ge=0,
                                 source=f"{_PILOT} (weight_decay)")
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant", "coda_cosine"] = option(
        "cosine", "lr schedule (PILOT: CosineAnnealingLR(T_max=epochs), stepped per epoch)",
        source="LAMDA-PILOT models/dgr.py _train")
    init_epochs: int | None = option(20, "epochs of the first task", gt=0, source=f"{_PILOT} (init_epoch)")
    init_lr: float | None = option(1e-3, "learning rate of the first task", gt=0, source=f"{_PILOT} (init_lr)")
    init_weight_decay: float | None = option(5e-4, "weight decay of the first task", ge=0,
                                             source=f"{_PILOT} (init_weight_decay)")
    kd_lambda: float = option(
        1.0, "weight of the distillation loss in the backbone's gradient, times old / new classes "
        "(PILOT's key 'lambda', a Python keyword)", ge=0, source=f"{_PILOT} (lambda)")
    gammar_r: float = option(
        1.0, "new classes' gradient scale rs_new = min(1, mean a_new / mean a_old * exp(-gammar_r * old / seen)) "
        "(PILOT's key and spelling)", ge=0, source=f"{_PILOT} (gammar_r)")
    T: float = option(2.0, "distillation temperature", gt=0, source=f"{_PILOT} (T)")


# -- the pieces of DGR, as functions of tensors ---------------------------------------------
def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """``log(n_c / sum n)`` ``(C,)`` (float32) of the class counts ``counts`` ``(C,)``
    (PILOT ``regularized_cn``'s ``prior_regularization``)."""
    counts = counts.double()
    return torch.log(counts / counts.sum()).float()


def prior_adjusted_ce(logits: torch.Tensor, y: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``CE(logits + prior, y)`` (PILOT ``regularized_cn``): ``logits`` ``(B, C)``, ``y``
    ``(B,)``, ``prior`` ``(C,)`` (:func:`log_prior`)."""
    return F.cross_entropy(logits + prior.to(logits.device), y)


def reweighting(accum: torch.Tensor, known: int, gammar_r: float) -> torch.Tensor:
    """DGR's per-class gradient weights ``w`` ``(C,)`` (float64) from the accumulated per-row
    gradient norms ``accum`` ``(C,)`` of the head (PILOT ``models/dgr.py`` ``grad_weight``).

    ``known == 0`` (first task): ``min(a) / a``. Otherwise the old (``[:known]``) and new
    classes are balanced within their group, ``min(a_g) / a_g``, and scaled by
    ``rs_old = min(1, mean a_new / mean a_old)`` and
    ``rs_new = min(1, mean a_new / mean a_old * exp(-gammar_r * known / C))``."""
    a = accum.double()
    if known == 0:
        return a.min() / a
    old, new = a[:known], a[known:]
    ratio = float(new.mean() / old.mean())
    rs_old = min(1.0, ratio)
    rs_new = min(1.0, ratio * math.exp(-gammar_r * known / len(a)))
    return torch.cat([old.min() / old * rs_old, new.min() / new * rs_new])


def kd_ratio(weights: torch.Tensor, ce_norms: torch.Tensor, kd_norms: torch.Tensor) -> float:
    """The KD gradient's scale ``r = ||weights * ce_norms|| / ||kd_norms||`` (PILOT
    ``ratio_kd``): ``weights``, ``ce_norms`` ``(C,)`` (this step's per-row norms of the CE
    gradient), ``kd_norms`` ``(K,)`` (the KD gradient's, old classes). 0 where the KD gradient
    is zero (PILOT: ``inf``, then NaN gradients; see the module docstring)."""
    den = float(torch.linalg.vector_norm(kd_norms.double()))
    if den == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(weights.double() * ce_norms.double())) / den


def reweighted_head_gradients(weights: torch.Tensor, ce_grads: tuple[torch.Tensor, torch.Tensor],
                              kd_grads: tuple[torch.Tensor, torch.Tensor] | None = None,
                              ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's gradients ``(weight (C, D), bias (C,))`` DGR steps with: row ``c`` is
    ``weights[c] * ce_grads[c]``, plus ``ratio * kd_grads[c]`` for the old classes (the
    first ``K`` rows, ``kd_grads``: ``(K, D), (K,)``; PILOT ``models/dgr.py``)."""
    gw, gb = ce_grads
    w = weights.to(gw.device, gw.dtype)
    out_w, out_b = gw * w[:, None], gb * w
    if kd_grads is not None:
        kw, kb = kd_grads
        k = len(kw)
        out_w[:k] += ratio * kw
        out_b[:k] += ratio * kb
    return out_w, out_b


class HeadReweighting(Callback):
    """After ``loss.backward()``: the learner replaces its head's gradients (DGR's step)."""

    def __init__(self, learner: DGR) -> None:
        self.learner = learner

    def after_backward(self, state: LoopState) -> None:
        self.learner.reweight_head()


@METHODS.register("dgr")
class DGR(RehearsalLearner):
    """DGR: rehearsal, prior-adjusted CE and KD, head gradients reweighted per class (He, CVPR 2024).

    LAMDA-PILOT ``models/dgr.py``; see the module docstring."""

    config_cls = DGRConfig

    def __init__(self, cfg: DGRConfig, backbone: Backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        backbone.requires_grad_(True)
        self.head: IncrementalLinear | None = None
        #: the per-class sums of the head's CE-gradient row norms over the current task's steps
        #: (PILOT ``gradall``), float64 ``(seen classes,)``; zeroed in ``before_task``
        self.register_buffer("grad_accum", torch.zeros(0, dtype=torch.float64))
        self.prior: torch.Tensor | None = None  # this task's log class prior (train_task)
        self._pending: dict | None = None  # this step's head gradients, from step() to reweight_head()

    # -- structure -------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        """Teacher (from the second task on), head grown to ``task.end`` classes (old rows
        kept), ``grad_accum`` zeroed at ``task.end`` classes. Replayed on ``--resume``."""
        self.take_teacher(task)
        device = self.grad_accum.device
        self.head = expand_linear(self.head, self.backbone.feature_dim, task.end, device)
        self.grad_accum = torch.zeros(task.end, dtype=torch.float64, device=device)

    # -- training ----------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(L_ce, L_kd)`` on a batch: the prior-adjusted CE over the seen classes and
        (from the second task on, else ``None``) the KD of the old classes' logits."""
        cfg: DGRConfig = self.cfg  # type: ignore[assignment]
        logits = self.cnn_logits(x)
        assert self.prior is not None, "train_task sets the class prior"
        ce = prior_adjusted_ce(logits, y, self.prior)
        if self.teacher is None:
            return ce, None
        with torch.no_grad():
            old = self.teacher.module.cnn_logits(x)  # type: ignore[operator]
        return ce, softmax_kd(logits[:, : task.start], old, cfg.T)

    def step(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """The loss the backbone trains with, ``L_ce + kd_lambda * old / new * L_kd``; keeps
        each loss's gradients w.r.t. the head for :meth:`reweight_head`."""
        cfg: DGRConfig = self.cfg  # type: ignore[assignment]
        ce, kd = self.losses(x, y, task)
        params = [self.head.weight, self.head.bias]  # type: ignore[union-attr]
        pending = {"ce": torch.autograd.grad(ce, params, retain_graph=True), "kd": None}
        loss = ce
        if kd is not None:
            gw, gb = torch.autograd.grad(kd, params, retain_graph=True)
            pending["kd"] = (gw[: task.start], gb[: task.start])
            loss = ce + cfg.kd_lambda * (task.start / task.num_new) * kd
        self._pending = pending
        return loss

    @torch.no_grad()
    def reweight_head(self) -> None:
        """Add this step's CE row norms to ``grad_accum`` and replace the head's gradients
        by DGR's (:func:`reweighting`, :func:`kd_ratio`, :func:`reweighted_head_gradients`)."""
        cfg: DGRConfig = self.cfg  # type: ignore[assignment]
        pending, self._pending = self._pending, None
        assert pending is not None, "reweight_head follows a step"
        ce, kd = pending["ce"], pending["kd"]
        dist.average_([*ce, *(kd or ())])  # torchrun: the global batch's gradients (one process: as is)
        ce_norms = ce[0].norm(dim=1)
        self.grad_accum += ce_norms.double().to(self.grad_accum.device)
        known = len(kd[0]) if kd is not None else 0
        weights = reweighting(self.grad_accum, known, cfg.gammar_r)
        ratio = kd_ratio(weights.to(ce_norms.device), ce_norms, kd[0].norm(dim=1)) if kd is not None else 0.0
        gw, gb = reweighted_head_gradients(weights, ce, kd, ratio)
        head = self.head
        assert head is not None and head.bias is not None
        head.weight.grad, head.bias.grad = gw, gb

    def train_task(self, task: Task) -> None:
        counts = self.class_counts(task)
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ConfigError(f"dgr needs a training sample of every seen class (its prior is log of the class "
                              f"frequencies); classes {missing[:5]} have none: raise method.memory_size or set "
                              f"method.fixed_memory=true")
        self.prior = log_prior(counts).to(self.device)
        log.debug("DGR task %d: class counts %s", task.index, counts.tolist())
        self.to(self.device)
        self.fit_task(task, lambda x, y: self.step(x, y, task), self.parameters(), callbacks=[HeadReweighting(self)])
        self._pending = None

    def after_task(self, task: Task) -> None:
        self.update_memory(task)

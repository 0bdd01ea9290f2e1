"""Coil: co-transport of classifiers between old and new classes, with exemplar rehearsal.

Zhou, Ye, Zhan. "Co-Transport for Class-Incremental Learning." ACM MM 2021. Official code:
https://github.com/zhoudw-zdw/MM21-Coil; the reference for pre-trained backbones is
LAMDA-PILOT ``models/coil.py``, ``utils/inc_net.py`` (``SimpleCosineIncrementalNet``) and
``exps/coil.json``, which ptcl follows.

The model: the whole backbone (trained) and a **cosine head** ``sigma * cos(f, w)`` over the
seen classes (PILOT ``CosineLinear``: no bias, learnable ``sigma`` starting at 1, first
weights uniform in ``+-1 / sqrt(D)``), plus the exemplar memory and its nearest-mean
classifier (:mod:`ptcl.methods.rehearsal`). Class prototypes are the renormalised means of
the L2-normalised features (eval transform, the current model) of a class's samples.

* **Task 0**: cross-entropy only, with the same settings as the later tasks (PILOT's
  ``coil.json`` has no ``init_*`` keys; ``models/coil.py`` trains every task for
  ``epochs`` at ``lrate`` with weight decay 5e-4 hard-coded).
* **Prospective transport** (new <- old; PILOT ``solving_ot``, run in its ``after_task``,
  here at the start of the next task's ``train_task`` on the same model): the prototypes of
  the ``K`` old classes (by default from **all** their training images, as PILOT, see
  ``prospective_prototypes``) and of the ``N`` new classes (their training images) give the
  cost ``C[i, j] = ||p_old_i - p_new_j||_p`` (``p = norm_term``); Sinkhorn (POT ``ot.sinkhorn``,
  entropic regulariser ``sinkhorn_reg``) gives the plan ``T`` ``(K, N)``; the new classes'
  head rows start as ``W_new = gamma * K * T^T normalize(W_old)`` (:func:`prospective_init`),
  ``gamma`` making their mean row norm the old rows' (PILOT's "calibration").
* **Loss** from the second task on (``lambda = K / (K + N)``, ``T`` the temperature)::

      lambda * KD_T(logits[:, :K], teacher logits) + (1 - lambda) * CE(logits, y) + extra

  ``KD_T(a, b) = -mean_batch sum softmax(b / T) log_softmax(a / T)`` (the teacher: the model
  after the previous task). ``extra`` in the first epoch: ``new_branch_weight *
  KD'(logits[:, K:], cos(f, W_new^init) / T)`` -- the new classes' logits pulled towards
  the cosine logits of the transported initialisation (the target is not detached, as
  PILOT); from the second epoch on: ``reg_term * (epoch / epochs)^2 * KD'(cos(f, W_old^ret) / T,
  teacher logits / T)`` -- the **retrospective transport** (old <- new; PILOT
  ``solving_ot_to_old``): the plan ``(N, K)`` between the new classes' prototypes (their
  training images) and the old classes' (their **exemplars**) maps the current new rows onto
  ``K`` "old" weights (:func:`retrospective_weights`), recomputed every ``retro_every``
  batches (PILOT: ``i % 30 == 0``) with the current model.

Sinkhorn's marginals (``sinkhorn_marginals``). PILOT gives **every** entry of both
marginals the mass ``1 / K`` (``K`` old classes), so the new side carries ``N / K``: the two
masses differ whenever ``N != K`` and POT's Sinkhorn does not converge (it warns and stops
after 1000 iterations or at an overflow). Its plan then has the first marginal's row sums
and the second marginal rescaled to the first's mass (:func:`sinkhorn_plan`); as the method
only uses the plan's direction (``gamma`` and the cosine normalisations remove its scale)
this equals the plan between two uniform distributions, **except** that in the
retrospective transport (rows: the new classes, mass ``N / K``) the scalings underflow once
``K >= 3 N`` (for prototypes of a realistic width; checked with POT 0.9.5) and POT returns an
all-zero plan: the retrospective term is then a constant (``log K``) with no gradient -- in
PILOT's CIFAR B0 Inc10 run from the fourth task on.
``uniform`` (default: the paper's transport between two class distributions) uses uniform
distributions of mass 1 on both sides (a proper transport plan, the same direction wherever
PILOT's does not underflow); ``pilot`` reproduces PILOT's marginals, underflow included, and is
what ``ptcl run --pilot-config exps/coil.json`` selects.

Where ptcl differs from PILOT:

* the prospective transport runs at the start of the next task (PILOT: at the end of the
  previous one); the model is the same, so the plan is too, and ``--resume`` recomputes it
  from the checkpoint instead of storing it. It uses the next task's actual classes
  (PILOT: ``get_task_size(1)`` classes, which fails with unequal increments);
* ``prospective_prototypes: memory`` (not PILOT) takes the old prototypes from the exemplars
  instead of all the old classes' training images, which PILOT reads again after their task;
* PILOT's ``calibration_term`` (``exps/coil.json`` 1.5) is never used: ``solving_ot``
  overwrites it with ``gamma`` before anything reads it, and the retrospective weights it
  scales are normalised; ptcl has no such option. PILOT's epoch-0 weight
  ``max(1 - (epoch / 2)^2, 0)`` is 1 in the only epoch it applies to and is kept as a formula;
* Sinkhorn's warnings (non-convergence, numerical errors) are logged at debug level
  instead of printed every time;
* the feature extractions run without advancing the run's random streams.

Defaults: LAMDA-PILOT ``exps/coil.json`` (ViT-B/16, CIFAR-100 B0 Inc10): 10 epochs per task,
SGD lr 1e-3 (momentum 0.9), weight decay 5e-4 (``models/coil.py``), batch 64, step decay by 0.1
at milestones [80, 120] (beyond the epochs: a constant lr), sinkhorn 0.464, norm_term 3,
reg_term 1e-3, T 2, memory 2000 shared (``fixed_memory`` false).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptcl.backbones.base import Backbone
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.linear import CosineHead
from ptcl.methods.rehearsal import RehearsalConfig, RehearsalLearner, softmax_kd
from ptcl.options import option
from ptcl.registry import METHODS
from ptcl.seeding import isolated_rng
from ptcl.train.callbacks import Callback, LoopState

log = logging.getLogger("ptcl.methods.coil")

_PILOT = "LAMDA-PILOT exps/coil.json"
_CODE = "LAMDA-PILOT models/coil.py"
EPSILON = 1e-8
"""Added to each feature's norm before normalising it, and to the retrospective cost matrix
(PILOT ``models/coil.py`` ``EPSILON``)."""

Marginals = Literal["pilot", "uniform"]


def import_ot() -> ModuleType:
    """The POT library (``import ot``), or a :class:`ConfigError` saying how to install it."""
    try:
        import ot
    except ImportError:
        raise ConfigError('coil needs the POT library (optimal transport): pip install "ptcl[coil]"') from None
    return ot


@dataclass
class CoilConfig(RehearsalConfig):
    name: str = option("coil")
    epochs: int = option(10, "training epochs per task (the first too, unless init_epochs)", gt=0,
                         source=f"{_PILOT} (epochs)")
    lr: float = option(1e-3, "learning rate", gt=0, source=f"{_PILOT} (lrate)")
    batch_size: int = option(64, "training batch size", gt=0, source=f"{_PILOT} (batch_size)")
    weight_decay: float = option(5e-4, "weight decay", ge=0, source=f"{_CODE} (hard-coded in _train)")
    milestones: list[int] = option(help="multistep milestones (beyond the epochs: constant)", gt=0,
                                   factory=lambda: [80, 120], source=f"{_PILOT} (milestones)")
    lr_decay: float = option(0.1, "multistep lr factor", gt=0, source=f"{_PILOT} (lrate_decay)")
    T: float = option(2.0, "temperature of the distillation and transport terms", gt=0, source=f"{_PILOT} (T)")
    sinkhorn_reg: float = option(0.464, "entropic regulariser of Sinkhorn (ot.sinkhorn reg)", gt=0,
                                 source=f"{_PILOT} (sinkhorn)")
    norm_term: float = option(3.0, "p of the Minkowski distance between class prototypes (the transport cost)",
                              gt=0, source=f"{_PILOT} (norm_term)")
    reg_term: float = option(1e-3, "weight of the retrospective (old <- new) term, times (epoch / epochs)^2, from "
                             "the second epoch of a task on", ge=0, source=f"{_PILOT} (reg_term)")
    new_branch_weight: float = option(1e-3, "weight of the prospective (new <- old) term in the first epoch of a "
                                      "task", ge=0, source=f"{_CODE} (hard-coded 0.001)")
    retro_every: int = option(30, "recompute the retrospective transport every this many batches (from the first "
                              "batch of each epoch)", gt=0, source=f"{_CODE} (i % 30 == 0)")
    sinkhorn_marginals: Marginals = option(
        "uniform", "uniform: a uniform distribution of mass 1 on each side (the paper's class distributions); "
        "pilot: every entry 1 / old classes on both sides (unequal masses: PILOT's, whose retrospective plan "
        "underflows to zero once old classes >= 3 x new; see the module docstring)",
        source=f"Zhou et al., ACM MM 2021 (uniform class marginals); {_CODE} _mu1_vec, _mu2_vec: pilot")
    prospective_prototypes: Literal["train", "memory"] = option(
        "train", "old classes' prototypes of the prospective transport: all their training images (PILOT) or "
        "their exemplars", source=f"{_CODE} solving_ot (_extract_class_means over all training images)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinkhorn_marginals not in ("pilot", "uniform"):
            raise ConfigError(f"method.sinkhorn_marginals must be pilot or uniform, got {self.sinkhorn_marginals!r}")
        if self.prospective_prototypes not in ("train", "memory"):
            raise ConfigError(f"method.prospective_prototypes must be train or memory, "
                              f"got {self.prospective_prototypes!r}")


# -- transport --------------------------------------------------------------------------------
def class_prototypes(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Prototypes ``(len(classes), D)`` float64: per class, the renormalised mean of its
    samples' L2-normalised ``features`` ``(N, D)`` (``labels`` ``(N,)``); PILOT
    ``_extract_class_means`` (``EPSILON`` added to each feature's norm)."""
    f = features.double()
    f = f / (f.norm(dim=1, keepdim=True) + EPSILON)
    means = torch.stack([f[labels == c].mean(0) for c in classes])
    return means / means.norm(dim=1, keepdim=True)


def transport_marginals(rows: int, cols: int, old: int, kind: Marginals = "pilot") -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn's marginals ``(a (rows,), b (cols,))`` float32: ``pilot``: every entry
    ``1 / old`` (PILOT ``_mu1_vec``, ``_mu2_vec``; ``old`` is the number of old classes);
    ``uniform``: ``1 / rows`` and ``1 / cols``."""
    if kind == "pilot":
        return torch.ones(rows) / old, torch.ones(cols) / old
    return torch.ones(rows) / rows, torch.ones(cols) / cols


def sinkhorn_plan(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float) -> torch.Tensor:
    """The entropic transport plan ``(len(a), len(b))`` float64 of POT's ``ot.sinkhorn(a, b,
    cost, reg)`` (Sinkhorn-Knopp, 1000 iterations at most, as PILOT calls it).

    With ``a.sum() == b.sum()`` its rows sum to ``a`` and its columns to ``b``. With unequal
    masses (PILOT's marginals) the iteration cannot converge; the plan returned has rows
    summing to ``a`` and columns to ``b * a.sum() / b.sum()``, or is all zero where the
    scalings underflowed (see the module docstring). POT's warnings are logged at debug level."""
    ot = import_ot()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = ot.sinkhorn(a.cpu(), b.cpu(), cost.detach().double().cpu(), reg)
    for w in caught:
        log.debug("ot.sinkhorn: %s", w.message)
    return torch.as_tensor(plan, dtype=torch.float64)


def prospective_init(old_weight: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """The new classes' initial head rows ``(N, D)`` from the old rows ``old_weight``
    ``(K, D)`` and the plan ``(K, N)`` (PILOT ``solving_ot``): ``hat = K * plan^T
    normalize(old_weight)``, times ``gamma = mean_i ||old_weight_i|| / mean_j ||hat_j||``."""
    hat = plan.T.to(old_weight) @ F.normalize(old_weight, p=2, dim=1) * len(old_weight)
    gamma = old_weight.norm(p=2, dim=1).mean() / hat.norm(p=2, dim=1).mean()
    return hat * gamma


def retrospective_weights(new_weight: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """``K`` "old" weights ``(K, D)`` transported from the new classes' rows ``new_weight``
    ``(N, D)`` by the plan ``(N, K)`` (PILOT ``solving_ot_to_old``): ``K * plan^T
    normalize(new_weight)`` (PILOT's further factor, the last ``gamma``, is left out: the loss
    normalises these rows)."""
    return plan.T.to(new_weight) @ F.normalize(new_weight, p=2, dim=1) * plan.shape[1]


class _Progress(Callback):
    """The epoch and the batch (within it) of the step being computed."""

    def __init__(self) -> None:
        self.epoch = self.batch = 0

    def on_epoch_start(self, state: LoopState) -> None:
        self.epoch, self.batch = state.epoch, 0

    def after_step(self, state: LoopState) -> None:
        self.batch += 1


@METHODS.register("coil")
class Coil(RehearsalLearner):
    """Coil: rehearsal, distillation and co-transport of classifiers (Zhou et al., ACM MM 2021).

    Prospective (new <- old) and retrospective (old <- new) optimal transport between class
    prototypes (LAMDA-PILOT ``models/coil.py``); see the module docstring."""

    config_cls = CoilConfig

    def __init__(self, cfg: CoilConfig, backbone: Backbone, ctx) -> None:
        import_ot()  # fail at construction, not after the first task
        super().__init__(cfg, backbone, ctx)
        backbone.requires_grad_(True)
        self.head = CosineHead(backbone.feature_dim, sigma=1.0, learn_sigma=True)
        self.ot_new_branch: torch.Tensor | None = None  # (N, D): the new rows' transported init
        self.ot_old_branch: torch.Tensor | None = None  # (K, D): the retrospective weights
        self.progress = _Progress()

    # -- structure -----------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        """Take the teacher, then grow the head: the first task's rows drawn as PILOT's
        ``CosineLinear`` (uniform in ``+-1 / sqrt(D)``), later rows zero until
        :meth:`train_task` sets them to the transported initialisation (PILOT
        ``SimpleCosineIncrementalNet.update_fc``; ``sigma`` is kept)."""
        self.take_teacher(task)
        self.ot_new_branch = self.ot_old_branch = None
        if task.index == 0:
            self.head.grow(task.num_new)
        else:
            w = self.head.weight
            self.head.weight = nn.Parameter(torch.cat([w.data, w.new_zeros(task.num_new, w.shape[1])]))

    # -- transport -------------------------------------------------------------------------
    @torch.no_grad()
    def prototypes(self, parts: Sequence[tuple[np.ndarray, np.ndarray]], classes: Sequence[int]) -> torch.Tensor:
        """Prototypes ``(len(classes), D)`` (:func:`class_prototypes`) of the current model's
        features of the training images at the positions of ``parts`` (``(positions, labels)``
        pairs), in eval mode; the model's train/eval mode and the random streams are restored."""
        pos = np.concatenate([p for p, _ in parts])
        labels = torch.from_numpy(np.concatenate([lab for _, lab in parts]))
        was_training = self.training
        with isolated_rng():
            feats = self._embed_at(pos)
        self.train(was_training)
        return class_prototypes(feats, labels, classes)

    def _train_part(self, classes: Sequence[int] | range) -> tuple[np.ndarray, np.ndarray]:
        pos = self.ctx.data.positions("train", classes)
        return pos, self.ctx.data.label["train"][pos]

    def _memory_part(self) -> tuple[np.ndarray, np.ndarray]:
        return self.memory.positions.cpu().numpy(), self.memory.labels.cpu().numpy()

    @torch.no_grad()
    def prospective_transport(self, task: Task) -> torch.Tensor:
        """The new classes' initial rows ``(N, D)`` (PILOT ``solving_ot``): the plan between
        the old classes' prototypes (``prospective_prototypes``) and the new ones' (their
        training images), :func:`prospective_init` of the old head rows."""
        cfg: CoilConfig = self.cfg  # type: ignore[assignment]
        old, new = list(range(task.start)), list(task.classes)
        old_part = self._train_part(old) if cfg.prospective_prototypes == "train" else self._memory_part()
        protos = self.prototypes([old_part, self._train_part(new)], old + new)
        with torch.autocast("cpu", enabled=False), torch.autocast(self.device.type, enabled=False):
            cost = torch.cdist(protos[: len(old)], protos[len(old):], p=cfg.norm_term)
            a, b = transport_marginals(len(old), len(new), len(old), cfg.sinkhorn_marginals)
            plan = sinkhorn_plan(a, b, cost, cfg.sinkhorn_reg)
            return prospective_init(self.head.weight[: task.start].detach().float(), plan)

    @torch.no_grad()
    def retrospective_transport(self, task: Task) -> torch.Tensor:
        """``K`` "old" weights ``(K, D)`` (PILOT ``solving_ot_to_old``): the plan between the
        new classes' prototypes (their training images) and the old ones' (their exemplars),
        cost plus ``EPSILON``, :func:`retrospective_weights` of the current new rows."""
        cfg: CoilConfig = self.cfg  # type: ignore[assignment]
        old, new = list(range(task.start)), list(task.classes)
        protos = self.prototypes([self._memory_part(), self._train_part(new)], old + new)
        # called inside a (bf16) training step: the transport runs without autocast
        with torch.autocast("cpu", enabled=False), torch.autocast(self.device.type, enabled=False):
            cost = torch.cdist(protos[len(old):], protos[: len(old)], p=cfg.norm_term) + EPSILON
            a, b = transport_marginals(len(new), len(old), len(old), cfg.sinkhorn_marginals)
            plan = sinkhorn_plan(a, b, cost, cfg.sinkhorn_reg)
            return retrospective_weights(self.head.weight[task.start:].detach().float(), plan)

    # -- training ------------------------------------------------------------------------
    def train_task(self, task: Task) -> None:
        """From the second task on, set the new head rows to the prospective transport's
        initialisation first; then train on the task's images and the exemplars."""
        self.to(self.device)
        if task.index > 0:
            init = self.prospective_transport(task)
            with torch.no_grad():
                self.head.weight[task.start:] = init.to(self.head.weight)
            self.ot_new_branch = self.head.weight[task.start:].detach().clone()
            log.info("Coil task %d: new rows from the prospective transport (mean norm %.4f)", task.index,
                     float(init.norm(dim=1).mean()))
        cfg = self.cfg.task_config(task)  # type: ignore[attr-defined]
        self.progress = _Progress()
        self.fit_task(task, lambda x, y: self.loss(x, y, task, cfg.epochs), self.parameters(), cfg=cfg,
                      callbacks=[self.progress])

    def after_task(self, task: Task) -> None:
        self.ot_new_branch = self.ot_old_branch = None
        self.update_memory(task)

    def loss(self, x: torch.Tensor, y: torch.Tensor, task: Task, epochs: int | None = None,
             epoch: int | None = None, batch: int | None = None) -> torch.Tensor:
        """The loss of a batch in ``epoch`` (from 0) of ``epochs`` at ``batch`` (within the
        epoch); by default where the running fit is (see the module docstring)."""
        cfg: CoilConfig = self.cfg  # type: ignore[assignment]
        epochs = cfg.epochs if epochs is None else epochs
        epoch = self.progress.epoch if epoch is None else epoch
        batch = self.progress.batch if batch is None else batch
        feats = self.backbone(x)
        logits = self.head(feats)
        clf = F.cross_entropy(logits, y)
        if self.teacher is None:
            return clf
        known, T = task.start, cfg.T
        lamda = known / task.end
        old_logits = self.teacher.module.cnn_logits(x).detach()  # type: ignore[operator]
        loss = lamda * softmax_kd(logits[:, :known], old_logits, T) + (1 - lamda) * clf
        f = F.normalize(feats, p=2, dim=1)
        if epoch < 1:
            if self.ot_new_branch is None:
                raise RuntimeError("Coil: train_task sets the prospective initialisation before training")
            target = torch.softmax(F.linear(f, F.normalize(self.ot_new_branch.to(f), p=2, dim=1)) / T, dim=1)
            new_branch = -(torch.log_softmax(logits[:, known:] / T, dim=1) * target).sum(1).mean()
            return loss + cfg.new_branch_weight * max(1.0 - (epoch / 2) ** 2, 0.0) * new_branch
        if batch % cfg.retro_every == 0 or self.ot_old_branch is None:
            self.ot_old_branch = self.retrospective_transport(task)
        old_branch = softmax_kd(F.linear(f, F.normalize(self.ot_old_branch.to(f), p=2, dim=1)), old_logits, T)
        return loss + cfg.reg_term * (epoch / epochs) ** 2 * old_branch

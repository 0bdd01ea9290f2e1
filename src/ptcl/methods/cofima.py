"""CoFiMA: Continual Fisher-weighted Model Averaging (and its plain variant CoMA).

Marouf, Roy, Tartaglione, Lathuilière. "Weighted Ensemble Models Are Strong Continual
Learners." ECCV 2024 (arXiv:2312.08977). Official code: github.com/IemProg/CoFiMA
(``models/cofima.py``, ``exps/cofima/*.json``); LAMDA-PILOT's port (``models/cofima.py``,
``exps/cofima.json``, ``exps/cofima_inr.json``) has the same algorithm. Built on SLCA
(:mod:`ptcl.methods.slca`, subclassed: slow learner, class Gaussians, classifier alignment).

Per task ``t``:

1. *SLCA training*: the backbone at ``lr x backbone_lr_scale`` and a new head at ``lr``, on
   the task's data only (:meth:`SLCA.train_task <ptcl.methods.slca.SLCA.train_task>`).
2. *Diagonal Fisher* ``F_t`` of the trained, not yet merged, model (official
   ``getFisherDiagonal``): one pass over the task's training set (train augmentation,
   shuffled, batches of ``batch_size``, train mode); per batch the gradient of the
   batch-mean cross-entropy of the logits of *all* seen classes (the per-task heads as
   trained, global labels) is squared; the squares are summed over batches, divided by the
   number of batches and clipped at ``fisher_max`` (official ``fishermax = 1e-4``). Per-batch,
   not per-sample, squared gradients (:func:`diagonal_fisher`).
3. *Merge* (from the second task on, official ``interpolate_weights``)::

       th = ((1 - a) F_{t-1} th_{t-1} + a F_t th_t*) / ((1 - a) F_{t-1} + a F_t),  a = wt_lambda

   per coordinate (:func:`ptcl.experts.merge.fisher_average`), where ``th_t*`` is the model
   just trained, ``th_{t-1}`` the previous *merged* model (with its aligned heads: official
   ``prev_nets[-1]``, stored after the alignment) and ``F_{t-1}`` the Fisher of the
   *previous task's trained* model (official ``fisher_mat[-2]``): Fishers are neither
   accumulated nor recomputed for the merged model. ``fisher_weighting: false`` is CoMA,
   ``(1 - a) th_{t-1} + a th_t*`` (:func:`ptcl.experts.merge.average`). Merged: every backbone
   parameter (when the backbone is trained) and, with ``merge_head`` (official), the old
   classes' heads; the new classes' heads are taken as trained. The first task is not merged
   (its Fisher is kept for the second).
4. *Class statistics* of the new classes with the merged backbone, then *classifier
   alignment* (SLCA's, from the second task on) starting from the merged heads; the aligned
   heads predict. As in the official code (``fc.backup()`` before the merge, ``fc.recall()``
   in ``after_task``), the next task starts from the heads as trained, not merged or aligned.

Prediction is one pass of the one (merged) backbone and a linear head, so the inference cost
stays constant over tasks apart from the head's growth (:meth:`Learner.inference_cost
<ptcl.methods.base.Learner.inference_cost>`: the stored Fisher is a buffer, not a parameter).

State: the Fisher ``F_{t-1}`` is a buffer (``fisher.*``, checkpointed, so a resumed run merges
as an uninterrupted one). The previous merged model ``th_{t-1}`` needs no copy in the state:
it *is* the learner's state at the end of task ``t - 1`` (backbone and aligned heads, which
checkpoints store); :meth:`CoFiMA.train_task` copies it before training changes it.

Where ptcl differs from the official code:

* The old classes' heads: the official Fisher loop reads ``p.grad`` of heads frozen since the
  last task (``requires_grad=False``), i.e. the stale gradient of their last optimiser step
  (the last alignment step, or task 0's last Fisher batch), squared once per batch; ptcl
  uses their true gradient of the same loss.
* The new classes' heads: the official ``interpolate_weights`` puts them into the merged
  model as ``F_t x th_t*`` (keys only in ``th_t*`` take ``F_theta1``): near-zero heads
  (``F <= 1e-4``) that the alignment then retrains. ptcl keeps them as trained;
  ``scale_new_head: true`` reproduces the official product.
* ``fisher_eps`` (default 1e-20) is added to every Fisher in the merge; the official division
  has none (0/0 = NaN where both Fishers vanish). With a frozen backbone
  (``backbone_lr_scale: 0``) the official code divides 0 by 0 in every backbone coordinate;
  ptcl then merges the heads only.
* The official ``wt_alpha`` of ``exps/cofima/*.json`` (and PILOT's ``wt_lambda``) is 0.4, the
  default here; the official ``main.py`` overwrites it with its command-line default (0.5 in
  the last version, the value of the released logs).
* SLCA's deviations (class statistics of classes with fewer than 3 samples, sampling through
  :mod:`ptcl.methods.alignment`) carry over, as does ptcl's input pipeline; the SLCA
  defaults (batch 128, 5 alignment epochs, ViT-B/16 IN21K with a fresh final norm) are the
  official CoFiMA's; ``configs/cofima_*.yaml`` select PILOT's port (batch 64, 3 alignment
  epochs, the IN1K ViT with its pre-trained norm, PILOT's transforms).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.experts.merge import average, fisher_average
from ptcl.methods.slca import SLCA, SLCAConfig
from ptcl.options import option
from ptcl.registry import METHODS
from ptcl.train.loop import to_device

log = logging.getLogger(__name__)

_CODE = "official CoFiMA models/cofima.py"
_EXP = "official CoFiMA exps/cofima/cofima_cifar.json (PILOT exps/cofima.json)"


@dataclass
class CoFiMAConfig(SLCAConfig):
    """SLCA's options (official CoFiMA's values) and the merge's."""

    name: str = option("cofima")
    fisher_weighting: bool = option(
        True, "merge weighted by each model's diagonal Fisher (CoFiMA); false: the plain average "
        "(1 - a) th_prev + a th_task (CoMA)",
        source="official CoFiMA exps/cofima/cofima_cifar.json (fisher-weighting); "
        "PILOT exps/cofima.json (fisher_weighting)")
    wt_lambda: float = option(
        0.4, "a: weight of the task's trained model in the merge (1 - a: the previous merged model)",
        ge=0, le=1, source=f"{_EXP} (wt_alpha; PILOT wt_lambda)")
    fisher_max: float | None = option(
        1e-4, "every diagonal Fisher value is clipped to at most this; null: not clipped", gt=0,
        source=f"{_CODE} (fishermax)")
    fisher_eps: float = option(
        1e-20, "added to every Fisher value in the merge: where both vanish the merge is the plain "
        "weighted average (the official code divides 0 by 0)", ge=0, source="ptcl")
    merge_head: bool = option(
        True, "merge the old classes' heads too (the previous aligned heads with the heads as trained) "
        "and start the classifier alignment from them; false: the backbone only, the alignment starts "
        "from the heads as trained (SLCA)", source=f"{_CODE} (interpolate_weights over the whole state)")
    scale_new_head: bool = option(
        False, "the new classes' heads enter the merged model as F_t x th_t (the official "
        "interpolate_weights, a near-zero head the alignment retrains); false: as trained",
        source=f"{_CODE} (F_theta1 for the keys only th_1 has)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone_lr_scale == 0 and not self.merge_head:
            raise ConfigError("cofima with a frozen backbone (method.backbone_lr_scale=0) and "
                              "method.merge_head=false merges nothing: set method.merge_head=true, "
                              "method.backbone_lr_scale > 0, or use method.name=slca")
        if self.scale_new_head and not (self.merge_head and self.fisher_weighting):
            raise ConfigError("method.scale_new_head scales the new heads by their Fisher in the head merge: "
                              "it needs method.merge_head=true and method.fisher_weighting=true")


def diagonal_fisher(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    max_value: float | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher, per batch: ``min(mean_b (d loss(x_b, y_b) / d theta)^2,
    max_value)`` for every tensor of ``params`` (which must require grad), ``b`` over the
    ``batches`` (moved to ``device``). ``loss`` is the batch's mean loss, so each term is the
    squared gradient of a whole batch, not a mean of per-sample squares (official CoFiMA
    ``getFisherDiagonal``). A parameter the loss does not reach gets 0.

    Returns new tensors (same shapes and dtypes as ``params``). Raises ``ValueError`` when
    ``batches`` is empty.
    """
    names = list(params)
    tensors = [params[k] for k in names]
    fisher = {k: torch.zeros_like(p, memory_format=torch.contiguous_format) for k, p in params.items()}
    n = 0
    for x, y in batches:
        x, y = to_device(x, device), y.to(device)
        grads = torch.autograd.grad(loss(x, y), tensors, allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                fisher[k] += g.detach().pow(2)
        n += 1
    if n == 0:
        raise ValueError("no batches to estimate the Fisher information from")
    for f in fisher.values():
        f /= n
        if max_value is not None:
            f.clamp_(max=max_value)
    return fisher


@contextmanager
def _requiring_grad(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    tensors = list(tensors)
    before = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, r in zip(tensors, before):
            t.requires_grad_(r)


class TensorStore(nn.Module):
    """Buffers by name, where a name may hold dots (a parameter's name); stored with ``.`` as
    ``__`` (``state_dict`` keys ``<prefix>.<name with __>``)."""

    @staticmethod
    def _key(name: str) -> str:
        if "__" in name:
            raise ValueError(f"TensorStore names cannot contain '__': {name!r}")
        return name.replace(".", "__")

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        key = self._key(name)
        if key in self._buffers:
            self._buffers[key] = value
        else:
            self.register_buffer(key, value)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[self._key(name)]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and "__" not in name and self._key(name) in self._buffers

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k.replace("__", "."): v for k, v in self._buffers.items() if v is not None}


@METHODS.register("cofima")
class CoFiMA(SLCA):
    """CoFiMA: SLCA per task, then a diagonal-Fisher-weighted merge with the previous model (Marouf et al., ECCV 2024)."""

    config_cls = CoFiMAConfig
    test_options = {"ca_epochs": 2, "ca_samples": 16, "ca_batch_size": 16}

    def __init__(self, cfg: CoFiMAConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        #: ``F_{t-1}``: the diagonal Fisher of the last task's trained model, by merged tensor
        #: (``backbone.<name>``, ``head.weight``, ``head.bias``; the heads' rows grow per task).
        self.fisher = TensorStore()
        if cfg.fisher_weighting:
            for k, p in self._backbone_tensors().items():
                self.fisher[k] = torch.zeros_like(p, requires_grad=False)
            if cfg.merge_head:
                self.fisher["head.weight"] = torch.zeros_like(self.head.weight, requires_grad=False)
                self.fisher["head.bias"] = torch.zeros_like(self.head.bias, requires_grad=False)
        self._previous: dict[str, torch.Tensor] | None = None  # th_{t-1}, during a task
        self._merged_head: tuple[torch.Tensor, torch.Tensor] | None = None  # where the alignment starts

    # -- what is merged ---------------------------------------------------------------------
    def _backbone_tensors(self) -> dict[str, torch.Tensor]:
        """The live backbone parameters, when the backbone is trained (else nothing to merge)."""
        if not self.updates_backbone:
            return {}
        return {f"backbone.{n}": p for n, p in self.backbone.named_parameters()}

    def merge_operands(self, head: nn.Module, rows: int) -> dict[str, torch.Tensor]:
        """The merged tensors of the live model (detached, not copied): the backbone's
        parameters (when trained) and, with ``merge_head``, the first ``rows`` classes of
        ``head`` (``self.aligned``: the previous merged model's; ``self.head``: as trained)."""
        out = {k: p.detach() for k, p in self._backbone_tensors().items()}
        if self.cfg.merge_head:
            out["head.weight"] = head.weight.detach()[:rows]
            out["head.bias"] = head.bias.detach()[:rows]
        return out

    # -- lifecycle --------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        if "head.weight" in self.fisher:  # rows of the new classes (zero until their Fisher)
            w, b = self.fisher["head.weight"], self.fisher["head.bias"]
            self.fisher["head.weight"] = torch.cat([w, w.new_zeros(task.num_new, w.shape[1])])
            self.fisher["head.bias"] = torch.cat([b, b.new_zeros(task.num_new)])

    def train_task(self, task: Task) -> None:
        # th_{t-1}: the state after the last task (merged backbone, aligned heads), before training moves it
        self._previous = None
        if task.index > 0:
            self._previous = {k: v.clone() for k, v in self.merge_operands(self.aligned, task.start).items()}
        super().train_task(task)

    def after_task(self, task: Task) -> None:
        cfg: CoFiMAConfig = self.cfg  # type: ignore[assignment]
        fisher = self.compute_fisher(task) if cfg.fisher_weighting else None
        if task.index > 0:
            self.merge(task, fisher)
        super().after_task(task)  # statistics with the merged backbone; alignment from the merged heads
        self._previous, self._merged_head = None, None
        if fisher is not None:
            with torch.no_grad():
                for k, f in fisher.items():
                    self.fisher[k].copy_(f)

    # -- 2. diagonal Fisher -----------------------------------------------------------------
    def fisher_batches(self, task: Task) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The batches the Fisher of ``task`` is estimated on: its training set with the train
        augmentation, shuffled, in batches of ``batch_size`` (official: the training loader)."""
        data = self.ctx.data
        ds = data.images("train", task.classes, train_transform=True)
        # shard=False: under torchrun every rank estimates the Fisher on all batches (the same F_t)
        return data.loader(ds, self.cfg.batch_size, shuffle=True, seed=100 * task.index + 98, shard=False)

    def fisher_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch-mean cross-entropy over all seen classes (the heads as trained, global labels)."""
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def compute_fisher(self, task: Task) -> dict[str, torch.Tensor]:
        """``F_t``: :func:`diagonal_fisher` of the trained model on :meth:`fisher_batches`, for
        the backbone's parameters (when trained) and, with ``merge_head``, all seen classes'
        heads as trained."""
        cfg: CoFiMAConfig = self.cfg  # type: ignore[assignment]
        params = self._backbone_tensors()
        if cfg.merge_head:
            params.update({"head.weight": self.head.weight, "head.bias": self.head.bias})
        self.train()
        try:
            with _requiring_grad(params.values()):
                fisher = diagonal_fisher(self.fisher_loss, params, self.fisher_batches(task), self.device,
                                         cfg.fisher_max)
        finally:
            self.eval()
        total = sum(float(f.sum()) for f in fisher.values())
        log.info("task %d: diagonal Fisher of %d tensors, mean %.3g", task.index, len(fisher),
                 total / max(sum(f.numel() for f in fisher.values()), 1))
        return fisher

    # -- 3. merge ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, task: Task, fisher: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Merge the previous model ``th_{t-1}`` (taken by :meth:`train_task`) with the trained
        one into the live backbone; with ``merge_head`` the merged old heads plus the new heads
        (as trained, or ``F_t x th_t`` with ``scale_new_head``) become where the alignment
        starts (:meth:`alignment_init`). ``fisher``: ``F_t`` (:meth:`compute_fisher`), or
        ``None`` without ``fisher_weighting``. Returns the merged tensors."""
        cfg: CoFiMAConfig = self.cfg  # type: ignore[assignment]
        if self._previous is None:
            raise RuntimeError("CoFiMA.merge needs the state before the task's training (taken by train_task)")
        a, s = cfg.wt_lambda, task.start
        th0, th1 = self._previous, self.merge_operands(self.head, s)

        def old_rows(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: (v[:s] if k.startswith("head.") else v) for k, v in state.items()}

        if cfg.fisher_weighting:
            if fisher is None:
                raise ValueError("fisher_weighting needs the task's Fisher")
            f0, f1 = old_rows(self.fisher.as_dict()), old_rows(fisher)
            merged = fisher_average([th0, th1], [f0, f1], [1 - a, a], eps=cfg.fisher_eps)
        else:
            merged = average([th0, th1], [1 - a, a])
        for n, p in self.backbone.named_parameters():
            if f"backbone.{n}" in merged:
                p.copy_(merged[f"backbone.{n}"])
        if cfg.merge_head:
            new_w, new_b = self.head.weight[s : task.end].detach(), self.head.bias[s : task.end].detach()
            if cfg.scale_new_head:
                new_w, new_b = fisher["head.weight"][s : task.end] * new_w, fisher["head.bias"][s : task.end] * new_b
            self._merged_head = (torch.cat([merged["head.weight"], new_w]), torch.cat([merged["head.bias"], new_b]))
        return merged

    def alignment_init(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged heads where this task merged them (SLCA's: the heads as trained)."""
        if self._merged_head is not None:
            return self._merged_head
        return super().alignment_init(task)

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
  (``adapter_momentum`` ``m = 0.1``), so the new adapter keeps the old adapters' knowledge
  (``merge=official``: also inside every forward, see below);
* per class the mean and covariance of its features under its task's adapter; from task
  1 on, classifier alignment trains the head on features sampled from these Gaussians
  (``batch_size * 5`` per class per epoch, 30 epochs, lr 0.005, SGD, cosine);
* prototypes (class means under adapter 0) form a cosine classifier that gives the first
  guess of the task; self-refined retrieval then classifies with that task's adapter
  features and the head, moves to the task of that prediction, and repeats until the task
  is stable (at most 4 evaluations); with ``ensemble`` the output is
  ``softmax(head logits) + softmax((t + 1) * prototype cosine)``.

Merge timing (``merge``): the paper merges once per optimiser step, which ``per_step`` (the
default) does; stored adapters then stay frozen, so their features are extracted once and
cached like EASE's. ``official`` reproduces the official code (LAMDA-PILOT
``backbone/vit_mos.py``, identical in github.com/sun-hailong/AAAI25-MOS), whose
``forward_features`` (l. 348-379) calls ``reweight_adapter`` (l. 328-346) at the start of
every block, and each call merges the adapters of *all* blocks once, by replacing their
``.data`` (l. 337-344); the target of adapter ``k`` is ``mean_{j<k} A_j`` of the adapters as
stored at the end of their training (prefix sums ``*_sum``, l. 315-326), nothing for ``k = 0``.
So, with ``L`` adapter blocks (12 in ViT-B):

* training (``train=True``, ``models/mos.py`` l. 162 and 175): ``L`` merges in every forward
  (block ``l``'s adapter is used after ``l + 1`` of them; backward sees the weights as they
  were used) plus one after the optimiser step (``adapter_merge``): ``L + 1`` per step, the
  adapter keeps ``0.9^(L+1)`` of itself per step (``0.9^13 = 0.25`` in ViT-B);
* class statistics (``_compute_mean``, ``models/mos.py`` l. 214, ``train=True``, after
  ``adapter_update``): the task's adapter merges ``L`` times per batch (per class, batches of
  ``3 x batch_size``), so its classes' statistics come from an adapter drifting to the mean
  of the earlier ones, and the next task starts from that drifted adapter (the copy stored
  for testing does not drift there);
* test (``_eval_cnn``, ``models/mos.py`` l. 373, ``train=False``): every forward with
  stored adapter ``k >= 1`` merges it ``L`` times *in place*. After ``n`` test batches (over
  all evaluations so far) ``A_k = mu_k + 0.9^(L n) (A_k^0 - mu_k)``, with ``A_k^0`` the
  adapter as trained and ``mu_k = mean_{j<k} A_j^0``; inside a batch, block ``l`` uses it
  after ``l + 1`` more merges. With ViT-B and CIFAR-100's 48-image test batches,
  ``0.9^(12 x 11) < 1e-6`` after the first evaluation (5 classes, 11 batches): adapter 1
  collapses to adapter 0, adapter 2 to the mean of adapters 0 and 1, and so on; adapter 0
  never changes. Retrieval then chooses among averages of earlier adapters, and every
  evaluation changes the model evaluated next. Features under adapters ``k >= 1`` are
  therefore never cached in this mode; the trained adapters (buffer ``snapshots``, the merge
  targets) and the drifted start of the next task (buffer ``carry``) are checkpointed with
  the adapters (which hold their drift).

Deviations: only the ``covariance`` and ``variance`` class statistics are implemented (not
``multi-centroid``). Not in the official code: a class with fewer than 3 distinct samples
(covariance zero or rank one) is shrunk towards the mean covariance of the classes with
enough samples of its task and of every earlier class, with a warning; the Cholesky factors
add jitter where one fails (the official ``torch.linalg.cholesky`` raises), both from
:mod:`ptcl.heads.class_statistics`, shared with SLCA.

Shared machinery: the adapter sets are :class:`ptcl.experts.Experts` keyed by task (as
EASE's), the merge is :func:`ptcl.experts.merge.ema_` (``official``:
:func:`ptcl.experts.merge.ema` assigned to ``.data``, as the official code does) towards
:func:`ptcl.experts.merge.average`, and the alignment loop is
:func:`ptcl.methods.alignment.classifier_alignment` (as SLCA's).

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/mos_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ptcl.backbones.base import Backbone
from ptcl.config import TrainConfig
from ptcl.data.features import extract_features
from ptcl.data.scenario import Task
from ptcl.experts import Experts, average, ema, ema_, self_refined_retrieval
from ptcl.heads.class_statistics import SharedCovariance, class_gaussians, class_means
from ptcl.heads.linear import IncrementalLinear
from ptcl.methods.alignment import classifier_alignment
from ptcl.methods.base import FEATURES, Learner, require_vit
from ptcl.options import option
from ptcl.registry import METHODS
from ptcl.train.callbacks import AfterStep

log = logging.getLogger(__name__)

ORTH_TEMPERATURE = 0.8
HEAD_LR_SCALE = 0.1
COV_RIDGE = 1e-4  # added to every class covariance (unchanged from the previous implementation)


_PILOT = "LAMDA-PILOT exps/mos.json (CIFAR-100)"


@dataclass
class MOSConfig(TrainConfig):
    """PILOT ``exps/mos.json`` (CIFAR-100): 20 epochs, SGD lr 0.03, batch 48, weight decay
    5e-4, cosine; ``ffn_num=16``; ``adapter_momentum=0.1``; ``reg=0.1``; ``ensemble=true``;
    ``crct_epochs=30``; ``ca_lr=0.005``; covariance statistics; 4 retrieval steps."""

    name: str = option("mos")
    epochs: int = option(20, source=f"{_PILOT} (tuned_epoch)")
    lr: float = option(0.03, "learning rate of the task's adapter (the head's: lr x 0.1)", source=f"{_PILOT} (init_lr)")
    batch_size: int = option(48, "training batch size (classifier alignment samples 5 x this per class and epoch)",
                             source=_PILOT)
    weight_decay: float = option(5e-4, source=_PILOT)
    bottleneck: int = option(16, "bottleneck width of each task's AdaptFormer adapter", gt=0,
                             source=f"{_PILOT} (ffn_num)")
    adapter_momentum: float = option(0.1, "m: after every optimiser step the task's adapter moves to (1 - m) x "
                                     "itself + m x the mean of the earlier ones; 0: no merging", ge=0, le=1,
                                     source=_PILOT)
    reg: float = option(0.1, "weight of the orthogonality loss (old class means vs batch features)", ge=0,
                        source=_PILOT)
    ensemble: bool = option(True, "add the softmax of the adapter-0 prototype classifier to the prediction",
                            source=_PILOT)
    ca_epochs: int = option(30, "classifier-alignment epochs per task (from the second task on); 0: none", ge=0,
                            source=f"{_PILOT} (crct_epochs)")
    ca_lr: float = option(0.005, "classifier-alignment learning rate (SGD, cosine)", gt=0, source=_PILOT)
    ca_storage: Literal["covariance", "variance"] = option(
        "covariance", "per-class statistics sampled by the alignment: covariance = full covariance, "
        "variance = its diagonal", source=f"{_PILOT} (ca_storage_efficient_method)")
    refine_steps: int = option(4, "self-refined retrieval: at most this many head evaluations per image", gt=0,
                               source="LAMDA-PILOT models/mos.py (MAX_ITER = 4)")
    merge: Literal["per_step", "official"] = option(
        "per_step", "when adapters merge towards the mean of the earlier ones: per_step = the task's adapter "
        "once after every optimiser step; official = as the official code, also at every adapter block of every "
        "forward: training, class statistics, and stored adapters in place at every test forward (they drift "
        "to the mean of the earlier ones; their features are never cached)",
        source="per_step: the paper (Sun et al., AAAI 2025); official: LAMDA-PILOT backbone/vit_mos.py "
        "(reweight_adapter in forward_features)")


def flatten(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensors of ``params`` as one vector (in their order)."""
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


def unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: ``vec`` cut into tensors of ``like``'s names, shapes and dtypes."""
    out, i = {}, 0
    for name, p in like.items():
        out[name] = vec[i : i + p.numel()].view(p.shape).to(p.detach())
        i += p.numel()
    if i != len(vec):
        raise ValueError(f"{len(vec)} values for tensors of {i}")
    return out


def orth_loss(feats: torch.Tensor, old_means: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``M M^T / 0.8`` against the identity, ``M = [old means; feats]``."""
    m = torch.cat([old_means.to(feats), feats])
    sim = m @ m.T / ORTH_TEMPERATURE
    return F.cross_entropy(sim, torch.arange(len(m), device=m.device))


@METHODS.register("mos")
class MOS(Learner):
    """MOS: merged per-task adapters, classifier alignment and self-refined adapter retrieval (Sun et al., AAAI 2025)."""

    config_cls = MOSConfig
    inputs = FEATURES
    test_options = {"ca_epochs": 2}

    def __init__(self, cfg: MOSConfig, backbone: Backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        require_vit(backbone, "MOS")  # at set-up, before the run folder exists
        self.experts = Experts(backbone, ctx.data)  # adapter set of task t under key t
        d = self.dim = backbone.feature_dim
        self.head = IncrementalLinear(d)
        self.register_buffer("protos", torch.zeros(0, d))  # adapter-0 class means (retrieval)
        self.register_buffer("means", torch.zeros(0, d))  # class means under their task's adapter
        cov_shape = (d, d) if cfg.ca_storage == "covariance" else (d,)
        self.register_buffer("covs", torch.zeros(0, *cov_shape))
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))
        self.official = cfg.merge == "official"
        if self.official:  # (tasks, adapter size): each adapter as trained (the official prefix sums)
            self.register_buffer("snapshots", torch.zeros(0, 0))
            self.register_buffer("carry", torch.zeros(0))  # where the next task's adapter starts

    def before_task(self, task: Task) -> None:
        require_vit(self.backbone, "MOS")
        self.experts.add(task.index, "adapter", bottleneck=self.cfg.bottleneck)
        if self.official:
            size = sum(p.numel() for p in self.experts.parameters_of(task.index).values())
            self.snapshots = torch.cat([self.snapshots.reshape(-1, size), self.snapshots.new_zeros(1, size)])
            if len(self.carry) == 0:
                self.carry = self.carry.new_zeros(size)
        self.head.grow(task.num_new)
        n = task.num_new
        self.protos = torch.cat([self.protos, self.protos.new_zeros(n, self.dim)])
        self.means = torch.cat([self.means, self.means.new_zeros(n, self.dim)])
        self.covs = torch.cat([self.covs, self.covs.new_zeros(n, *self.covs.shape[1:])])
        self.class_task = torch.cat([self.class_task, self.class_task.new_full((n,), task.index)])

    # -- training ----------------------------------------------------------------------
    def train_task(self, task: Task) -> None:
        t, cfg, experts = task.index, self.cfg, self.experts
        self.to(self.device)
        callbacks = []
        if t > 0:  # continue from the previous task's adapter, merged towards the earlier ones
            if self.official:  # the official cur_adapter: drifted while extracting the statistics
                experts[t].load_state_dict(unflatten(self.carry, experts.parameters_of(t)))
            else:
                experts[t].load_state_dict(experts[t - 1].state_dict())
            if cfg.adapter_momentum > 0 and self.official:  # adapter_merge after every step
                target = self.merge_target(t)
                callbacks.append(AfterStep(lambda _: self.merge_official(t, target)))
            elif cfg.adapter_momentum > 0:  # after every optimiser step
                target, params = average([experts.parameters_of(k) for k in range(t)]), experts.parameters_of(t)
                callbacks.append(AfterStep(lambda _: ema_(params, target, 1 - cfg.adapter_momentum)))
        data = self.ctx.data.images("train", task.classes, train_transform=True)
        old_means = self.means[: task.start]

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            feats = self.backbone(x)
            logits = F.linear(feats, self.head.weight[task.start :], self.head.bias[task.start :])
            return F.cross_entropy(logits, y - task.start) + cfg.reg * orth_loss(feats, old_means)

        with experts.training(t) as h, self.merging(t) if self.official else nullcontext():
            groups = [{"params": h.parameters(), "lr": cfg.lr},
                      {"params": list(self.head.parameters()), "lr": cfg.lr * HEAD_LR_SCALE}]
            losses = self.fit(data, step, groups, desc=f"task {t} adapter", seed=t, callbacks=callbacks)
        log.info("MOS task %d adapter: loss %.4f -> %.4f", t, losses[0], losses[-1])
        if self.official:  # adapter_update: the stored copy and the merge targets' prefix sums
            self.snapshots[t] = flatten(experts.parameters_of(t)).to(self.snapshots)

        self.class_statistics(task)
        if t > 0 and cfg.ca_epochs > 0:
            self.align_classifier(task)

    @torch.no_grad()
    def class_statistics(self, task: Task) -> None:
        """Prototypes (adapter 0) and Gaussians (the task's adapter) of the new classes; a class
        with fewer than 3 distinct samples is shrunk towards the mean covariance of the others
        (:mod:`ptcl.heads.class_statistics`); a class without samples raises ``DataError``.
        ``official``: the features come class by class (batches of ``3 x batch_size``) from the
        task's adapter merging as it goes (``_compute_mean``); the drifted adapter becomes
        ``carry``, and the stored one is restored to its trained state."""
        t = task.index
        if self.official:
            data = self.ctx.data
            parts = [self.merged_features(data.images("train", [c]), t, 3 * self.cfg.batch_size)
                     for c in task.classes]
            feats = torch.cat(parts)
            labels = torch.cat([data.labels("train", [c]) for c in task.classes])
            params = self.experts.parameters_of(t)
            self.carry = flatten(params).to(self.carry)
            self.experts[t].load_state_dict(unflatten(self.snapshots[t], params))
        else:
            feats, labels = self.experts.features("train", task.classes, [t])
        proto_feats, proto_labels = self.experts.features("train", task.classes, [0])
        self.protos[task.start : task.end] = class_means(proto_feats, proto_labels, task.classes).to(self.protos)
        shared = SharedCovariance.of(self.covs[: task.start], COV_RIDGE)
        means, covs = class_gaussians(feats, labels, task.classes, COV_RIDGE, shared)
        for i, c in enumerate(task.classes):
            self.means[c] = means[i].to(self.means)
            self.covs[c] = (covs[i] if self.cfg.ca_storage == "covariance" else covs[i].diagonal()).to(self.covs)

    def align_classifier(self, task: Task) -> None:
        """Train the head on features sampled from every seen class's Gaussian (``batch_size
        * 5`` per class and epoch, batches of that size; official ``classifer_align``)."""
        cfg = self.cfg
        per_class = cfg.batch_size * 5
        ca = dataclasses.replace(cfg, lr=cfg.ca_lr, epochs=cfg.ca_epochs, batch_size=per_class)
        classifier_alignment(self, self.head, self.means[: task.end], self.covs[: task.end], per_class, ca,
                             stream="mos-alignment", task=task.index, seed=1000 + task.index,
                             desc=f"task {task.index} alignment")

    # -- the official merge timing (merge=official) ------------------------------------------
    def merge_target(self, key: int) -> dict[str, torch.Tensor]:
        """``mean_{j<key} A_j`` of the adapters as trained (``snapshots``; ``key >= 1``)."""
        like = self.experts.parameters_of(key)
        return average([unflatten(self.snapshots[j], like) for j in range(key)])

    @torch.no_grad()
    def merge_official(self, key: int, target: Mapping[str, torch.Tensor]) -> None:
        """One official ``reweight_adapter``: every tensor of adapter set ``key`` becomes
        ``(1 - m) A + m target``, assigned to ``.data`` (a forward's saved tensors keep the
        weights they used, as in the official code; an in-place update would change them)."""
        params = self.experts.parameters_of(key)
        for name, value in ema(params, target, 1 - self.cfg.adapter_momentum).items():
            params[name].data = value

    @contextmanager
    def merging(self, key: int) -> Iterator[None]:
        """Within the block every forward of a ViT block that holds one of adapter set
        ``key``'s adapters first merges the whole set once (:meth:`merge_official`), as the
        official ``forward_features``; nothing for ``key = 0`` or ``adapter_momentum = 0``."""
        if key == 0 or self.cfg.adapter_momentum == 0:
            yield
            return
        target = self.merge_target(key)
        blocks = [b for b, _ in zip(self.backbone.model.blocks, self.experts[key].module.adapters)]
        hooks = [b.register_forward_pre_hook(lambda *_: self.merge_official(key, target)) for b in blocks]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def merged_features(self, dataset, key: int, batch_size: int) -> torch.Tensor:
        """Features (``N x D``, eval mode) of ``dataset`` under adapter set ``key`` alone,
        merging it in every block of every batch (:meth:`merging`): it drifts in place."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with self.experts.only(key), self.merging(key):
                return extract_features(self.backbone, dataset, batch_size, self.ctx.data.num_workers,
                                        self.device, desc=f"features[adapter {key}]", quiet=self.ctx.quiet)
        finally:
            self.backbone.train(was_training)

    # -- inference ---------------------------------------------------------------------
    def task_of(self, logits: torch.Tensor) -> torch.Tensor:
        return self.class_task[logits.argmax(1)]

    @torch.no_grad()
    def retrieve(self, feats: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Self-refined retrieval (:func:`ptcl.experts.self_refined_retrieval`). ``feats``:
        (B, tasks, D); ``start``: first-guess task per sample. Returns the head logits of the
        adapter each sample settles on."""
        return self_refined_retrieval(feats, start, self.head, self.task_of, self.cfg.refine_steps)

    def features(self, split: str, classes: Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
        """Features under every task's adapter, concatenated (``tasks * D`` columns).
        ``official``: computed afresh (batches of ``batch_size``, eval transform) with every
        stored adapter ``k >= 1`` merging in place in every block (:meth:`merging`), as the
        official ``_eval_cnn``; each call moves them further (see the module docstring)."""
        if not self.official:
            return self.experts.features(split, classes)
        data = self.ctx.data
        images = data.images(split, classes)
        feats = [self.merged_features(images, int(k), self.cfg.batch_size) for k in self.experts]
        return torch.cat(feats, 1), data.labels(split, classes)

    def inference_cost(self) -> dict[str, int]:
        """An ensemble: one backbone pass per adapter set (the retrieval reads every adapter's
        feature), so the cost grows by one pass per task."""
        n = len(self.experts)
        return {**super().inference_cost(), "backbone_passes": n, "experts_run": n}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        feats = x.reshape(len(x), -1, self.dim)
        orig = F.normalize(feats[:, 0], dim=1) @ F.normalize(self.protos, dim=1).T
        final = self.retrieve(feats, self.task_of(orig))
        if not self.cfg.ensemble:
            return final
        return F.softmax(final, dim=1) + F.softmax(orig * feats.shape[1], dim=1)

"""ZSCL: Zero-Shot Continual Learning, fine-tuning CLIP without losing its zero-shot transfer.

Zheng, Ma, Wang, Qin, Yue, Xu. "Preventing Zero-Shot Transfer Degradation in Continual
Learning of Vision-Language Models." ICCV 2023 (arXiv:2303.06628). Official code:
https://github.com/Thunderbeee/ZSCL, its class-incremental part ``cil/`` (built on
https://github.com/vgthengane/Continual-CLIP); defaults from ``cil/continual_clip/models.py``
(``ClassIncremental.train``), ``cil/continual_clip/utils.py`` and
``cil/configs/class/*-ZSCL.yaml``.

Per task, the whole CLIP (image and text tower, all weights but ``logit_scale``) is trained
on the current task's data only (no exemplars):

1. *Classification*: logits ``logit_scale.exp() * cos(image, text)`` against the texts of
   the **current task's** classes (``templates`` around each class name, in the scenario's
   label order, through the trained text tower; with several templates a class's text
   embedding is the normalised mean of the normalised template embeddings), cross-entropy
   with label smoothing ``label_smoothing`` (0.2) on the targets shifted to ``0..n_t - 1``.
2. *Feature distillation* from the **initial** CLIP (a frozen copy taken once, when the
   learner is built: :class:`~ptcl.train.snapshot.Snapshot`; never in a checkpoint): each
   step draws a batch of reference images; with ``E`` the initial CLIP's normalised
   embeddings of the reference texts, ``r`` / ``c`` the initial / current normalised image
   embeddings of the batch and ``s = logit_scale.exp()``, the logits ``s r E^T`` (teacher)
   and ``s c E^T`` (student) are distilled at temperature ``kd_temperature`` (2) with
   ``CE(student / T, softmax(teacher / T)) T^2`` over the texts (``image_loss_weight``, 5)
   and, transposed, over the batch's images (``text_loss_weight``, 5). Only the current image
   tower receives gradients from it; the texts are always the initial model's.
3. *Weight ensembling* (``weight_ensemble``): a running mean of the weights, started at the
   task-start weights (count 0) and updated after the optimiser step of every iteration
   ``i`` with ``i % avg_freq == 0`` (iteration 0 included): ``n += 1; we = (we n + cur) /
   (n + 1)`` (``utils.merge_we``; computed with :func:`ptcl.experts.merge.average`). At the
   task's end the model's weights are replaced by the mean.

Optimiser AdamW over those weights, rebuilt every task; the lr follows the official
``utils.cosine_lr`` (``scheduler: warmup_cosine``): ``lr (i + 1) / W`` for iteration ``i < W``
(``warmup_steps`` = 30), then ``0.5 (1 + cos(pi (i - W) / (N - W))) lr``, where ``N`` is the
number of iterations (``iterations``; null: ``epochs`` passes over the task's batches, the
official ``EPOCH = 1``). As in the official ``range(total_iterations + 1)`` the loop runs
``N + 1`` iterations (the last at lr 0, which can still add a weight-ensemble sample),
restarting the reshuffled task data when it runs out.

Prediction: the image embedding's cosine (times ``logit_scale.exp()``) with the text
embeddings of every seen class through the current text tower, recomputed after each task
(``classifier``, a buffer).

Reference set (``reference_root``): the official code draws reference images from the
Conceptual Captions validation set (``cil/continual_clip/cc.py``, ``Validation_GCC-1.1.0-
Validation_output.csv``, test transform, batches of ``batch_size``, reshuffled when
exhausted) and uses *all its captions* as reference texts. CC is not available offline, so:

* ``reference_root: PATH``: an image folder or archive in ptcl's ``train/<class>/*`` +
  ``test/<class>/*`` layout (``reference_split`` chooses the split; e.g. ImageNet's, or CC
  images sorted into one folder); its reference texts are its class names
  (``reference_class_names`` map, else a ``classnames.txt`` / ``words.txt`` beside it, else
  the folder names: :mod:`ptcl.data.class_names`) in ``reference_templates`` (default
  ``"a photo of a {}."``, the template of the official reference sets, ``cc.py``
  ``conceptual_captions.template``);
* ``reference_root: null`` (default, works offline): the current task's training images
  (evaluation transform) and the current task's class names in ``reference_templates``,
  the reference of the official code's LwF branch (``ref_dataset`` = the task's data), with
  the initial CLIP as teacher;
* ``reference_texts: PATH``: a UTF-8 file with one reference sentence per line (e.g. CC
  captions), used verbatim instead of class names.

The paper's ablations show that a diverse reference set (CC, ImageNet) preserves more
zero-shot transfer than the task's own data: for a published setting point
``reference_root`` at one.

Differences from the official code, and why:

* the reference text embeddings are computed once (per task for the default reference)
  instead of re-encoding every caption at every iteration: the teacher is frozen, so they
  are the same numbers at a fraction of the cost;
* evaluation uses the backbone's evaluation transform (resize + centre crop); the official
  ``main.py`` evaluates with the *train* transform (``RandomResizedCrop(224, scale=(0.9,
  1))``), a random evaluation;
* ptcl's train crop (``augment: crop_flip`` with ``crop_scale`` [0.9, 1], bicubic, as the
  official ``clip.py _transform``) adds a horizontal flip the official does not have;
* the image tower is timm's ViT converted from open_clip (:mod:`ptcl.backbones.clip`): its
  ``head`` (CLIP's ``proj``) has a zero bias that the official model does not have; it is
  not trained (stays 0), so the model computes the official function;
* the class order is the seed's permutation, not the official ``class_orders/*.yaml``;
* ``weight_decay`` is 0 by default: the ZSCL yamls do not set it (``train`` reads
  ``cfg.weight_decay``); the sibling CIFAR-100 / Tiny-ImageNet configs use 0.0, the
  ImageNet-100 ones 0.1. The optional ``l2`` weight constraint (0 in the sibling configs)
  is not implemented.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptcl.backbones.clip import TextTower, text_tower
from ptcl.config import TrainConfig
from ptcl.data.base import DatasetSplits
from ptcl.data.class_names import class_names
from ptcl.data.datasets import read_image_folder
from ptcl.data.scenario import Task
from ptcl.data.server import TaskImages
from ptcl.data.templates import TEMPLATE_SETS, resolve_templates
from ptcl.errors import ConfigError, DataError
from ptcl.experts.merge import average
from ptcl.methods.base import IMAGES, Learner
from ptcl.options import option
from ptcl.registry import METHODS
from ptcl.train.callbacks import Callback, LoopState
from ptcl.train.loop import fit
from ptcl.train.snapshot import Snapshot

log = logging.getLogger(__name__)

_CODE = "official ZSCL cil/continual_clip/models.py (ClassIncremental.train)"
_TINY = "official ZSCL cil/configs/class/tinyimagenet_100-10-ZSCL.yaml"

FROZEN = ("text.logit_scale", "model.head.bias")
"""Backbone parameters ZSCL does not train: CLIP's ``logit_scale`` (excluded by the official
code) and the zero bias timm's head adds to CLIP's ``proj`` (absent in CLIP)."""


@dataclass
class ZSCLConfig(TrainConfig):
    """Options of ZSCL; see the module docstring."""

    name: str = option("zscl")
    epochs: int = option(1, "passes over the task's data (when iterations is null)", source=f"{_CODE} (EPOCH = 1)")
    iterations: int | None = option(
        None, "optimiser iterations per task (the loop runs one more, at lr 0, as the official); "
        "null: epochs x batches of the task's data", ge=1, source=f"{_CODE} (total_iterations = len(train_loader))")
    lr: float = option(7.1e-6, source=f"{_TINY} (imagenet100_10-10-ZSCL.yaml: 7e-6)")
    batch_size: int = option(64, source=f"{_TINY} (imagenet100_10-10-ZSCL.yaml: 128)")
    optimizer: Literal["sgd", "adam", "adamw"] = option("adamw", source=f"{_CODE} (torch.optim.AdamW)")
    weight_decay: float = option(
        0.0, source="not set in the ZSCL yamls; official ZSCL cil/configs/class/tinyimagenet_100-10.yaml and "
        "cifar100_*-LwF.yaml: 0.0 (imagenet100_*-new.yaml: 0.1)")
    scheduler: Literal["warmup_cosine", "cosine_step", "constant"] = option(
        "warmup_cosine", "lr schedule: warmup_cosine = the official utils.cosine_lr (linear warmup over "
        "warmup_steps, then cosine over the remaining iterations); cosine_step / constant: ptcl.train.optim's",
        source="official ZSCL cil/continual_clip/utils.py (cosine_lr)")
    warmup_steps: int = option(30, source=f"{_CODE} (utils.cosine_lr(optimizer, cfg.lr, 30, total_iterations))")
    augment: Literal["crop_flip", "resize"] = option("crop_flip", source="official ZSCL cil/clip/clip.py _transform")
    crop_scale: list[float] = option(factory=lambda: [0.9, 1.0],
                                     source="official ZSCL cil/clip/clip.py _transform (RandomResizedCrop)")
    templates: str | list[str] = option(
        "bad_photo", f"prompt templates of the class texts (training and prediction): a set name "
        f"({', '.join(TEMPLATE_SETS)}; ptcl.data.templates) or a list of strings with one {{}}",
        source=f"{_TINY} (prompt_template 'a bad photo of a {{}}.'; ImageNet: 'a good photo of a {{}}.')")
    label_smoothing: float = option(0.2, "label smoothing of the cross-entropy", ge=0, lt=1, source=f"{_TINY} (ls)")
    image_loss_weight: float = option(
        5.0, "weight of the distillation with the softmax over the reference texts (per reference image)", ge=0,
        source=f"{_CODE} (5 * loss_ZSCL)")
    text_loss_weight: float = option(
        5.0, "weight of the distillation with the softmax over the reference images (per reference text)", ge=0,
        source=f"{_CODE} (5 * loss_ZSCL_2)")
    kd_temperature: float = option(2.0, "distillation temperature T", gt=0,
                                   source="official ZSCL cil/continual_clip/utils.py (distillation, T=2)")
    weight_ensemble: bool = option(True, "replace the weights by their running mean at the task's end",
                                   source=f"{_TINY} (we: 1)")
    avg_freq: int = option(10, "weight-ensemble sample every avg_freq iterations (iteration 0 included)", ge=1,
                           source=f"{_TINY} (avg_freq)")
    reference_root: str | None = option(
        None, "reference images: an image folder or archive (train/<class>/*, test/<class>/*); null: the "
        "current task's training images (the official uses Conceptual Captions, not available offline)",
        path=True, source="official ZSCL cil/continual_clip/cc.py (CC validation images)")
    reference_split: Literal["train", "test"] = option("train", "split of reference_root used as reference images",
                                                       source="ptcl (the official reference set has no splits)")
    reference_class_names: str | None = option(
        None, "a class-name map for reference_root's classes (ptcl.data.class_names); null: a classnames.txt / "
        "words.txt beside it, else its folder names", path=True, source="ptcl")
    reference_texts: str | None = option(
        None, "reference texts: a UTF-8 file with one sentence per line (e.g. CC captions), used verbatim; "
        "null: the reference class names in reference_templates", path=True,
        source="official ZSCL cil/continual_clip/cc.py (the CC captions)")
    reference_templates: str | list[str] = option(
        "simple", "templates around the reference class names (a set name or a list with one {} each)",
        source="official ZSCL cil/continual_clip/cc.py (conceptual_captions.template 'a photo of a {}.')")
    reference_batch_size: int | None = option(
        None, "reference images per iteration; null: batch_size", ge=1, source=f"{_CODE} (cfg.batch_size)")

    def __post_init__(self) -> None:
        super().__post_init__()
        resolve_templates(self.templates)
        resolve_templates(self.reference_templates, "method.reference_templates")
        if self.reference_class_names is not None and self.reference_root is None:
            raise ConfigError("method.reference_class_names names the classes of method.reference_root; "
                              "set method.reference_root (an image folder) or drop it")


def distillation(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """``CE(student / T, softmax(teacher / T)) * T^2``, the mean over rows (official
    ``utils.distillation``): the KL divergence up to a constant, softmax along dim 1."""
    target = F.softmax(teacher / temperature, dim=1)
    return F.cross_entropy(student / temperature, target) * temperature**2


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The lr factor of iteration ``step`` (from 0) of the official ``utils.cosine_lr``:
    ``(step + 1) / warmup`` while ``step < warmup``, then ``0.5 (1 + cos(pi (step - warmup) /
    (total - warmup)))``; 0 after the warmup where ``total <= warmup`` (the official divides by
    zero there)."""
    if step < warmup:
        return (step + 1) / warmup
    span = total - warmup
    if span <= 0:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))


class WarmupCosine(Callback):
    """Sets every group's lr to ``base * warmup_cosine(i, total, warmup)`` before iteration
    ``i`` (``base``: the groups' lr when the loop starts)."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup
        self.base: list[float] | None = None

    def _set(self, state: LoopState) -> None:
        f = warmup_cosine(state.global_step, self.total, self.warmup)
        for g, base in zip(state.optimizer.param_groups, self.base or []):
            g["lr"] = base * f

    def on_epoch_start(self, state: LoopState) -> None:
        if self.base is None:
            self.base = [g["lr"] for g in state.optimizer.param_groups]
        self._set(state)

    def after_step(self, state: LoopState) -> None:
        self._set(state)


class WeightEnsemble(Callback):
    """The running mean of ``params`` (name -> live tensor) over the weights at the start and
    after the optimiser step of every iteration ``i`` with ``i % every == 0``: ``n += 1;
    mean = (mean n + current) / (n + 1)`` (official ``utils.merge_we``). :meth:`apply`
    copies the mean into ``params``."""

    def __init__(self, params: dict[str, torch.Tensor], every: int) -> None:
        self.params, self.every = params, every
        self.mean = {k: v.detach().clone() for k, v in params.items()}
        self.count = 0

    def after_step(self, state: LoopState) -> None:
        if (state.global_step - 1) % self.every == 0:  # iteration global_step - 1 just stepped
            self.count += 1
            current = {k: v.detach() for k, v in self.params.items()}
            self.mean = average([self.mean, current], weights=[self.count, 1])

    @torch.no_grad()
    def apply(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.mean[k])


class Iterations:
    """``loader`` served for exactly ``steps`` batches (``len``), restarting it (a new
    shuffle) when it runs out, as the official ``next(train_iter)`` / ``iter(train_loader)``."""

    def __init__(self, loader: DataLoader, steps: int) -> None:
        if len(loader) == 0:
            raise DataError("ZSCL got no training batches for the task")
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        n = 0
        while True:
            for batch in self.loader:
                if n == self.steps:
                    return
                yield batch
                n += 1


def _forever(loader: DataLoader) -> Iterator:
    """``loader``'s batches without end (reshuffled each pass)."""
    if len(loader) == 0:
        raise DataError("ZSCL's reference set has no images")
    while True:
        yield from loader


@METHODS.register("zscl")
class ZSCL(Learner):
    """ZSCL (Zheng et al., ICCV 2023): CLIP fine-tuning, distillation from the initial CLIP, weight ensembling."""

    config_cls = ZSCLConfig
    inputs = IMAGES
    updates_backbone = True  # both towers are trained: checkpoints store them (not the teacher)
    #: the backbone of the registry-generated tests (tests/helpers.py ``tiny_overrides``)
    test_backbone = "clip_tiny_test"
    test_options = {"avg_freq": 2, "reference_batch_size": 4}

    def __init__(self, cfg: ZSCLConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        text_tower(backbone, "zscl")  # a ConfigError without one
        self.templates = resolve_templates(cfg.templates)
        self.reference_templates = resolve_templates(cfg.reference_templates, "method.reference_templates")
        names = ctx.class_names
        if ctx.scenario is not None and len(names) != ctx.scenario.num_classes:
            raise ConfigError(f"zscl needs the name of every class; the context has {len(names)} "
                              f"names for {ctx.scenario.num_classes} classes")
        #: (seen classes, embed_dim) normalised text embeddings of the current text tower, row i = label i
        self.register_buffer("classifier", torch.zeros(0, backbone.text.embed_dim))
        # the distillation teacher: the initial CLIP, copied once (a plain object: never in
        # state_dict or a checkpoint; rebuilt identically when a resumed run builds the learner)
        self.teacher: Snapshot | None = None
        if cfg.image_loss_weight > 0 or cfg.text_loss_weight > 0:
            self.teacher = Snapshot(backbone)
        self._reference: tuple[DatasetSplits, list[str]] | None = None
        self._sentences: list[str] | None = None

    @property
    def text(self) -> TextTower:
        """The backbone's (trained) text tower (a property: a second registration would
        duplicate its weights in the checkpoints)."""
        return self.backbone.text

    def before_task(self, task: Task) -> None:
        grown = torch.zeros(task.end, self.classifier.shape[1], device=self.classifier.device)
        grown[: task.start] = self.classifier[: task.start]
        self.classifier = grown

    # -- text ----------------------------------------------------------------------------
    def class_prompts(self, names: list[str], templates: list[str]) -> list[str]:
        """Every template around every name, class-major (``len(names) * len(templates)``)."""
        return [t.format(n) for n in names for t in templates]

    def encode_classes(self, text: TextTower, tokens: torch.Tensor, per_class: int) -> torch.Tensor:
        """``(C, E)``: per class the normalised mean of its ``per_class`` normalised template
        embeddings (``tokens`` class-major, ``(C * per_class, L)``); differentiable."""
        emb = text.encode(tokens, normalize=True)
        emb = emb.view(-1, per_class, emb.shape[-1]).mean(1)
        return F.normalize(emb, dim=-1)

    def logits(self, images: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
        """``logit_scale.exp() * cos(image, class text)`` ``(B, C)`` with the current image tower."""
        scale = self.text.logit_scale.exp().detach()
        return scale * F.normalize(self.backbone(images), dim=-1) @ class_text.T

    def ce_loss(self, images: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The classification term: label-smoothed cross-entropy of :meth:`logits` against the
        classes of ``tokens`` (class-major prompts, ``len(templates)`` per class); ``targets``
        index those classes (``0..C-1``)."""
        class_text = self.encode_classes(self.text, tokens, len(self.templates))
        return F.cross_entropy(self.logits(images, class_text), targets, label_smoothing=self.cfg.label_smoothing)

    # -- reference set and distillation --------------------------------------------------------
    def _reference_folder(self) -> tuple[DatasetSplits, list[str]]:
        if self._reference is None:
            cfg: ZSCLConfig = self.cfg  # type: ignore[assignment]
            splits = read_image_folder(cfg.reference_root, "method.reference_root")
            names = (class_names(splits.train.classes, explicit=cfg.reference_class_names)
                     if cfg.reference_class_names is not None else list(splits.class_names))
            self._reference = (splits, names)
        return self._reference

    def reference_images(self, task: Task) -> Dataset:
        """The reference images of ``task`` (evaluation transform): ``reference_root``'s
        ``reference_split``, or the task's training images."""
        cfg: ZSCLConfig = self.cfg  # type: ignore[assignment]
        if cfg.reference_root is None:
            return self.ctx.data.images("train", task.classes, train_transform=False)
        images = getattr(self._reference_folder()[0], cfg.reference_split)
        return TaskImages(images, np.arange(len(images)), images.targets, self.backbone.transform(train=False))

    def reference_texts(self, task: Task) -> tuple[list[str], int]:
        """The reference prompts and how many make one reference text (their embeddings are
        averaged): the sentences of ``reference_texts`` (1 each), else the reference class
        names (``reference_root``'s, or the task's) in ``reference_templates``."""
        cfg: ZSCLConfig = self.cfg  # type: ignore[assignment]
        if cfg.reference_texts is not None:
            if self._sentences is None:
                try:
                    text = Path(cfg.reference_texts).read_text(encoding="utf-8-sig")
                except (OSError, UnicodeDecodeError) as e:
                    raise DataError(f"cannot read method.reference_texts {cfg.reference_texts}: {e}") from None
                self._sentences = [ln.strip() for ln in text.splitlines() if ln.strip()]
                if not self._sentences:
                    raise DataError(f"method.reference_texts {cfg.reference_texts} holds no sentence")
            return self._sentences, 1
        names = (self._reference_folder()[1] if cfg.reference_root is not None
                 else self.ctx.class_names[task.start : task.end])
        return self.class_prompts(names, self.reference_templates), len(self.reference_templates)

    @torch.no_grad()
    def teacher_text(self, prompts: list[str], per_text: int, batch: int = 256) -> torch.Tensor:
        """``(R, E)`` normalised reference text embeddings of the initial CLIP."""
        text = self.teacher.module.text
        rows = batch // per_text * per_text or per_text
        out = [self.encode_classes(text, text.tokenize(prompts[i : i + rows]), per_text)
               for i in range(0, len(prompts), rows)]
        return torch.cat(out)

    def kd_logits(self, ref_images: torch.Tensor, ref_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher and student logits ``(B_ref, R)`` of the reference images against the
        reference texts ``ref_text`` (the initial CLIP's, normalised): ``s r E^T`` with ``r``
        the initial CLIP's image embeddings (no gradient) and ``s c E^T`` with the current
        ones, ``s = logit_scale.exp()``."""
        scale = self.text.logit_scale.exp().detach()
        with torch.no_grad():
            r = F.normalize(self.teacher(ref_images), dim=-1)
        c = F.normalize(self.backbone(ref_images), dim=-1)
        return scale * r @ ref_text.T, scale * c @ ref_text.T

    def kd_loss(self, ref_images: torch.Tensor, ref_text: torch.Tensor) -> torch.Tensor:
        """``image_loss_weight`` KD over the texts + ``text_loss_weight`` KD over the images."""
        cfg: ZSCLConfig = self.cfg  # type: ignore[assignment]
        teacher, student = self.kd_logits(ref_images, ref_text)
        t = cfg.kd_temperature
        return (cfg.image_loss_weight * distillation(teacher, student, t)
                + cfg.text_loss_weight * distillation(teacher.T, student.T, t))

    # -- training ------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """The backbone parameters ZSCL trains (all but :data:`FROZEN`), by name."""
        return {n: p for n, p in self.backbone.named_parameters() if n not in FROZEN}

    def train_task(self, task: Task) -> None:
        cfg: ZSCLConfig = self.cfg  # type: ignore[assignment]
        self.to(self.device)
        data = self.ctx.data
        train = data.images("train", task.classes, train_transform=True)
        loader = data.loader(train, cfg.batch_size, shuffle=cfg.shuffle, seed=100 * task.index)
        total = cfg.iterations or cfg.epochs * len(loader)
        steps = Iterations(loader, total + 1)  # the official range(total_iterations + 1)
        names = self.ctx.class_names[task.start : task.end]
        tokens = self.text.tokenize(self.class_prompts(names, self.templates)).to(self.device)

        distil = self.teacher is not None
        if distil:
            self.teacher.module.to(self.device)
            prompts, per_text = self.reference_texts(task)
            ref_text = self.teacher_text(prompts, per_text).to(self.device)
            ref_loader = data.loader(self.reference_images(task), cfg.reference_batch_size or cfg.batch_size,
                                     shuffle=True, seed=100 * task.index + 50)
            references = _forever(ref_loader)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = self.ce_loss(x, y - task.start, tokens)
            if distil:
                ref_images, _ = next(references)
                loss = loss + self.kd_loss(ref_images.to(self.device), ref_text)
            return loss

        params = self.trainable()
        callbacks: list[Callback] = []
        fit_cfg = cfg
        if cfg.scheduler == "warmup_cosine":
            callbacks.append(WarmupCosine(total, cfg.warmup_steps))
            fit_cfg = dataclasses.replace(cfg, scheduler="constant", warmup_steps=0)
        ensemble = WeightEnsemble(params, cfg.avg_freq) if cfg.weight_ensemble else None
        if ensemble is not None:
            callbacks.append(ensemble)
        for p in params.values():
            p.requires_grad_(True)
        try:
            fit(self, steps, step, list(params.values()), fit_cfg, self.device, 1, f"task {task.index}",
                self.ctx.quiet, [*callbacks, *self.ctx.callbacks], precision=self.ctx.precision)
        finally:
            self.backbone.requires_grad_(False)
        if ensemble is not None:
            ensemble.apply()
            log.info("task %d: weights replaced by the mean of %d ensemble samples", task.index, ensemble.count + 1)

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        """Text embeddings of every seen class through the trained text tower."""
        names = self.ctx.class_names[: task.end]
        tokens = self.text.tokenize(self.class_prompts(names, self.templates))
        self.eval()
        rows = []
        for i in range(0, len(names), 64):
            chunk = tokens[i * len(self.templates) : (i + 64) * len(self.templates)]
            rows.append(self.encode_classes(self.text, chunk.to(self.classifier.device), len(self.templates)))
        self.classifier = torch.cat(rows)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x, self.classifier)

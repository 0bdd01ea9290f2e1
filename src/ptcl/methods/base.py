"""The learner API every method implements, and the context the engine hands it.

Lifecycle (the engine calls these, in this order, for every task ``t``):

``before_task(task)``
    Grow structure for the task's new classes (heads, per-task prompts). Deterministic
    and cheap: on ``--resume`` it is replayed for the finished tasks before their
    checkpoint is loaded, so the module tree matches the saved state.
``train_task(task)``
    Learn from the task's data (``self.ctx.data`` serves images or cached features).
``after_task(task)``
    Post-hoc work once training is done (prototypes, statistics, merging).
``predict(x)``
    Logits over all classes seen so far. ``x`` is a batch of what the learner's
    ``inputs`` serves (:meth:`Learner.eval_dataset`): features from ``self.features``
    (:data:`FEATURES`), images (:data:`IMAGES`), or a tuple ``(images, frozen_features)``
    (:data:`IMAGES_AND_FEATURES`: prompt methods read the query feature from the cache, not
    from a second forward pass). A new input form is a new :class:`Inputs`; the engine
    only calls ``eval_dataset``.

Constructors store; lifecycle methods compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ptcl.backbones.base import Backbone
from ptcl.config import MethodConfig, TrainConfig
from ptcl.data.scenario import Scenario, Task
from ptcl.data.server import DataManager
from ptcl.errors import ConfigError
from ptcl.train.callbacks import Callback
from ptcl.train.loop import fit


def require_vit(backbone: Backbone, what: str, hint: str = "") -> None:
    """Raise a :class:`ConfigError` unless ``backbone`` is a ViT; ``what`` names who needs it."""
    if backbone.kind != "vit":
        raise ConfigError(f"{what} needs a ViT backbone; {backbone.name} is a CNN{hint}")


class Inputs:
    """How a learner's batches are served: ``dataset(learner, split, classes, train)``
    returns the samples of ``classes`` in ``split`` in the form ``predict`` takes (with the
    train augmentation where ``train``)."""

    name = "inputs"

    def dataset(self, learner: Learner, split: str, classes: Sequence[int] | range, train: bool = False) -> Dataset:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class _Images(Inputs):
    name = "images"

    def dataset(self, learner, split, classes, train=False):
        return learner.ctx.data.images(split, classes, train_transform=train)


class _Features(Inputs):
    name = "features"

    def dataset(self, learner, split, classes, train=False):
        return TensorDataset(*learner.features(split, classes))


class _ImagesAndFeatures(Inputs):
    name = "images+features"

    def dataset(self, learner, split, classes, train=False):
        return learner.ctx.data.images_with_features(split, classes, train_transform=train)


IMAGES: Inputs = _Images()
"""Batches of transformed images."""
FEATURES: Inputs = _Features()
"""Batches of :meth:`Learner.features` (default: cached frozen pre-trained features)."""
IMAGES_AND_FEATURES: Inputs = _ImagesAndFeatures()
"""Batches of ``(images, cached frozen features of the same images)``."""


@dataclass
class LearnerContext:
    """What a learner may use from the run (no global state).

    ``class_names``: each class in words, indexed by the scenario's label (label ``i`` is the
    ``i``-th class of the class order), for vision-language methods' text prompts; left
    empty, it is taken from ``data`` (``DatasetSplits.class_names``, see
    :mod:`ptcl.data.class_names`) when ``data`` and ``scenario`` are given."""

    data: DataManager
    scenario: Scenario
    device: torch.device
    seed: int
    quiet: bool = False
    class_names: list[str] = field(default_factory=list)
    precision: str = "fp32"
    """Of the training steps and the image-input evaluation (:mod:`ptcl.precision`)."""
    callbacks: list[Callback] = field(default_factory=list)
    """Run-level train-loop callbacks (the run's loggers): :meth:`Learner.fit` runs them in
    every fit, after the method's own."""

    def __post_init__(self) -> None:
        splits = getattr(self.data, "splits", None)
        if not self.class_names and self.scenario is not None and splits is not None:
            self.class_names = self.scenario.by_label(splits.class_names)


class Learner(nn.Module):
    """Base class of all methods. See the module docstring for the lifecycle."""

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    inputs: ClassVar[Inputs] = IMAGES
    #: True when the method changes the pre-trained backbone's own weights (checkpoints then
    #: store them). Subclasses set it per class or per instance (in ``__init__``).
    updates_backbone: bool = False

    def __init__(self, cfg: MethodConfig, backbone: Backbone, ctx: LearnerContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.ctx = ctx
        self._pretrained_keys = {f"backbone.{k}" for k in backbone.state_dict()}
        backbone.requires_grad_(False)

    # -- lifecycle ---------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        """Grow structure for ``task``'s classes (replayed on resume)."""

    def train_task(self, task: Task) -> None:
        """Learn from ``task``'s training data."""

    def after_task(self, task: Task) -> None:
        """Post-training work for ``task``."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the classes seen so far."""
        raise NotImplementedError

    def features(self, split: str, classes: Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
        """The features ``predict`` takes with ``inputs = FEATURES`` (default: the cached
        frozen pre-trained features). Override to serve e.g. adapted features."""
        return self.ctx.data.features(split, classes)

    def eval_dataset(self, classes: Sequence[int] | range) -> Dataset:
        """Test samples of ``classes`` in the form :meth:`predict` takes."""
        return self.inputs.dataset(self, "test", classes)

    #: ``predict`` may return logits for classes not seen yet after the seen ones (an official
    #: evaluation over a full-size head, e.g. DAP's on CIFAR-100): a prediction of an unseen class
    #: counts as wrong. Otherwise ``predict`` returns exactly one logit per seen class.
    scores_unseen_classes: bool = False

    #: What ``metrics.json`` records as ``eval_protocol`` (:data:`ptcl.report.results.PROTOCOLS`):
    #: ``"per_image"`` unless a prediction depends on the other images of its test batch.
    eval_protocol: str = "per_image"

    def eval_batches(self, classes: Sequence[int] | range, batch_size: int) -> list[list[int]] | None:
        """Index batches into :meth:`eval_dataset` ``(classes)``, each index exactly once, or
        ``None`` (the default): the stored order in chunks of the run's ``batch_size``. A
        learner whose prediction of an image depends on its batch (``batchwise_prompt``)
        serves the order and batch size of its official test loaders."""
        return None

    def inference_cost(self) -> dict[str, int]:
        """What predicting one image costs after the current task, for ``metrics.json``
        (``rows[i]["inference"]``):

        * ``backbone_passes``: full passes of the backbone per image (an ensemble of
          per-task adapter sets runs one per expert; a merged model one);
        * ``experts_run``: tuning states (experts) evaluated per image;
        * ``parameters``: elements of the learner's parameters (``nn.Parameter`` s: backbone,
          tuning modules, heads; heads grow with the classes; buffers such as stored
          statistics, snapshots kept for a later merge or Fisher values are not counted:
          they are not used to predict).

        Default: one pass, one expert. Ensembles override it (their cost grows with the
        tasks); a merged model's stays constant."""
        return {"backbone_passes": 1, "experts_run": 1, "parameters": sum(p.numel() for p in self.parameters())}

    def predict_with_variants(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`predict` ``(x)`` and the logits of the model's other classifiers (name ->
        ``(B, seen classes)``), from one forward pass, whose accuracy the evaluation also
        records in ``metrics.json`` ``rows[i]["variants"][name]`` (accuracy, per-task row,
        old/new) and ``variants[name]`` (average and last accuracy): e.g. iCaRL's CNN beside
        its NME classifier, as LAMDA-PILOT reports both. Default: ``predict(x)`` and none."""
        return self.predict(x), {}

    # -- helpers for subclasses ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def fit(
        self,
        dataset: Dataset,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        params: Iterable,
        cfg: TrainConfig | None = None,
        epochs: int | None = None,
        desc: str = "train",
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        drop_last: bool = False,
    ) -> list[float]:
        """Run the one train loop (:func:`ptcl.train.fit`) over ``dataset`` (shuffled with
        the run seed + ``seed`` unless ``cfg.shuffle`` is false; the last incomplete batch
        dropped with ``drop_last``) with this method's options (or ``cfg``)."""
        cfg = cfg or self.cfg  # type: ignore[assignment]
        loader = self.ctx.data.loader(dataset, cfg.batch_size, shuffle=getattr(cfg, "shuffle", True), seed=seed,
                                      drop_last=drop_last)
        return fit(self, loader, step, params, cfg, self.device, epochs, desc, self.ctx.quiet,
                   [*callbacks, *self.ctx.callbacks], precision=self.ctx.precision)

    # -- checkpointing --------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: everything except unchanged pre-trained weights."""
        sd = self.state_dict()
        if self.updates_backbone:
            return sd
        return {k: v for k, v in sd.items() if k not in self._pretrained_keys}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if self.updates_backbone or k not in self._pretrained_keys]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the learner: missing {missing[:5]}, unexpected {unexpected[:5]}")

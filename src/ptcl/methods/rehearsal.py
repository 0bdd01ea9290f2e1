"""What the exemplar rehearsal baselines share: iCaRL, DER, FOSTER, MEMO.

LAMDA-PILOT runs these classic class-incremental methods on pre-trained backbones
(``models/icarl.py``, ``der.py``, ``foster.py``, ``memo.py``; ``exps/*.json``), and papers
report them as baselines beside the PTM methods. They share:

* **an exemplar memory** (:class:`ptcl.data.memory.ExemplarMemory`): after each task the
  new classes' exemplars are chosen (herding by default) on the model's own features of
  their training images (eval transform), and every held class shrinks to the budget.
  PILOT's three budget keys keep their meaning: ``fixed_memory: false`` (PILOT's exps) gives
  ``memory_size // seen classes`` per class, ``true`` gives ``memory_per_class``. The next
  tasks train on the task's images plus the exemplars (:func:`ptcl.data.memory.images_with_memory`);
* **two learning-rate settings**: PILOT trains the first task with ``init_epoch``,
  ``init_lr``, ``init_weight_decay``, ``init_milestones``, ``init_lr_decay`` and the later
  ones with ``epochs``, ``lrate``, ``weight_decay``, ``milestones``, ``lrate_decay`` (SGD,
  momentum 0.9, step decay). Here: ``init_*`` options (null: the later value) beside the
  usual ``epochs``, ``lr``, ...;
* **a nearest-mean-of-exemplars classifier** (NME, iCaRL; PILOT ``models/base.py``
  ``_eval_nme``): class means of the L2-normalised features of each class's exemplars
  (renormalised), recomputed with the current model after every task; a test image goes to
  the nearest mean (squared Euclidean distance of its normalised feature). PILOT reports
  the CNN (the trained head) and the NME accuracy of every rehearsal model; here the one
  ``classifier`` selects is the run's accuracy and the other is recorded in
  ``metrics.json`` under ``rows[i]["variants"]`` (:meth:`Learner.predict_with_variants`: both from one forward pass).
* **a teacher**: the model after the previous task, a :class:`~ptcl.train.snapshot.Snapshot`
  taken at the start of the task (so ``--resume`` rebuilds it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ptcl.config import TrainConfig
from ptcl.data.features import extract_features
from ptcl.data.memory import ExemplarMemory, images_with_memory
from ptcl.data.scenario import Task
from ptcl.data.server import TaskImages
from ptcl.errors import ConfigError
from ptcl.methods.base import IMAGES, Learner
from ptcl.options import option
from ptcl.seeding import generator
from ptcl.train.callbacks import Callback
from ptcl.train.snapshot import Snapshot

PILOT_MEMORY = "LAMDA-PILOT exps/{icarl,der,memo}.json (memory_size 2000, fixed_memory false)"

Classifier = Literal["cnn", "nme"]


@dataclass
class RehearsalConfig(TrainConfig):
    """Options shared by the rehearsal baselines: the memory budget (PILOT's keys), the
    first task's training settings (``init_*``; null: the later tasks' value) and the
    classifier whose accuracy the run reports."""

    scheduler: Literal["cosine", "cosine_step", "multistep", "constant", "coda_cosine"] = option(
        "multistep", "lr schedule (PILOT: MultiStepLR)", source="LAMDA-PILOT models/{icarl,der,memo}.py")
    momentum: float = option(0.9, "SGD momentum", ge=0, lt=1, source="LAMDA-PILOT models/*.py")
    init_epochs: int | None = option(None, "epochs of the first task; null: epochs", gt=0,
                                     source="ptcl (null: the later tasks' value)")
    init_lr: float | None = option(None, "learning rate of the first task; null: lr", gt=0,
                                   source="ptcl (null: the later tasks' value)")
    init_weight_decay: float | None = option(None, "weight decay of the first task; null: weight_decay", ge=0,
                                             source="ptcl (null: the later tasks' value)")
    init_milestones: list[int] | None = option(None, "multistep milestones of the first task; null: milestones",
                                               gt=0, source="ptcl (null: the later tasks' value)")
    init_lr_decay: float | None = option(None, "multistep lr factor of the first task; null: lr_decay", gt=0,
                                         source="ptcl (null: the later tasks' value)")
    memory_size: int = option(2000, "total exemplars shared by the seen classes (memory_size // seen "
                              "classes per class) when fixed_memory is false", gt=0, source=PILOT_MEMORY)
    memory_per_class: int = option(20, "exemplars per class when fixed_memory is true", gt=0, source=PILOT_MEMORY)
    fixed_memory: bool = option(False, "true: memory_per_class exemplars per class; false: memory_size in all",
                                source=PILOT_MEMORY)
    memory_selection: Literal["herding", "closest_to_mean", "random"] = option(
        "herding", "how the exemplars of a new class are chosen (ptcl.data.memory)",
        source="LAMDA-PILOT models/base.py _construct_exemplar (herding)")
    classifier: Classifier = option(
        "cnn", "the classifier whose accuracy the run reports: cnn (the trained head) or nme (nearest mean of "
        "exemplars); the other one's is recorded under metrics.json rows[i].variants",
        source="LAMDA-PILOT trainer.py (CNN curve first; NME beside it)")

    def task_config(self, task: Task) -> RehearsalConfig:
        """The training options of ``task``: the ``init_*`` values (where set) for the first
        task, the plain ones after."""
        if task.index > 0:
            return self
        first = {"epochs": self.init_epochs, "lr": self.init_lr, "weight_decay": self.init_weight_decay,
                 "milestones": self.init_milestones, "lr_decay": self.init_lr_decay}
        return dataclasses.replace(self, **{k: v for k, v in first.items() if v is not None})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_selection not in ("herding", "closest_to_mean", "random"):
            raise ConfigError(f"method.memory_selection must be herding, closest_to_mean or random, "
                              f"got {self.memory_selection!r}")


def softmax_kd(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """PILOT's ``_KD_loss``: ``-sum_c softmax(teacher / T)_c log_softmax(logits / T)_c``,
    summed over the classes and averaged over the batch (``logits``, ``teacher_logits``: ``(B, K)``)."""
    return -(torch.softmax(teacher_logits / T, 1) * torch.log_softmax(logits / T, 1)).sum() / len(logits)


class RehearsalLearner(Learner):
    """Base of the rehearsal baselines (see the module docstring).

    Subclasses set ``self.head`` (the trained classifier over :meth:`embed`'s features),
    override :meth:`embed` where the features are not the backbone's (``(B, feature_dim)``:
    what the head, herding and NME use) and implement ``train_task``; :meth:`train_dataset` serves the task's images plus the
    exemplars, :meth:`take_teacher` snapshots the model in ``before_task``."""

    config_cls = RehearsalConfig
    inputs = IMAGES
    updates_backbone = True
    #: tests: 2 exemplars per class, one epoch on the first task too
    test_options = {"fixed_memory": True, "memory_per_class": 2, "init_epochs": 1}

    def __init__(self, cfg: RehearsalConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        classes = getattr(ctx.scenario, "num_classes", 0)
        if not cfg.fixed_memory and cfg.memory_size < classes:
            raise ConfigError(
                f"method.memory_size={cfg.memory_size} keeps no exemplar per class once all {classes} classes are "
                f"seen (memory_size // classes = 0); raise memory_size to at least {classes} or set "
                "method.fixed_memory=true with memory_per_class")
        self.memory = ExemplarMemory(per_class=cfg.memory_per_class if cfg.fixed_memory else None,
                                     total=None if cfg.fixed_memory else cfg.memory_size,
                                     selection=cfg.memory_selection)
        self.register_buffer("nme_means", torch.zeros(0, 0))
        self.teacher: Snapshot | None = None

    # -- what subclasses provide ---------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        """Width of :meth:`embed`'s features."""
        return self.backbone.feature_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, feature_dim)`` of a batch of images (default: the backbone's)."""
        return self.backbone(x)

    def cnn_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The trained head's logits ``(B, seen classes)``: ``head(embed(x))``."""
        return self.head(self.embed(x))

    # -- shared machinery ------------------------------------------------------------------
    def take_teacher(self, task: Task) -> None:
        """From the second task on, freeze a copy of the model after the previous task as the
        teacher (call it in ``before_task`` before growing anything)."""
        self.teacher = None  # never copy the previous teacher into the new one
        if task.index > 0:
            self.teacher = Snapshot(self)

    def train_dataset(self, task: Task) -> TaskImages:
        """The task's training images (train augmentation) followed by the exemplars."""
        return images_with_memory(self.ctx.data, task.classes, self.memory, train_transform=True)

    def class_counts(self, task: Task) -> torch.Tensor:
        """Samples per seen class ``(task.end,)`` (long) in ``task``'s training set
        (:meth:`train_dataset`): the task's images for its new classes, the exemplars held for
        the old ones (FOSTER's class-balanced weights, DGR's class prior)."""
        data = self.ctx.data
        labels = np.concatenate([data.label["train"][data.positions("train", task.classes)],
                                 self.memory.labels.cpu().numpy()])
        return torch.from_numpy(np.bincount(labels, minlength=task.end)[: task.end]).long()

    def fit_task(self, task: Task, step: Callable, params, desc: str | None = None, epochs: int | None = None,
                 cfg: RehearsalConfig | None = None, callbacks: Sequence[Callback] = ()) -> list[float]:
        """:meth:`Learner.fit` over :meth:`train_dataset` with the task's options
        (:meth:`RehearsalConfig.task_config`) and the method's train-loop ``callbacks``."""
        cfg = cfg or self.cfg.task_config(task)  # type: ignore[attr-defined]
        return self.fit(self.train_dataset(task), step, params, cfg, epochs=epochs,
                        desc=desc or f"task {task.index}", seed=task.index, callbacks=callbacks)

    @torch.no_grad()
    def _embed_at(self, positions) -> torch.Tensor:
        data = self.ctx.data
        ds = data.images_at("train", positions, train_transform=False)
        self.eval()
        return extract_features(self.embed, ds, data.batch_size, data.num_workers, self.device,
                                desc="exemplar features", quiet=self.ctx.quiet, precision=self.ctx.precision,
                                preprocess=self.backbone.preprocess, timer=getattr(data, "timer", None))

    def update_memory(self, task: Task) -> None:
        """Add ``task``'s classes to the memory (their exemplars chosen on the current model's
        features), shrink the old ones, and recompute every held class's NME mean."""
        data = self.ctx.data
        if self.memory.budget(task.end) < 1:
            raise ConfigError(
                f"method.memory_size={self.memory.total} keeps no exemplar for {task.end} seen classes "
                f"(memory_size // classes = 0); raise memory_size to at least "
                f"{self.ctx.scenario.num_classes} or set method.fixed_memory=true with memory_per_class")
        pos = data.positions("train", task.classes)
        labels = torch.from_numpy(data.label["train"][pos])
        feats = self._embed_at(pos) if self.memory.selection != "random" else None
        self.memory.update(pos, labels, feats, generator(self.ctx.seed, "rehearsal-memory", task.index))
        self.compute_nme_means(task.end)

    def compute_nme_means(self, num_classes: int) -> None:
        """``nme_means`` ``(num_classes, feature_dim)``: per class, the renormalised mean of
        the L2-normalised features of its exemplars (PILOT ``_reduce_exemplar`` /
        ``_construct_exemplar``)."""
        feats = self._embed_at(self.memory.positions.cpu().numpy())
        feats = F.normalize(feats.double(), dim=1)
        labels = self.memory.labels.cpu()
        means = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64)
        for c in range(num_classes):
            rows = feats[labels == c]
            if len(rows):
                means[c] = F.normalize(rows.mean(0), dim=0)
        self.nme_means = means.float().to(self.nme_means.device)

    def nme_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Minus the squared Euclidean distance of each normalised feature to each class's
        NME mean: ``(B, seen classes)``; the nearest mean scores highest."""
        return self._nme_scores(self.embed(x))

    def _nme_scores(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.float(), dim=1)
        return -torch.cdist(f, self.nme_means.to(f.device)).pow(2)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        f = self.embed(x)
        return self._nme_scores(f) if self.cfg.classifier == "nme" else self.head(f)  # type: ignore[attr-defined]

    def predict_with_variants(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reported classifier's logits and the other one's (``{"cnn"|"nme": logits}``), from
        one :meth:`embed` pass."""
        f = self.embed(x)
        both = {"cnn": self.head(f), "nme": self._nme_scores(f)}
        return both.pop(self.cfg.classifier), both  # type: ignore[attr-defined]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        key = prefix + "nme_means"  # grows with the classes and the feature width
        if key in state_dict:
            self.nme_means = state_dict[key].to(self.nme_means.device).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

"""What the prompt methods on a frozen ViT share: L2P, DualPrompt, CODA-Prompt, DAP.

Shared machinery, not a registered method: :mod:`ptcl.methods.l2p`,
:mod:`ptcl.methods.dualprompt`, :mod:`ptcl.methods.coda_prompt` and :mod:`ptcl.methods.dap`
subclass :class:`PromptPoolLearner` and hold only what differs (which prompts an image gets
and where they enter the ViT). The prompts enter through the parameter-free
:class:`~ptcl.peft.prompting.PromptInjector`; pools, keys and key-query matching are in
:mod:`ptcl.peft.prompting`.

:class:`PromptPoolLearner` provides:

* the query: the frozen pre-trained ViT's CLS feature (after the final norm) comes from the
  feature cache (``inputs = IMAGES_AND_FEATURES``), so no second forward pass is run. An
  image's query is computed from its *un-augmented* view (eval transform) while the
  prompted pass sees the augmented view (the official codes query the augmented view, a
  deviation every subclass shares) -- ``benchmarks/bench_prompt_query.py`` measures what
  this saves;
* a growing linear head and the train step: cross-entropy over the current task's classes
  only (``train_mask``: the logits of old classes are masked, as in the official codes)
  plus :meth:`PromptPoolLearner.aux_loss` (default: minus ``pull_coeff`` times the
  key-query pull, L2P's surrogate loss); the optimiser is re-created every task;
* task inference for methods with one prompt set or key per task (DualPrompt's E-prompts,
  DAP's task keys; :meth:`PromptPoolLearner.task_keys`): the training task while
  training, at test the seen task whose key is most cosine-similar to the query, and the
  check that the pool has an entry for every task of the scenario (when the learner is
  built, so a run fails before its folder is written, and again in ``before_task``);
* the test batches (:meth:`PromptPoolLearner.eval_batches`, read by
  :mod:`ptcl.engine.evaluate`). With ``batchwise_prompt`` the majority of a test batch picks
  the prompts (or task) of all its images, so the batches decide the result. The official
  codes serve test batches that hold one task: the PyTorch ports of L2P and DualPrompt
  (JH-LEE-KR/l2p-pytorch and dualprompt-pytorch ``datasets.py``
  ``build_continual_dataloader``: one sequential test loader per task, batch
  ``args.batch_size``; ``engine.py`` ``evaluate_till_now`` tests task by task) and DAP
  (naver-ai/dap-cl ``src/engine/trainer.py`` ``eval_classifier_continual``: one loader per
  task, batch ``DATA.BATCH_SIZE``); LAMDA-PILOT's test set is sorted by class
  (``utils/data_manager.py`` ``get_dataset`` concatenates class by class; ``models/l2p.py``,
  ``models/dualprompt.py``: test batch ``args["batch_size"]``). Either way the vote sees
  the task: ``eval_order: task`` / ``class`` with ``batchwise_prompt: true`` reproduce
  these protocols, and ``metrics.json`` marks such a run (``eval_protocol``). The default
  (``batchwise_prompt: false``) predicts every image on its own, whatever the order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.linear import IncrementalLinear
from ptcl.methods.base import IMAGES_AND_FEATURES, Learner, require_vit
from ptcl.options import option
from ptcl.peft.prompting import (
    PromptInjector,
    attach_prompting,
    cosine_similarity,
    select_topk,
    surrogate_pull,
)
from ptcl.report.results import PER_IMAGE

log = logging.getLogger(__name__)


_PROMPT_CODES = "official L2P, DualPrompt and CODA-Prompt codes"
_L2P_PORT = "L2P PyTorch port JH-LEE-KR/l2p-pytorch, CIFAR-100 (= PILOT exps/l2p.json)"
_TEST_LOADERS = (
    "official test loaders: one per task in l2p-pytorch and dualprompt-pytorch datasets.py "
    "build_continual_dataloader and dap-cl src/engine/trainer.py eval_classifier_continual; "
    "sorted by class in LAMDA-PILOT utils/data_manager.py get_dataset"
)


@dataclass
class PromptConfig(TrainConfig):
    """Options every prompt method here shares: Adam without weight decay, cross-entropy
    over the current task's classes (the official L2P, DualPrompt and CODA-Prompt codes)."""

    optimizer: Literal["sgd", "adam", "adamw"] = option("adam", source=_PROMPT_CODES)
    weight_decay: float = option(0.0, source=_PROMPT_CODES)
    train_mask: bool = option(
        True, "cross-entropy over the current task's classes only (old classes' logits masked); "
        "false: over all classes seen so far", source=_PROMPT_CODES)


@dataclass
class PromptPoolConfig(PromptConfig):
    """Options of the key-query prompt methods (L2P's official defaults)."""

    epochs: int = option(5, source=_L2P_PORT)
    lr: float = option(0.001875, source=f"{_L2P_PORT}: 0.03 * batch 16 / 256")
    batch_size: int = option(16, source=_L2P_PORT)
    scheduler: Literal["cosine", "constant"] = option("constant", source=_L2P_PORT)
    clip_grad: float | None = option(1.0, source=_L2P_PORT)
    pull_coeff: float = option(
        0.1, "weight of the key-query surrogate loss (the loss subtracts pull_coeff x the summed "
        "cosine of the query and the selected keys)", ge=0,
        source=f"{_L2P_PORT} (the JAX config: 1.0)")
    batchwise_prompt: bool = option(
        False, "at test time every image of a batch gets the batch's most frequent prompts (or task), "
        "so the test batches (eval_order, eval_batch_size) decide the result; false: chosen per image",
        source="ptcl (a deviation: the official codes use true)")
    eval_order: Literal["mixed", "class", "task"] = option(
        "mixed", "order in which the test samples are served, which forms the test batches: mixed = "
        "classes and tasks mixed (with batchwise_prompt a seeded shuffle, else the stored order), "
        "class = sorted by class (LAMDA-PILOT), task = one task after another, no batch mixing two "
        "tasks (the official L2P, DualPrompt and DAP codes). With batchwise_prompt, class and task "
        "let the batch vote see the task (metrics.json eval_protocol says so)",
        source=f"ptcl (task-agnostic); {_TEST_LOADERS}")
    eval_batch_size: int | None = option(
        None, "test batch size; null: the training batch_size with batchwise_prompt (as every "
        "official code tests), else the run's eval_batch_size (per-image predictions do not depend on it)",
        ge=1, source="official test batch = training batch: l2p-pytorch/dualprompt-pytorch datasets.py "
        "(args.batch_size: 16 / 24), dap-cl configs/base-dap.yaml (DATA.BATCH_SIZE 128), "
        "LAMDA-PILOT models/l2p.py, dualprompt.py (args['batch_size'])")


class PromptPoolLearner(Learner):
    """Base of the query-driven prompt methods on a frozen ViT (see the module docstring).

    * ``predict`` / training get ``(images, query)``: the query ``(B, D)`` is the cached
      frozen pre-trained feature of the same image.
    * ``prompted_features(images, query, task)`` (subclasses) returns the ``(B, D)``
      features fed to the linear head and the auxiliary term (:meth:`aux_loss`); ``task``
      is the training task, ``None`` at test time (then the prompts must be inferred from
      the query).
    * ``seen_tasks`` (a buffer, so it is checkpointed) counts the tasks started.
    """

    config_cls = PromptPoolConfig
    inputs = IMAGES_AND_FEATURES
    #: What the pool keeps per task (named in the pool-size error); ``None``: the method
    #: has no per-task pool entries and :meth:`check_tasks` checks nothing.
    per_task: ClassVar[str | None] = None

    def __init__(self, cfg: PromptConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        require_vit(backbone, f"method {cfg.name}")
        attach_prompting(backbone.model)
        self.head = IncrementalLinear(backbone.feature_dim)
        self.register_buffer("seen_tasks", torch.tensor(0))
        scenario = getattr(ctx, "scenario", None)  # None in unit tests with a fake context
        if scenario is not None:
            self.check_tasks(scenario.num_tasks)

    @property
    def prompting(self) -> PromptInjector:
        return self.backbone.model.tuning_prompting

    def check_tasks(self, num_tasks: int) -> None:
        """Raise :class:`ConfigError` when the method cannot hold ``num_tasks`` tasks
        (default: with :attr:`per_task` set, ``method.pool_size`` must be >= ``num_tasks``)."""
        if self.per_task is not None and num_tasks > self.cfg.pool_size:
            raise ConfigError(
                f"method.pool_size={self.cfg.pool_size} is smaller than the scenario's {num_tasks} tasks: "
                f"{self.cfg.name} keeps one {self.per_task} per task; set method.pool_size={num_tasks} (or more)"
            )

    def before_task(self, task: Task) -> None:
        self.check_tasks(max(task.num_tasks, task.index + 1))
        self.head.grow(task.num_new)
        self.seen_tasks += 1

    def prompted_features(
        self, images: torch.Tensor, query: torch.Tensor, task: Task | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prompted_backbone(self, images: torch.Tensor, **prompts: Any) -> torch.Tensor:
        """``(B, D)`` pooled features of the backbone run with ``prompts`` (the keyword
        arguments of :meth:`~ptcl.peft.prompting.PromptInjector.use`)."""
        with self.prompting.use(**prompts):
            return self.backbone(images)

    # -- task inference (methods with one key per task) -----------------------------------
    def task_keys(self) -> torch.Tensor:
        """``(pool_size, D)``: one key per task (methods that infer the task)."""
        raise NotImplementedError(f"{type(self).__name__} does not infer tasks")

    def task_index(self, query: torch.Tensor) -> torch.Tensor:
        """``(B,)`` inferred task of each query: the seen task whose key is most
        cosine-similar (with ``batchwise_prompt``: the batch's most frequent one)."""
        sim = cosine_similarity(query, self.task_keys()[: int(self.seen_tasks)])
        return select_topk(sim, 1, self.cfg.batchwise_prompt)[:, 0]

    def tasks_of(self, query: torch.Tensor, task: Task | None) -> torch.Tensor:
        """``(B,)`` task whose prompts each image uses: the training task while training,
        the task inferred from the query (:meth:`task_index`) at test time."""
        if task is None:
            return self.task_index(query)
        return torch.full((query.shape[0],), task.index, dtype=torch.long, device=query.device)

    def task_pull(self, query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """L2P's surrogate pull of the keys of tasks ``idx`` ``(B,)`` toward the queries
        (:func:`~ptcl.peft.prompting.surrogate_pull`)."""
        return surrogate_pull(query, self.task_keys(), idx[:, None])

    # -- training ----------------------------------------------------------------------------
    def prepare_task(self, task: Task) -> None:
        """Called at the start of ``train_task`` (e.g. to initialise the task's prompt)."""

    def trainable(self) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates (default: all of the learner's own)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def aux_loss(self, aux: torch.Tensor) -> torch.Tensor:
        """The term added to the cross-entropy, from the second output of
        :meth:`prompted_features` (default: minus ``pull_coeff`` times the key-query pull)."""
        return -self.cfg.pull_coeff * aux

    def train_task(self, task: Task) -> None:
        cfg = self.cfg
        self.prepare_task(task)
        data = self.ctx.data.images_with_features("train", task.classes, train_transform=True)
        lo = task.start if cfg.train_mask else 0

        def step(x: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
            feats, aux = self.prompted_features(x[0], x[1], task)
            logits = self.head(feats)[:, lo : task.end]
            return F.cross_entropy(logits, y - lo) + self.aux_loss(aux)

        self.to(self.device)
        losses = self.fit(data, step, self.trainable(), desc=f"task {task.index}", seed=task.index)
        log.info("%s task %d: loss %.4f -> %.4f", cfg.name, task.index, losses[0], losses[-1])

    def predict(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        feats, _ = self.prompted_features(x[0], x[1], None)
        return self.head(feats)

    # -- evaluation protocol (read by ptcl.engine.evaluate) ----------------------------------
    @property
    def eval_protocol(self) -> str:
        """``"per_image"``, or with ``batchwise_prompt`` ``"batchwise_<eval_order>_order"``
        (``class`` / ``task``: task identity leaks through batch composition)."""
        if not getattr(self.cfg, "batchwise_prompt", False):
            return PER_IMAGE
        return f"batchwise_{self.cfg.eval_order}_order"

    def eval_batches(self, classes: Sequence[int] | range, batch_size: int) -> list[list[int]]:
        """Index batches into :meth:`eval_dataset` ``(classes)`` in ``method.eval_order``, of
        ``method.eval_batch_size`` samples (null: ``method.batch_size`` with
        ``batchwise_prompt``, else the run's ``eval_batch_size``); see :func:`ordered_batches`."""
        cfg = self.cfg
        batchwise = getattr(cfg, "batchwise_prompt", False)
        size = getattr(cfg, "eval_batch_size", None) or (cfg.batch_size if batchwise else batch_size)
        order = getattr(cfg, "eval_order", "mixed")
        labels = self.ctx.data.labels("test", classes).numpy()
        ends = np.cumsum(self.ctx.scenario.sizes) if order == "task" else []
        return ordered_batches(labels, order, size, ends, seed=self.ctx.seed if batchwise else None)


def ordered_batches(
    labels: np.ndarray, order: str, batch_size: int, task_ends: Sequence[int], seed: int | None = None
) -> list[list[int]]:
    """Batches of indices into ``labels`` ``(N,)`` (remapped class labels), each index once.

    ``order``: ``"mixed"``: the stored order (``seed`` ``None``) or a permutation drawn from
    ``seed``; ``"class"``: sorted by label, the stored order within a class, cut into
    ``batch_size`` chunks that may straddle classes and tasks (LAMDA-PILOT's class-sorted
    test set); ``"task"``: task by task (``task_ends``: the cumulative class counts, e.g.
    ``[10, 20, ...]``), the stored order within a task, cut per task, so no batch holds two
    tasks and a task's last batch may be smaller (the official per-task test loaders).
    Raises ``ValueError`` for another ``order``.
    """
    labels = np.asarray(labels)
    if order == "class":
        groups = [np.argsort(labels, kind="stable")]
    elif order == "task":
        task = np.searchsorted(np.asarray(task_ends), labels, side="right")
        groups = [np.flatnonzero(task == t) for t in np.unique(task)]
    elif order == "mixed":
        n = len(labels)
        groups = [np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)]
    else:
        raise ValueError(f"unknown eval order {order!r}; valid: mixed, class, task")
    return [g[i : i + batch_size].tolist() for g in groups for i in range(0, len(g), batch_size)]

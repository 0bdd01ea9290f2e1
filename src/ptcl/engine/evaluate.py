"""Evaluation after each task: predictions on the test samples of all seen classes.

How the test samples are cut into batches is the learner's to say, through two members of
:class:`~ptcl.methods.base.Learner`:

``eval_batches(classes, batch_size) -> list[list[int]] | None``
    Index batches into ``learner.eval_dataset(classes)``, each index exactly once;
    ``batch_size`` is the run's ``eval_batch_size``. Default (``None``): the stored order
    cut into ``batch_size`` chunks. A learner whose prediction of an image depends on the other
    images of its batch (the prompt methods' ``batchwise_prompt``) serves the test set in
    the order and batch size its official code tests with
    (:meth:`~ptcl.methods.prompt_pool.PromptPoolLearner.eval_batches`).
``eval_protocol: str``
    What ``metrics.json`` records as ``eval_protocol`` (described in
    :data:`ptcl.report.results.PROTOCOLS`). Default ``"per_image"``: every prediction is
    the image's own.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ptcl import dist
from ptcl.data.loading import DeviceLoader, loader_workers, split_text, timed, timer_of
from ptcl.data.scenario import Task
from ptcl.errors import TrainingDiverged
from ptcl.methods.base import FEATURES, Learner
from ptcl.precision import autocast
from ptcl.seeding import isolated_rng
from ptcl.train.loop import to_device

log = logging.getLogger(__name__)


def eval_dataset(learner: Learner, classes: range) -> Dataset:
    """Test samples of ``classes`` in the form ``learner.predict`` takes (the learner says)."""
    return learner.eval_dataset(classes)


def eval_protocol(learner: Learner) -> str:
    """The learner's evaluation protocol for ``metrics.json`` (default ``"per_image"``)."""
    return str(learner.eval_protocol)


def eval_batches(learner: Learner, classes: range, batch_size: int, n: int) -> list[list[int]]:
    """Index batches over the ``n`` samples of ``learner.eval_dataset(classes)``: the
    learner's ``eval_batches`` where it has one, else the stored order in ``batch_size``
    chunks. Raises ``RuntimeError`` unless every index in ``[0, n)`` occurs exactly once."""
    own = learner.eval_batches(classes, batch_size)
    if own is None:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    batches = [list(map(int, b)) for b in own]
    flat = np.sort(np.fromiter((i for b in batches for i in b), dtype=np.int64))
    if any(not b for b in batches) or len(flat) != n or not np.array_equal(flat, np.arange(n)):
        raise RuntimeError(
            f"{type(learner).__name__}.eval_batches must cover each of the {n} test samples once "
            f"in non-empty batches (got {len(flat)} indices in {len(batches)} batches)"
        )
    return batches


def eval_precision(learner: Learner) -> str:
    """The precision ``learner.predict`` runs in (:mod:`ptcl.precision`): the run's
    (``learner.ctx.precision``) where it takes images (a network forward), float32 where it
    takes cached features (its head: prototypes, ridge, statistics, kept in float32)."""
    return "fp32" if learner.inputs is FEATURES else learner.ctx.precision


@torch.inference_mode()  # no predict needs autograd; tests/test_methods_registry.py evaluates every method
def predict_seen(learner: Learner, task: Task, batch_size: int = 256,
                 variants: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 predictions and remapped labels for every test sample of classes ``< task.end``,
    in the order the learner's :func:`eval_batches` serves them (``(N,)`` each). A dict given
    as ``variants`` receives the top-1 predictions ``(N,)`` of each of the learner's
    :meth:`~ptcl.methods.base.Learner.predict_with_variants`, on the same batches. Runs under
    ``torch.inference_mode`` and in :func:`eval_precision`. Logs this evaluation's data wait
    vs compute and the task's total (its fits and feature extractions too,
    :class:`~ptcl.data.loading.InputTimer`), and resets that total.

    Runs with the global random generators isolated: evaluating (and the feature-cache
    misses it may cause) never changes what the learner draws afterwards.
    """
    with isolated_rng():
        return _predict_seen(learner, task, batch_size, variants)


def _check_logits(learner: Learner, task: Task, logits: torch.Tensor) -> None:
    extra_ok = learner.scores_unseen_classes and task.end < logits.shape[1] <= learner.ctx.scenario.num_classes
    if logits.shape[1] != task.end and not extra_ok:
        raise RuntimeError(f"{type(learner).__name__}.predict returned {logits.shape[1]} logits, expected {task.end}")
    bad = torch.isnan(logits) | torch.isposinf(logits)
    if bool(bad.any()):
        raise TrainingDiverged(
            f"the learned model predicts NaN or +inf logits for {int(bad.any(1).sum())} of "
            f"{len(logits)} test samples in a batch; its state is not finite (diverged "
            "training: lower method.lr or set method.clip_grad)"
        )


def _predict_seen(learner: Learner, task: Task, batch_size: int,
                  variants: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    data = learner.ctx.data
    classes = range(0, task.end)
    ds = eval_dataset(learner, classes)
    learner.eval()
    precision = eval_precision(learner)
    preds, labels = [], []
    other_preds: dict[str, list[torch.Tensor]] = {}
    served = getattr(data, "backbone", None)  # images arrive uint8, normalised on the device (ptcl.data.loading)
    loader = DeviceLoader(ds, batch_sampler=dist.shard_list(eval_batches(learner, classes, batch_size, len(ds))),
                          num_workers=loader_workers(data.num_workers, len(ds)), device=learner.device,
                          preprocess=getattr(served, "preprocess", None))
    wait, t0 = [0.0], time.perf_counter()
    for xb, yb in timed(tqdm(loader, desc=f"eval {task.index}", disable=learner.ctx.quiet, leave=False), wait):
        xb = to_device(xb, learner.device)
        with autocast(learner.device, precision):
            if variants is None:
                logits, other_logits = learner.predict(xb), {}
            else:  # the other classifiers from the same forward pass
                logits, other_logits = learner.predict_with_variants(xb)
        for lg in (logits, *other_logits.values()):
            _check_logits(learner, task, lg)
        preds.append(logits.argmax(1).cpu())
        for k, lg in other_logits.items():
            other_preds.setdefault(k, []).append(lg.argmax(1).cpu())
        labels.append(torch.as_tensor(yb))
    compute = time.perf_counter() - t0 - wait[0]
    log.info("eval %d: %d samples, %d workers, %s", task.index, len(ds), loader.num_workers,
             split_text(wait[0], compute))
    if (timer := timer_of(data)) is not None:  # the task's total: its fits, extractions, this evaluation
        timer.add(wait[0], compute)
        log.info("task %d input pipeline: %s", task.index, split_text(*timer.take()))
    # torchrun: each rank predicted a run of whole batches; every rank gets all, in order
    for k, p in other_preds.items():
        variants[k] = dist.gather_rows(torch.cat(p) if p else torch.empty(0, dtype=torch.long)).numpy()  # type: ignore[index]
    return tuple(dist.gather_rows(torch.cat(t) if t else torch.empty(0, dtype=torch.long)).numpy()
                 for t in (preds, labels))

"""Evaluation after each task: predictions on the test samples of all seen classes."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ptcl.data.scenario import Task
from ptcl.errors import TrainingDiverged
from ptcl.methods.base import Learner
from ptcl.seeding import isolated_rng
from ptcl.train.loop import to_device


def eval_dataset(learner: Learner, classes: range) -> Dataset:
    """Test samples of ``classes`` in the form ``learner.predict`` takes (the learner says)."""
    return learner.eval_dataset(classes)


@torch.no_grad()
def predict_seen(learner: Learner, task: Task, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 predictions and remapped labels for every test sample of classes ``< task.end``.

    Runs with the global random generators isolated: evaluating (and the feature-cache
    misses it may cause) never changes what the learner draws afterwards.
    """
    with isolated_rng():
        return _predict_seen(learner, task, batch_size)


def _predict_seen(learner: Learner, task: Task, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    data = learner.ctx.data
    ds = eval_dataset(learner, range(0, task.end))
    learner.eval()
    preds, labels = [], []
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=data.num_workers,
                        generator=torch.Generator().manual_seed(0))
    for xb, yb in tqdm(loader, desc=f"eval {task.index}", disable=learner.ctx.quiet, leave=False):
        logits = learner.predict(to_device(xb, learner.device))
        if logits.shape[1] != task.end:
            raise RuntimeError(f"{type(learner).__name__}.predict returned {logits.shape[1]} logits, expected {task.end}")
        bad = torch.isnan(logits) | torch.isposinf(logits)
        if bool(bad.any()):
            raise TrainingDiverged(
                f"the learned model predicts NaN or +inf logits for {int(bad.any(1).sum())} of "
                f"{len(logits)} test samples in a batch; its state is not finite (diverged "
                "training: lower method.lr or set method.clip_grad)"
            )
        preds.append(logits.argmax(1).cpu())
        labels.append(torch.as_tensor(yb))
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()

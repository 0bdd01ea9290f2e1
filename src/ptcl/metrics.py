"""Continual-learning metrics as pure functions (percentages, 0-100).

``A[i][j]`` is the accuracy on task ``j``'s classes after training task ``i``
(``None`` for ``j > i``). ``acc[i]`` is the accuracy on all classes seen after task ``i``.

Two forgetting measures are reported: :func:`forgetting` (``forgetting``, the standard one
of Chaudhry et al. 2018: the best accuracy *before* the last task minus the final one; can be
negative) and :func:`forgetting_pilot` (``forgetting_pilot``, LAMDA-PILOT's and the official
L2P/DualPrompt/DAP codes': the maximum includes the final accuracy, so never negative).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = list[list[float | None]]


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Top-1 accuracy in percent (``nan`` on an empty set)."""
    pred, target = np.asarray(pred), np.asarray(target)
    return float((pred == target).mean() * 100) if len(target) else float("nan")


def accuracy_row(pred: np.ndarray, target: np.ndarray, bounds: Sequence[int], num_tasks: int) -> list[float | None]:
    """One row of the accuracy matrix: accuracy per task range ``[bounds[j], bounds[j+1])``.

    ``bounds`` are the cumulative class counts ``[0, e_0, e_1, ..., e_i]`` up to the current
    task; entries of tasks not yet seen are ``None``.
    """
    row: list[float | None] = []
    for j in range(num_tasks):
        if j + 1 < len(bounds):
            m = (target >= bounds[j]) & (target < bounds[j + 1])
            row.append(accuracy(pred[m], target[m]))
        else:
            row.append(None)
    return row


def old_new_accuracy(pred: np.ndarray, target: np.ndarray, start: int) -> tuple[float | None, float]:
    """Accuracy on the old classes (``< start``; ``None`` at the first task) and the new ones."""
    old = target < start
    return (accuracy(pred[old], target[old]) if old.any() else None, accuracy(pred[~old], target[~old]))


def average_incremental_accuracy(acc: Sequence[float]) -> float:
    """Mean over tasks of the accuracy on all seen classes (Rebuffi et al. 2017)."""
    return float(np.mean(acc))


def last_accuracy(acc: Sequence[float]) -> float:
    return float(acc[-1])


def _square(A: Matrix) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in A], dtype=float)


def forgetting(A: Matrix) -> float | None:
    """Average forgetting (Chaudhry et al., ECCV 2018), ptcl's ``forgetting``, in percent.

    For each task ``j < T-1``: its best accuracy *before the last task*,
    ``max(A[j..T-2][j])``, minus its final accuracy ``A[T-1][j]``; averaged over the
    ``T-1`` old tasks. Negative when old tasks improved in the last task (backward
    transfer). ``None`` with a single task. Compare :func:`forgetting_pilot`.
    """
    M = _square(A)
    T = len(M)
    if T < 2:
        return None
    return float(np.mean([np.nanmax(M[j : T - 1, j]) - M[T - 1, j] for j in range(T - 1)]))


def forgetting_pilot(A: Matrix) -> float | None:
    """Average forgetting as LAMDA-PILOT reports it (``forgetting_pilot``), in percent.

    Like :func:`forgetting`, but the best accuracy of task ``j`` is taken over *all* rows,
    the last included: ``max(A[j..T-1][j]) - A[T-1][j]``, so it is never negative (a task
    that improved in the last task counts as 0). Averaged over the ``T-1`` old tasks;
    ``None`` with a single task.

    Source: LAMDA-PILOT ``trainer.py`` (``print_forget``): ``np.max(np_acctable, axis=1) -
    np_acctable[:, task]`` over all columns, ``[:task]``, on the per-task ("grouped",
    ``utils/toolkit.py`` ``accuracy``: classes ``[0, init_cls)`` then ``increment`` at a
    time) accuracies, i.e. the rows of ``A``. The official L2P/DualPrompt PyTorch ports
    (``engine.py`` ``evaluate_till_now``) and DAP (naver-ai/dap-cl ``src/engine/trainer.py``)
    compute the same quantity.
    """
    M = _square(A)
    T = len(M)
    if T < 2:
        return None
    return float(np.mean([np.nanmax(M[j:T, j]) - M[T - 1, j] for j in range(T - 1)]))


def backward_transfer(A: Matrix) -> float | None:
    """BWT (Lopez-Paz & Ranzato 2017): mean of ``A[T-1][j] - A[j][j]`` over ``j < T-1``."""
    M = _square(A)
    T = len(M)
    if T < 2:
        return None
    return float(np.mean([M[T - 1, j] - M[j, j] for j in range(T - 1)]))

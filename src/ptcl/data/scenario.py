"""The class-incremental protocol of the field's toolboxes (LAMDA-PILOT, PyCIL).

* class order: ``np.random.seed(seed); np.random.permutation(n_classes)`` (or label order
  with ``shuffle=False``);
* task sizes: ``[init_cls] + [increment] * k`` plus a smaller remainder task if the
  classes do not divide evenly;
* labels are remapped so that the ``i``-th class of the order gets label ``i``: task ``t``
  then owns a contiguous label range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ptcl.errors import DataError

T = TypeVar("T")


def class_order(n_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    """The field's class order (PILOT's ``DataManager._setup_data``)."""
    if not shuffle:
        return list(range(n_classes))
    np.random.seed(seed)
    return np.random.permutation(n_classes).tolist()


def task_sizes(n_classes: int, init_cls: int, increment: int) -> list[int]:
    """``[init_cls] + [increment] * k`` (+ remainder), validated."""
    if init_cls <= 0 or increment <= 0:
        raise DataError(
            f"impossible task split: scenario.init_cls={init_cls} and scenario.increment="
            f"{increment} must both be positive"
        )
    if init_cls > n_classes:
        raise DataError(
            f"impossible task split: scenario.init_cls={init_cls} exceeds the dataset's "
            f"{n_classes} classes; use scenario.init_cls <= {n_classes}"
        )
    sizes = [init_cls]
    while sum(sizes) + increment < n_classes:
        sizes.append(increment)
    rest = n_classes - sum(sizes)
    if rest > 0:
        sizes.append(rest)
    return sizes


@dataclass(frozen=True)
class Task:
    """One step of the stream. Labels are remapped: this task owns ``range(start, end)``."""

    index: int
    start: int  # number of classes seen before this task
    end: int  # number of classes seen after this task
    num_tasks: int

    @property
    def classes(self) -> list[int]:
        return list(range(self.start, self.end))

    @property
    def num_new(self) -> int:
        return self.end - self.start

    @property
    def is_first(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class Scenario:
    """Class order and tasks; ``label_map[original_label] -> remapped label``."""

    order: list[int]
    sizes: list[int]

    @classmethod
    def build(cls, n_classes: int, init_cls: int, increment: int, seed: int, shuffle: bool = True) -> Scenario:
        return cls(class_order(n_classes, seed, shuffle), task_sizes(n_classes, init_cls, increment))

    @property
    def num_tasks(self) -> int:
        return len(self.sizes)

    @property
    def num_classes(self) -> int:
        return len(self.order)

    @property
    def tasks(self) -> list[Task]:
        ends = np.cumsum(self.sizes).tolist()
        starts = [0] + ends[:-1]
        return [Task(i, s, e, self.num_tasks) for i, (s, e) in enumerate(zip(starts, ends))]

    @property
    def label_map(self) -> np.ndarray:
        m = np.empty(len(self.order), dtype=np.int64)
        m[np.asarray(self.order)] = np.arange(len(self.order))
        return m

    def by_label(self, per_class: Sequence[T]) -> list[T]:
        """``per_class`` (indexed by the dataset's own class index, e.g. class names)
        reindexed by remapped label: item ``i`` is that of the ``i``-th class of the order."""
        if len(per_class) != len(self.order):
            raise DataError(f"{len(per_class)} items for the scenario's {len(self.order)} classes")
        return [per_class[c] for c in self.order]

    def task_of_label(self, label: int) -> int:
        """Task index owning remapped ``label``."""
        return int(np.searchsorted(np.cumsum(self.sizes), label, side="right"))


def subset_per_class(targets: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``per_class`` samples of each class, chosen by a fixed RNG.

    Deterministic for a given ``seed`` and independent of class order; sorted.
    """
    targets = np.asarray(targets)
    if per_class is None:
        return np.arange(len(targets))
    rng = np.random.RandomState(seed)
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(idx) > per_class:
            idx = np.sort(rng.permutation(idx)[:per_class])
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)

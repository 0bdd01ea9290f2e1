"""Exemplar memory: a few stored training samples per seen class, for rehearsal methods.

The memory stores *positions* into the run's selected training split (what
:meth:`ptcl.data.server.DataManager.positions` returns), never pixels, as two buffers
(``positions``, ``labels``): it is part of the learner's ``state_dict``, so checkpoints hold
it and ``--resume`` restores it exactly. The data layer serves the stored samples
(:meth:`ExemplarMemory.dataset`), so a method only says when to update.

Budgets (LAMDA-PILOT's ``memory_size`` / ``memory_per_class`` / ``fixed_memory``,
``utils/inc_net``/``models/base.py`` ``build_rehearsal_memory``):

* ``per_class=m`` -- a fixed number per class (PILOT ``fixed_memory: true``,
  ``memory_per_class``; PROOF's 20);
* ``total=M`` -- a fixed total shared by the seen classes: ``M // seen_classes`` per class,
  so old classes shrink as classes arrive (PILOT ``memory_size`` 2000).

Selection (per new class, over its training features):

* ``herding`` -- iCaRL's herding (Rebuffi et al., "iCaRL: Incremental Classifier and
  Representation Learning", CVPR 2017; PILOT ``models/base.py`` ``_construct_exemplar``):
  on L2-normalised features, the ``k``-th exemplar is the sample (not yet chosen) that
  brings the mean of the ``k`` chosen closest to the class mean. The order is a priority:
  shrinking a class keeps its first exemplars;
* ``closest_to_mean`` -- the samples whose L2-normalised features are closest (Euclidean)
  to the class mean of the normalised features, nearest first (Avalanche's
  ``ClosestToCenterSelectionStrategy``, ``avalanche/training/storage_policy.py``, which ranks
  the raw features; normalised here as herding is);
* ``random`` -- a uniform draw from a generator the caller derives from the run seed.

Serving rehearsal data: :func:`images_with_memory` gives the current task's training images
and the stored ones as one dataset of the data layer (one transform, one label map).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptcl.data.server import DataManager, TaskImages

Selection = Literal["herding", "closest_to_mean", "random"]
SELECTIONS: tuple[str, ...] = ("herding", "closest_to_mean", "random")


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (``(min(m, N),)`` long, in selection order) of iCaRL's herding exemplars of one
    class from its features ``(N, D)``: features are L2-normalised, then step ``k`` picks the
    unchosen sample minimising ``|| mu - (sum of chosen + f) / k ||`` (``mu``: the class mean
    of the normalised features); ties go to the lowest index. Raises ``ValueError`` for
    ``m < 0`` or a feature tensor that is not 2-D."""
    if features.dim() != 2:
        raise ValueError(f"herding needs (N, D) features, got shape {tuple(features.shape)}")
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    free = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(m, len(f)) + 1):
        dist = ((mu - (total + f) / k) ** 2).sum(1)
        dist[~free] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        free[i] = False
        total += f[i]
    return torch.tensor(chosen, dtype=torch.long)


def closest_to_mean(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (``(min(m, N),)`` long, nearest first) of the ``m`` samples of one class whose
    L2-normalised features ``(N, D)`` are closest to the class mean of the normalised
    features; ties go to the lowest index. Raises ``ValueError`` for ``m < 0`` or a feature
    tensor that is not 2-D."""
    if features.dim() != 2:
        raise ValueError(f"closest_to_mean needs (N, D) features, got shape {tuple(features.shape)}")
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    f = F.normalize(features.double(), dim=1)
    dist = ((f - f.mean(0)) ** 2).sum(1)
    return torch.sort(dist, stable=True).indices[: min(m, len(f))]


_BY_FEATURES = {"herding": herding, "closest_to_mean": closest_to_mean}
"""The feature-based selections: ``fn(features (N, D), m) -> indices in priority order``."""


class ExemplarMemory(nn.Module):
    """Stored training samples by class (see the module docstring).

    ``per_class`` or ``total`` (exactly one) sets the budget; ``selection`` is ``herding``,
    ``closest_to_mean`` or ``random``. Buffers: ``positions`` (``(M,)`` long, positions in the selected train
    split) and ``labels`` (``(M,)`` long, scenario labels), grouped by class in the order the
    classes arrived, each class in priority order. Raises ``ValueError`` for a bad budget.
    """

    def __init__(self, per_class: int | None = None, total: int | None = None,
                 selection: Selection = "herding") -> None:
        super().__init__()
        if (per_class is None) == (total is None):
            raise ValueError("give exactly one memory budget: per_class (fixed per class) or total (shared)")
        if (per_class is not None and per_class < 1) or (total is not None and total < 1):
            raise ValueError(f"the memory budget must be >= 1, got per_class={per_class}, total={total}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        self.per_class, self.total, self.selection = per_class, total, selection
        self.register_buffer("positions", torch.zeros(0, dtype=torch.long))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.positions)

    def classes(self) -> list[int]:
        """The classes held, in the order they arrived."""
        return list(dict.fromkeys(self.labels.tolist()))

    def budget(self, num_classes: int) -> int:
        """Exemplars per class when ``num_classes`` classes are held."""
        if self.per_class is not None:
            return self.per_class
        return self.total // max(num_classes, 1)  # type: ignore[operator]

    @torch.no_grad()
    def update(self, positions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor,
               features: torch.Tensor | None, generator: torch.Generator | None = None) -> None:
        """Add the classes of ``labels`` (new classes: the samples at training-split
        ``positions``, with ``features`` ``(N, D)`` for herding and closest_to_mean, or
        ``generator`` for a random draw) and shrink every held class to the new per-class budget (keeping its first
        exemplars). Raises ``ValueError`` for a class already held or mismatched inputs."""
        positions = torch.as_tensor(positions, dtype=torch.long).cpu()
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if positions.shape != labels.shape or positions.dim() != 1:
            raise ValueError(f"positions {tuple(positions.shape)} and labels {tuple(labels.shape)} must be equal 1-D")
        new = list(dict.fromkeys(labels.tolist()))
        held = set(self.classes())
        if held & set(new):
            raise ValueError(f"classes {sorted(held & set(new))} are already in the memory")
        if self.selection in _BY_FEATURES and (features is None or len(features) != len(labels)):
            raise ValueError(f"{self.selection} needs the features (N, D) of the N new samples")
        if self.selection == "random" and generator is None:
            raise ValueError("random selection needs a generator (derive it from the run seed)")
        m = self.budget(len(held) + len(new))
        keep_pos, keep_lab = [], []
        for c in self.classes():  # shrink the old classes
            rows = torch.nonzero(self.labels == c).flatten()[:m]
            keep_pos.append(self.positions[rows].cpu())
            keep_lab.append(self.labels[rows].cpu())
        for c in new:
            rows = torch.nonzero(labels == c).flatten()
            if self.selection in _BY_FEATURES:
                pick = _BY_FEATURES[self.selection](features[rows].cpu(), m)  # type: ignore[index]
            else:
                pick = torch.randperm(len(rows), generator=generator)[:m]
            keep_pos.append(positions[rows[pick]])
            keep_lab.append(labels[rows[pick]])
        dev = self.positions.device
        self.positions = torch.cat(keep_pos).to(dev) if keep_pos else self.positions
        self.labels = torch.cat(keep_lab).to(dev) if keep_lab else self.labels

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # the buffers grow with the classes: a fresh memory takes a checkpoint's of any length
        for name in ("positions", "labels"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, state_dict[key].to(device=getattr(self, name).device, dtype=torch.long).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dataset(self, data: DataManager, train_transform: bool = True) -> TaskImages:
        """The stored samples as images (with the train augmentation where
        ``train_transform``), labelled by the data layer (the stored ``labels``)."""
        return data.images_at("train", self.positions.cpu().numpy(), train_transform)


def images_with_memory(data: DataManager, classes: Sequence[int] | range, memory: ExemplarMemory | None,
                       train_transform: bool = True) -> TaskImages:
    """The training images of ``classes`` (the current task's) followed by the memory's
    stored samples, as one dataset of the data layer (:meth:`DataManager.images_at`: one
    transform, with the train augmentation where ``train_transform``; scenario labels).
    ``memory`` ``None`` or empty: the task's images only. Length: task samples + ``len(memory)``."""
    pos = data.positions("train", classes)
    if memory is not None and len(memory):
        pos = np.concatenate([pos, memory.positions.cpu().numpy()])
    return data.images_at("train", pos, train_transform)

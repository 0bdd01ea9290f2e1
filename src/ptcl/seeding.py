"""Where every random draw of a run comes from.

A run's randomness is a function of ``seed`` and the task, never of what other work
happened to draw before (a cold or warm feature cache, an evaluation pass, a resumed run):

* **global generators** (Python ``random``, NumPy, torch CPU/CUDA) are reseeded with
  :func:`task_seed` at the start of every task. They serve what a learner does inside its
  lifecycle with the global generator (parameter initialisation, dropout).
* **engine work that is not the learner's computation** (filling the feature cache,
  evaluation, checkpointing) runs inside :func:`isolated_rng`, so it cannot advance the
  learner's stream: whether a feature was cached changes no weight.
* **data loaders** draw the shuffle order from their own ``torch.Generator``
  (:func:`derive_seed` of the run seed and the loader's key), and every training sample
  carries its own augmentation seed drawn from that generator (:class:`SeededSampler`,
  :class:`SeededItems`), so augmentation is the same with 0 or 8 loader workers and
  whatever else used the global generator.
* **sampling inside a method** (synthetic features, random projections, orthogonal
  initialisation) uses :func:`generator` with a key naming the purpose and the task.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

SEED_MAX = 2**32 - 1  # NumPy's legacy seeding accepts 0 .. 2**32 - 1


def task_seed(seed: int, task: int) -> int:
    """The global seed of task ``task``: ``seed + task`` (PILOT reseeds per run with ``seed``;
    ptcl per task so a resumed run repeats the uninterrupted one), wrapped into
    ``0 .. 2**32 - 1`` so the largest valid ``seed`` does not overflow NumPy."""
    return (seed + task) % (SEED_MAX + 1)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (a stable hash: same inputs, same seed, on
    every platform and Python version; different keys give unrelated streams)."""
    text = "|".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derive_seed` ``(seed, *keys)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (SEED_MAX + 1))
    torch.manual_seed(seed)


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without changing the global generators' states (Python, NumPy, torch
    CPU and every initialised CUDA device): whatever the block draws, the stream after it
    is the one before it."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Like :func:`isolated_rng`, with the global generators seeded with ``seed`` inside."""
    with isolated_rng():
        seed_everything(seed)
        yield


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)``: a permutation of ``range(n)`` (or the identity when
    ``shuffle`` is false) and one seed per item, all drawn from ``gen``.

    Pair it with :class:`SeededItems`. The draws happen in the main process, so the stream
    does not depend on the number of loader workers.
    """

    def __init__(self, data: Sized, shuffle: bool, gen: torch.Generator) -> None:
        self.n, self.shuffle, self.gen = len(data), shuffle, gen

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=self.gen) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.gen)
        return iter(zip(order.tolist(), seeds.tolist()))


class SeededItems(Dataset):
    """``dataset[index]`` computed with the global generators seeded with ``sample_seed``
    (and restored afterwards): random augmentation of a sample is a function of its seed.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, sample_seed = item
        with seeded(sample_seed):
            return self.dataset[index]

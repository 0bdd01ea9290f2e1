"""How image batches reach the model: loader workers, on-device normalisation, wait timing.

* **Workers.** ``num_workers: auto`` (the default) is ``min(8, usable cores - 1)``: the
  main process keeps one core for the model's forward/backward, the workers decode, crop
  and resize in the others; 8 is LAMDA-PILOT's (and most toolboxes') loader width, beyond
  which JPEG decoding of 224-px inputs is no longer what a run waits for. Usable cores are
  ``os.sched_getaffinity`` (what a container or ``taskset`` grants), not the machine's.
  A loader over fewer than :data:`MIN_WORKER_ITEMS` items uses none
  (:func:`loader_workers`): starting a worker costs more than decoding that many small
  images in the main process. Worker loaders are persistent (started once per loader,
  not once per epoch). Results do not depend on the number of workers: the training
  order and every augmentation seed are drawn in the main process
  (:class:`~ptcl.seeding.SeededSampler`), evaluation and feature transforms draw nothing.
* **uint8 batches, normalised on the device.** The served transforms end at uint8 CHW
  tensors (:func:`~ptcl.backbones.transforms.eval_transform` ``on_device=True``); a
  :class:`DeviceLoader` moves each batch to the device (a quarter of float32's bytes) and
  normalises it there with :func:`~ptcl.backbones.transforms.normalize_batch`: the same
  float32 operations as ``ToTensor() + Normalize`` in the same order, bit for bit.
* **Data wait vs compute.** :class:`InputTimer` collects, per run, the seconds the train
  loop and feature extraction spent blocked on the next batch (``wait``) and the rest
  (``compute``); :func:`timed` measures one pass over a loader.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from ptcl.backbones.transforms import Preprocess, normalize_batch
from ptcl.errors import ConfigError

log = logging.getLogger(__name__)

AUTO_MAX_WORKERS = 8
"""Cap of ``num_workers: auto`` (LAMDA-PILOT's ``num_workers=8``)."""

MIN_WORKER_ITEMS = 256
"""Loaders over fewer items than this decode in the main process. Measured on the 2-core
development machine under load: an evaluation loader of 6 to 30 images waited 0.13-0.18 s
for its 2 workers to start against under 0.01 s without workers, about the time the main
process needs to decode and resize ~300 images (~0.5 ms each, issue 14's profile)."""


def usable_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()``
    where the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(value: int | Literal["auto"]) -> int:
    """Loader worker processes for ``value``: an integer >= 0 as it is, ``"auto"`` as
    ``min(8, usable_cores() - 1)`` (0 on one core). Raises :class:`ConfigError` otherwise."""
    if value == "auto":
        return max(0, min(AUTO_MAX_WORKERS, usable_cores() - 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"num_workers must be an integer >= 0 or auto, got {value!r}")
    return value


def loader_workers(num_workers: int, items: int) -> int:
    """Workers for a loader over ``items`` items: none below :data:`MIN_WORKER_ITEMS`."""
    return num_workers if items >= MIN_WORKER_ITEMS else 0


def batch_to_device(x: Any, device: torch.device | str, preprocess: Preprocess | None) -> Any:
    """``x`` (a tensor or a tuple/list of them) on ``device``; a uint8 image batch
    ``(B, 3, H, W)`` is normalised there with ``preprocess``
    (:func:`~ptcl.backbones.transforms.normalize_batch`). Other tensors move unchanged.
    Raises ``TypeError`` for a uint8 image batch without ``preprocess``."""
    if isinstance(x, (tuple, list)):
        return type(x)(batch_to_device(v, device, preprocess) for v in x)
    if not isinstance(x, torch.Tensor):
        return x
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8 and x.ndim == 4:
        if preprocess is None:
            raise TypeError("a uint8 image batch reached the device without the backbone's preprocess "
                            "to normalise it; serve it through ptcl.data.loading.DeviceLoader")
        x = normalize_batch(x, preprocess)
    return x


class DeviceLoader(DataLoader):
    """A ``DataLoader`` of ``(x, y)`` batches whose ``x`` arrives on ``device`` and
    normalised (:func:`batch_to_device`); ``y`` stays as collated (on the CPU).

    Takes ``DataLoader``'s arguments; with workers it is persistent and, on CUDA, pins
    memory."""

    def __init__(self, dataset: Dataset, *, device: torch.device | str = "cpu",
                 preprocess: Preprocess | None = None, **kw: Any) -> None:
        self.device, self.preprocess = torch.device(device), preprocess
        if kw.get("num_workers", 0) > 0:
            kw.setdefault("persistent_workers", True)
        kw.setdefault("pin_memory", self.device.type == "cuda")
        super().__init__(dataset, **kw)

    def __iter__(self) -> Iterator:  # type: ignore[override]
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            # a fresh iterator draws its workers' base seed from ``generator`` before the
            # sampler draws; a reused (persistent) one does not. Draw it here as a fresh one
            # would, so the order and augmentation seeds drawn after it are the same with or
            # without workers (tests/test_loader_workers.py)
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        for batch in super().__iter__():
            if isinstance(batch, (tuple, list)) and len(batch) == 2:
                yield type(batch)((batch_to_device(batch[0], self.device, self.preprocess), batch[1]))
            else:
                yield batch_to_device(batch, self.device, self.preprocess)


@dataclass
class InputTimer:
    """Seconds spent waiting for batches (``wait_s``) and computing on them
    (``compute_s``), summed over the passes :meth:`add` is told of since the last :meth:`take`."""

    wait_s: float = 0.0
    compute_s: float = 0.0

    def add(self, wait_s: float, compute_s: float) -> None:
        self.wait_s += wait_s
        self.compute_s += compute_s

    def take(self) -> tuple[float, float]:
        """``(wait_s, compute_s)`` so far, and reset both to 0."""
        out = (self.wait_s, self.compute_s)
        self.wait_s = self.compute_s = 0.0
        return out


def split_text(wait_s: float, compute_s: float) -> str:
    """``'data wait 1.2 s (20%), compute 4.8 s'``."""
    total = wait_s + compute_s
    share = 100.0 * wait_s / total if total > 0 else 0.0
    return f"data wait {wait_s:.2f} s ({share:.0f}%), compute {compute_s:.2f} s"


def timed(batches: Iterable, wait: list[float]) -> Iterator:
    """Yield from ``batches``, adding to ``wait[0]`` the seconds spent blocked on each next
    batch (the consumer's own time between batches is not counted)."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            wait[0] += time.perf_counter() - t0
            return
        wait[0] += time.perf_counter() - t0
        yield batch


def timer_of(loader: Any) -> InputTimer | None:
    """The run's :class:`InputTimer` a loader carries (``loader.timer``), if any."""
    t = getattr(loader, "timer", None)
    return t if isinstance(t, InputTimer) else None

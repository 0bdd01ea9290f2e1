"""On-disk cache of frozen-backbone features.

An entry is keyed by a hash of everything that determines the features: the backbone's
weight fingerprint (weights + input geometry), the dataset's content fingerprint, the
split, the transform, and the selected sample indices. Change any of them and the key
changes, so a stale entry is never read. Entries are safetensors files written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ptcl import dist
from ptcl.backbones.transforms import Preprocess
from ptcl.data.loading import DeviceLoader, InputTimer, loader_workers, split_text, timed
from ptcl.io import atomic_save_tensors, load_tensors
from ptcl.paths import cache_dir
from ptcl.precision import autocast

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of ``parts`` (JSON-serialisable; numpy arrays are hashed)."""
    norm = {}
    for k, v in parts.items():
        if isinstance(v, np.ndarray):
            v = hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
        norm[k] = v
    norm["version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:32]


class FeatureCache:
    """A folder of ``<key>.safetensors`` feature files (default ``$PTCL_CACHE_DIR/features``)."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else cache_dir("features")
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.compute_s = 0.0  # seconds spent computing (not reading) features

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get_or_compute(
        self, parts: dict[str, Any], compute: Callable[[], torch.Tensor], write: bool = True
    ) -> torch.Tensor:
        """Features for ``parts``: read from disk, or computed by ``compute()`` and stored."""
        key = cache_key(parts)
        p = self.path(key)
        if self.enabled and dist.broadcast_object(p.is_file()):  # torchrun: rank 0's answer for all
            feats = None
            try:
                feats = load_tensors(p)["features"]
            except Exception as e:  # a damaged entry is recomputed, never trusted
                log.warning("feature cache entry %s unreadable (%s); recomputing", p, e)
            if dist.all_true(feats is not None):  # every rank read it, or every rank computes
                self.hits += 1
                log.info("feature cache hit %s (%s)", key, parts.get("split"))
                return feats
        self.misses += 1
        t0 = time.perf_counter()
        feats = compute()
        self.compute_s += time.perf_counter() - t0
        if self.enabled and write:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_save_tensors(p, {"features": feats}, metadata={"parts": json.dumps(parts, default=str)[:4000]})
            except OSError as e:  # a full or read-only cache costs time, never the run
                log.warning("could not store features in the cache %s (%s); continuing without it", self.root, e)
        return feats


@torch.inference_mode()
def extract_features(
    forward: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "features",
    quiet: bool = False,
    precision: str = "fp32",
    preprocess: Preprocess | None = None,
    timer: InputTimer | None = None,
) -> torch.Tensor:
    """Run ``forward`` over ``dataset`` (yielding ``(x, y)``) and stack the outputs on CPU
    as float32 (``(N, D)``); ``precision="bf16"`` runs ``forward`` under bf16 autocast
    (:mod:`ptcl.precision`).

    The loader has its own generator, so iterating it draws nothing from the global one.
    Under torchrun each rank runs ``forward`` on its own run of whole batches
    (:func:`ptcl.dist.shard_dataset`) and every rank gets all ``N`` rows in the original
    order (:func:`ptcl.dist.gather_rows`): the same tensor as one process computes.
    uint8 image batches are normalised on ``device`` with ``preprocess`` (default:
    ``forward.preprocess``, a :class:`~ptcl.backbones.base.Backbone`'s; see
    :mod:`ptcl.data.loading`). Logs the seconds spent waiting for batches vs computing, and
    adds them to ``timer``.
    """
    loader = DeviceLoader(dist.shard_dataset(dataset, batch_size), device=device, preprocess=preprocess or getattr(forward, "preprocess", None),
                          batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0),
                          num_workers=loader_workers(num_workers, len(dataset)))  # type: ignore[arg-type]
    out, wait, t0 = [], [0.0], time.perf_counter()
    for x, _ in timed(tqdm(loader, desc=desc, disable=quiet, leave=False, unit="batch"), wait):
        with autocast(device, precision):
            feats = forward(x.to(device, non_blocking=True))
        out.append(feats.float().cpu())
    compute = time.perf_counter() - t0 - wait[0]
    log.info("%s: %d images, %d workers, %s", desc, len(dataset), loader.num_workers,  # type: ignore[arg-type]
             split_text(wait[0], compute))
    if timer is not None:
        timer.add(wait[0], compute)
    return dist.gather_rows(torch.cat(out) if out else torch.empty(0))  # torchrun: every rank's rows, in order

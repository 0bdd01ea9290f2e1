"""Numeric precision of the network forwards: ``fp32`` (default) or ``bf16`` autocast.

``precision`` is a top-level run option (:class:`ptcl.config.RunConfig`). With ``bf16``,
:func:`autocast` wraps the network forwards in ``torch.autocast(device_type, torch.bfloat16)``
(CPU, CUDA and MPS alike): the backbone pass of feature extraction
(:func:`ptcl.data.features.extract_features`), the training step of the one train loop
(:func:`ptcl.train.loop.fit`; ``loss.backward()`` runs outside, as torch's AMP recipe says)
and the prediction of learners that take images (:func:`ptcl.engine.evaluate.predict_seen`).
Autocast runs matrix products and convolutions in bfloat16 and keeps reductions, norms and
softmax in float32 (torch's autocast op lists). Features are stored as float32 (cast after
the forward), and everything computed outside these three places -- ridge Gram matrices,
class means, covariances, the heads of feature-input learners -- stays float32.

bf16 needs no loss scaling (its exponent range is float32's), so there is no ``GradScaler``.
Parameters and optimiser states stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ptcl.errors import ConfigError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
"""Each ``precision`` value and the autocast dtype it runs the forwards in (``None``: no
autocast, plain float32)."""

DEFAULT = "fp32"


def check_precision(name: str) -> str:
    """``name`` if it is a known precision; else :class:`ConfigError` listing the valid ones."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype ``precision`` autocasts to (``None`` for fp32). Raises :class:`ConfigError`
    for an unknown precision."""
    return PRECISIONS[check_precision(precision)]


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = DEFAULT) -> Iterator[None]:
    """Run the enclosed network forwards in ``precision`` on ``device`` (a ``torch.device``
    or its name; the autocast device type is its ``type``: ``cpu``, ``cuda``, ``mps``).
    ``fp32`` enters nothing, so fp32 results are exactly those of code without it."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def cache_parts(precision: str) -> dict[str, Any]:
    """What a feature-cache key adds for ``precision``: nothing for fp32 (keys of fp32
    features stay what they were before this option existed), ``{"precision": name}``
    otherwise, so features of different precisions never share an entry."""
    return {} if check_precision(precision) == DEFAULT else {"precision": precision}

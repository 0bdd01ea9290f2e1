"""Merging tuning states: pure functions on state dicts (``dict[str, Tensor]``).

Every function takes state dicts with the same keys, and for each key tensors of one shape,
dtype and device (floating point), and returns a new state dict; a mismatch raises
``ValueError`` naming the key. Only :func:`ema_` changes a state in place (for an update
after every optimiser step, where a copy per step would be waste).

Rules and sources:

* :func:`average` -- (weighted) parameter average, ``sum_i w_i th_i / sum_i w_i``
  (MOS's merge target ``mean_{k<t} A_k``: Sun et al., "MOS: Model Surgery for Pre-Trained
  Model-Based Class-Incremental Learning", AAAI 2025; github.com/sun-hailong/AAAI25-MOS);
* :func:`ema` / :func:`ema_` -- exponential moving average ``alpha * old + (1 - alpha) * new``
  (LAE's offline module, alpha 0.9999: Gao et al., "A Unified Continual Learning Framework
  with General Parameter-Efficient Tuning", ICCV 2023, github.com/gqk/LAE; MOS's adapter
  merge ``A_t <- (1 - m) A_t + m mean_{k<t} A_k`` is ``ema_(A_t, mean, 1 - m)``);
* :func:`fisher_average` -- diagonal-Fisher-weighted average ``sum_i w_i F_i th_i /
  sum_i w_i F_i`` (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
  NeurIPS 2022; CoFiMA's ``((1-a) F0 th0 + a F1 th1) / ((1-a) F0 + a F1)``: Marouf et al.,
  "Weighted Ensemble Models Are Strong Continual Learners", ECCV 2024, LAMDA-PILOT
  ``models/cofima.py``);
* :func:`task_arithmetic` -- ``th_base + scale * sum_i (th_i - th_base)`` (Ilharco et al.,
  "Editing Models with Task Arithmetic", ICLR 2023).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]
"""A state dict: tensor name -> tensor."""

FISHER_EPS = 1e-8
"""Added to every Fisher value by :func:`fisher_average`, so a coordinate where all Fishers
vanish gets the plain weighted average instead of 0/0 (the ``minimal_fisher_weight`` guard of
Matena & Raffel's code, there 1e-6)."""


def check_states(states: Sequence[State], names: Sequence[str] | None = None) -> list[str]:
    """Check that ``states`` are compatible: the same keys, and per key floating-point
    tensors of one shape, dtype and device. Returns the keys (the first state's order).

    Raises ``ValueError`` naming the first mismatch, the states named by ``names``
    (default ``states[i]``).
    """
    if len(states) == 0:
        raise ValueError("no states to merge")
    names = [f"states[{i}]" for i in range(len(states))] if names is None else list(names)
    keys = list(states[0])
    for name, s in zip(names[1:], states[1:]):
        if set(s) != set(keys):
            missing, extra = sorted(set(keys) - set(s))[:5], sorted(set(s) - set(keys))[:5]
            raise ValueError(f"{name} has other keys than {names[0]}: missing {missing}, unexpected {extra}")
    for k in keys:
        ref = states[0][k]
        if not ref.is_floating_point():
            raise ValueError(f"{names[0]}[{k!r}] has dtype {ref.dtype}; only floating-point tensors are merged")
        for name, s in zip(names[1:], states[1:]):
            t = s[k]
            if (t.shape, t.dtype, t.device) != (ref.shape, ref.dtype, ref.device):
                raise ValueError(
                    f"{name}[{k!r}] is {tuple(t.shape)} {t.dtype} on {t.device}, but {names[0]}[{k!r}] "
                    f"is {tuple(ref.shape)} {ref.dtype} on {ref.device}"
                )
    return keys


def _check_weights(weights: Sequence[float], n: int, what: str = "weights") -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} {what} for {n} states")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"{what} must be finite, >= 0 and not all 0, got {w}")
    return w


@torch.no_grad()
def average(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Parameter-wise average of ``states``: the mean, or ``sum_i w_i th_i / sum_i w_i``
    with ``weights`` (one per state, >= 0, not all 0).

    Raises ``ValueError`` for no states, mismatched states (:func:`check_states`) or bad weights.
    """
    keys = check_states(states)
    if weights is None:
        return {k: torch.stack([s[k] for s in states]).mean(0) for k in keys}
    w = _check_weights(weights, len(states))
    total = sum(w)
    return {k: sum(wi * s[k] for wi, s in zip(w, states)) / total for k in keys}


@torch.no_grad()
def ema_(old: State, new: State, alpha: float) -> None:
    """``old <- alpha * old + (1 - alpha) * new`` in place (``old``'s tensors, e.g. the live
    parameters of :meth:`ptcl.experts.Experts.parameters_of`), as ``old.mul_(alpha)
    .add_(new, alpha=1 - alpha)``; ``alpha`` in [0, 1].

    Raises ``ValueError`` for mismatched states or ``alpha`` outside [0, 1].
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for k in check_states([old, new], ["old", "new"]):
        old[k].mul_(alpha).add_(new[k], alpha=1 - alpha)


@torch.no_grad()
def ema(old: State, new: State, alpha: float) -> dict[str, torch.Tensor]:
    """``alpha * old + (1 - alpha) * new`` as a new state (see :func:`ema_`)."""
    out = {k: v.detach().clone() for k, v in old.items()}
    ema_(out, new, alpha)
    return out


@torch.no_grad()
def fisher_average(
    states: Sequence[State], fishers: Sequence[State], weights: Sequence[float], eps: float = FISHER_EPS
) -> dict[str, torch.Tensor]:
    """Diagonal-Fisher-weighted average ``sum_i w_i F_i th_i / sum_i w_i F_i`` per coordinate,
    with ``F_i + eps`` for ``F_i`` (where every Fisher vanishes: the ``weights`` average).

    ``fishers[i]`` holds the diagonal Fisher (>= 0) of ``states[i]``, same keys and shapes.
    CoFiMA merges the previous model ``th0`` and the task's ``th1`` with ``weights=[1 - a,
    a]`` (``a = 0.4``). Raises ``ValueError`` for mismatched states or Fishers, a negative
    or non-finite Fisher, bad weights or ``eps < 0``.
    """
    if len(fishers) != len(states):
        raise ValueError(f"{len(fishers)} fishers for {len(states)} states")
    keys = check_states(states)
    for i, (s, f) in enumerate(zip(states, fishers)):
        check_states([s, f], [f"states[{i}]", f"fishers[{i}]"])
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    w = _check_weights(weights, len(states))
    out = {}
    for k in keys:
        f = torch.stack([fi[k] for fi in fishers])
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError(f"the Fisher values of {k!r} must be finite and >= 0")
        wf = torch.tensor(w, dtype=f.dtype, device=f.device).view(-1, *[1] * (f.dim() - 1)) * (f + eps)
        th = torch.stack([s[k] for s in states])
        out[k] = (wf * th).sum(0) / wf.sum(0)
    return out


@torch.no_grad()
def task_arithmetic(base: State, states: Sequence[State], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``th_base + scale * sum_i (th_i - th_base)``: the base plus the scaled sum of the
    task vectors of ``states``. Raises ``ValueError`` for mismatched states or a
    non-finite ``scale``."""
    keys = check_states([base, *states], ["base", *(f"states[{i}]" for i in range(len(states)))])
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return {k: base[k] + scale * sum(s[k] - base[k] for s in states) for k in keys}

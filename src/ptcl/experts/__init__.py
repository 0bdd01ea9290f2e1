"""Experts: keyed tuning states on one frozen backbone, and how to merge them.

* :class:`Experts` (:mod:`ptcl.experts.container`) -- per-task or per-role tuning modules
  by key, ``activate(keys)`` / ``only(key)`` / ``training(key)`` blocks, per-expert features
  cached on disk;
* :mod:`ptcl.experts.merge` -- pure functions on state dicts: :func:`average`,
  :func:`ema` (and the in-place :func:`ema_`), :func:`fisher_average`,
  :func:`task_arithmetic`;
* :mod:`ptcl.experts.ensemble` -- pure functions on the experts' logits: :func:`max_softmax`
  (LAE), :func:`free_energy` and :func:`select_by_energy` (ESN), :func:`subspace_reweight`
  (EASE), :func:`self_refined_retrieval` (MOS), :func:`scatter_selected`.

Used by EASE, MOS, ESN, LAE and CoFiMA; the layer sits below :mod:`ptcl.methods` (it imports ``peft``,
``backbones`` and ``data``, never a method or the engine).
"""

from __future__ import annotations

from ptcl.experts.container import ExpertForward, Experts, Key, expert_fingerprint, expert_name
from ptcl.experts.ensemble import (
    free_energy,
    max_softmax,
    scatter_selected,
    select_by_energy,
    self_refined_retrieval,
    subspace_reweight,
)
from ptcl.experts.merge import average, check_states, ema, ema_, fisher_average, task_arithmetic

__all__ = [
    "ExpertForward",
    "Experts",
    "Key",
    "average",
    "check_states",
    "ema",
    "ema_",
    "expert_fingerprint",
    "expert_name",
    "fisher_average",
    "free_energy",
    "max_softmax",
    "scatter_selected",
    "select_by_energy",
    "self_refined_retrieval",
    "subspace_reweight",
    "task_arithmetic",
]

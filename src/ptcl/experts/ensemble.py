"""Combining experts' outputs at inference: pure functions on logits.

An ensemble keeps every expert and runs them all (its cost grows with their number; see
:meth:`ptcl.methods.base.Learner.inference_cost`); these functions turn the experts' logits
into one prediction. Each takes the experts' logits for one batch, ``E`` tensors (one per
expert, in expert order) of shape ``(N, C_e)``, and returns a tensor over the batch.

Rules and sources:

* :func:`max_softmax` -- the class-wise maximum of the experts' softmax probabilities
  (LAE's online/offline aggregation: Gao et al., ICCV 2023, github.com/gqk/LAE; LAMDA-PILOT
  ``models/lae.py``, ``torch.stack(softmaxes, -1).max(-1)``);
* :func:`free_energy` -- ``E_T(x) = -T logsumexp(f(x) / T)`` (Liu et al., "Energy-based
  Out-of-distribution Detection", NeurIPS 2020), the score ESN trains and selects experts by;
* :func:`select_by_energy` -- per temperature the expert of lowest free energy, then a
  majority vote over the temperatures (``torch.mode``: ties go to the lowest expert index)
  (ESN: Wang et al., "Isolation and Impartial Aggregation", AAAI 2023,
  github.com/iamwangyabin/ESN ``trainer.py``, ``eval``);
* :func:`scatter_selected` -- the selected expert's logits placed in its class block of the
  full logit row, ``fill`` elsewhere (how an expert selection becomes logits over all seen
  classes);
* :func:`subspace_reweight` -- EASE's weighting of per-sub-space scores (1 on a class's own
  sub-space, ``alpha / (S - 1)`` elsewhere);
* :func:`self_refined_retrieval` -- MOS's iterated choice of the expert whose prediction
  agrees with itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _stack_check(logits: Sequence[torch.Tensor], same_width: bool) -> None:
    if len(logits) == 0:
        raise ValueError("no experts' logits to combine")
    n = logits[0].shape[0]
    for i, t in enumerate(logits):
        if t.dim() != 2 or t.shape[0] != n:
            raise ValueError(f"logits[{i}] has shape {tuple(t.shape)}; every expert's must be (N={n}, C)")
        if same_width and t.shape[1] != logits[0].shape[1]:
            raise ValueError(f"logits[{i}] has {t.shape[1]} classes, logits[0] {logits[0].shape[1]}; "
                             "max_softmax needs experts over the same classes")


def max_softmax(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Class-wise maximum over experts of ``softmax(logits[e])`` -> ``(N, C)`` (LAE).

    Every expert scores the same ``C`` classes. Raises ``ValueError`` for no experts or
    mismatched shapes."""
    _stack_check(logits, same_width=True)
    return torch.stack([t.softmax(dim=1) for t in logits], dim=-1).amax(dim=-1)


def free_energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``-T * logsumexp(logits / T)`` over the last dimension: ``(N, C) -> (N,)``.

    Lower energy means the expert finds the input more in-distribution. Raises
    ``ValueError`` for ``temperature <= 0``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def select_by_energy(logits: Sequence[torch.Tensor], temperatures: Sequence[float]) -> torch.Tensor:
    """Index of the selected expert per sample, ``(N,)`` long: for each temperature ``T``
    the expert of lowest :func:`free_energy` (``argmax_e logsumexp(logits[e] / T)``, as the
    official ESN code), then the most frequent choice over the temperatures (ties: the
    lowest index, ``torch.mode``).

    Experts may score different numbers of classes. Raises ``ValueError`` for no experts,
    no temperatures or a temperature ``<= 0``."""
    _stack_check(logits, same_width=False)
    if len(temperatures) == 0:
        raise ValueError("select_by_energy needs at least one temperature")
    votes = torch.stack(
        [torch.stack([free_energy(t, float(tmp)) for t in logits], 1).argmin(1) for tmp in temperatures], 1
    )
    return torch.mode(votes, dim=1).values


def scatter_selected(
    logits: Sequence[torch.Tensor], selected: torch.Tensor, fill: float = float("-inf")
) -> torch.Tensor:
    """Logits over all experts' classes (expert ``e``'s block after those of ``0..e-1``),
    ``(N, sum_e C_e)``: each sample's row holds its selected expert's logits in that expert's
    block and ``fill`` everywhere else, so its argmax is the selected expert's prediction.

    Raises ``ValueError`` for mismatched shapes or an index outside ``[0, E)``."""
    _stack_check(logits, same_width=False)
    if selected.shape != (logits[0].shape[0],):
        raise ValueError(f"selected has shape {tuple(selected.shape)}; expected ({logits[0].shape[0]},)")
    if len(selected) and (int(selected.min()) < 0 or int(selected.max()) >= len(logits)):
        raise ValueError(f"selected holds an index outside [0, {len(logits)})")
    full = torch.cat(list(logits), dim=1)
    out = torch.full_like(full, fill)
    start = 0
    for e, t in enumerate(logits):
        rows = selected == e
        out[rows, start : start + t.shape[1]] = t[rows]
        start += t.shape[1]
    return out


def subspace_reweight(scores: torch.Tensor, own: torch.Tensor, alpha: float) -> torch.Tensor:
    """EASE's sub-space re-weighting: ``(N, C, S)`` per-sub-space scores (e.g. cosine to each
    class's prototype in each expert's sub-space) -> ``(N, C)``, ``sum_s w[c, s] scores[:, c,
    s]`` with weight 1 on class ``c``'s own sub-space ``own[c]`` and ``alpha / (S - 1)`` on
    every other (Zhou et al., CVPR 2024; github.com/sun-hailong/CVPR24-Ease
    ``forward_reweight``). Raises ``ValueError`` for mismatched shapes or an ``own`` outside
    ``[0, S)``."""
    if scores.dim() != 3 or own.shape != (scores.shape[1],):
        raise ValueError(f"scores must be (N, C, S) and own (C,); got {tuple(scores.shape)} and {tuple(own.shape)}")
    s = scores.shape[2]
    if len(own) and (int(own.min()) < 0 or int(own.max()) >= s):
        raise ValueError(f"own holds a sub-space outside [0, {s})")
    w = torch.full((len(own), s), alpha / max(s - 1, 1), device=scores.device)
    w[torch.arange(len(w)), own] = 1.0
    return (scores * w).sum(2)


def self_refined_retrieval(
    feats: torch.Tensor,
    start: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    task_of: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
) -> torch.Tensor:
    """MOS's self-refined adapter retrieval: ``feats`` ``(N, E, D)`` (each sample's feature
    under every expert), ``start`` ``(N,)`` the first-guess expert per sample. Each step scores
    the current expert's feature with ``head`` and moves to the expert of the predicted class
    (``task_of(logits) -> (N,)``) until the choice is stable or ``steps`` are done; returns the
    logits of the expert each sample settles on, ``(N, C)`` (Sun et al., AAAI 2025;
    github.com/sun-hailong/AAAI25-MOS ``_eval_cnn``). Raises ``ValueError`` for ``steps < 1``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rows = torch.arange(len(feats), device=feats.device)
    cur, done = start.clone(), torch.zeros_like(start, dtype=torch.bool)
    final: torch.Tensor | None = None
    for it in range(steps):
        logits = head(feats[rows, cur])
        if final is None:
            final = torch.empty_like(logits)
        final[~done] = logits[~done]
        nxt = task_of(logits)
        done = done | (nxt == cur) | (it + 1 == steps)
        cur = torch.where(done, cur, nxt)
        if bool(done.all()):
            break
    return final  # type: ignore[return-value]

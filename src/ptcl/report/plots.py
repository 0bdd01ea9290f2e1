"""Accuracy curve + accuracy matrix figure for a run, and an all-runs curve figure.

matplotlib is imported on the first figure, not with this module (about 1 s), and a run
draws its figure once, when it ends or stops (:func:`try_plot_run`), not after every task
(about 0.5 s a figure)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ptcl.io import atomic_write

log = logging.getLogger(__name__)


def _plt():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)


def try_plot_run(metrics: dict | str | os.PathLike, path: str | os.PathLike) -> bool:
    """:func:`plot_run` of ``metrics`` (a dict, or a ``metrics.json`` path) into ``path``.
    The figure is a view of results already saved, so a failure (unwritable folder,
    unreadable metrics) is a logged warning and returns ``False``, never an exception."""
    try:
        if not isinstance(metrics, dict):
            metrics = json.loads(Path(metrics).read_text())
        plot_run(metrics, path)
        return True
    except Exception as e:  # noqa: BLE001 (drawn while a run ends or stops: must not mask its outcome)
        log.warning("could not draw %s: %s", path, e)
        return False


def plot_run(metrics: dict, path: str | os.PathLike) -> None:
    """Left: accuracy on all seen classes per task. Right: the accuracy matrix."""
    plt = _plt()
    acc = metrics["accuracy_per_task"]
    A = np.array([[np.nan if v is None else v for v in r] for r in metrics["accuracy_matrix"]], float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(range(1, len(acc) + 1), acc, marker="o")
    ax1.set(xlabel="task", ylabel="accuracy on seen classes (%)", ylim=(0, 100),
            title=f"{metrics.get('method')} on {metrics.get('dataset')}")
    ax1.grid(alpha=0.3)
    im = ax2.imshow(A, vmin=0, vmax=100, cmap="viridis")
    ax2.set(xlabel="evaluated task", ylabel="after training task", title="accuracy matrix")
    for (i, j), v in np.ndenumerate(A):
        if not np.isnan(v):
            ax2.text(j, i, f"{v:.0f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax2)
    _save(fig, path)


def plot_curves(runs: dict[str, dict], path: str | os.PathLike) -> None:
    """One accuracy curve per run (label -> metrics)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, m in runs.items():
        acc = m["accuracy_per_task"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=label)
    ax.set(xlabel="task", ylabel="accuracy on seen classes (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)

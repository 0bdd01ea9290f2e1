"""Accuracy curve + accuracy matrix figure for a run, and an all-runs curve figure."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ptcl.io import atomic_write  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_run(metrics: dict, path: str | os.PathLike) -> None:
    """Left: accuracy on all seen classes per task. Right: the accuracy matrix."""
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
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, m in runs.items():
        acc = m["accuracy_per_task"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=label)
    ax.set(xlabel="task", ylabel="accuracy on seen classes (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)

"""``metrics.json`` assembly and text tables."""

from __future__ import annotations

import json
from pathlib import Path

from ptcl import metrics as M
from ptcl.errors import ConfigError


def summarize(header: dict, rows: list[dict]) -> dict:
    """``metrics.json`` content from the run header and the finished task rows."""
    acc = [r["accuracy"] for r in rows]
    A = [r["accuracy_row"] for r in rows]
    n = len(rows)
    return {
        **header,
        "tasks_done": n,
        "finished": n == header["num_tasks"],
        "accuracy_matrix": [row[:n] for row in A],
        "accuracy_per_task": acc,
        "avg_acc": M.average_incremental_accuracy(acc) if acc else None,
        "last_acc": M.last_accuracy(acc) if acc else None,
        "forgetting": M.forgetting([row[:n] for row in A]),
        "backward_transfer": M.backward_transfer([row[:n] for row in A]),
        "old_acc": [r["old_acc"] for r in rows],
        "new_acc": [r["new_acc"] for r in rows],
        "task_time_s": [r["time_s"] for r in rows],
        "total_time_s": sum(r["time_s"] for r in rows),
        "feature_time_s": sum(r.get("feature_time_s", 0.0) for r in rows),
        "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None),
        "rows": rows,
    }


def _f(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def task_table(m: dict) -> str:
    lines = ["task  classes  acc_all  acc_old  acc_new  time_s", "-" * 48]
    for r in m["rows"]:
        lines.append(
            f"{r['task']:>4}  {r['seen_classes']:>7}  {_f(r['accuracy'])}   {_f(r['old_acc'])}   "
            f"{_f(r['new_acc'])}  {r['time_s']:6.1f}"
        )
    lines.append(
        f"avg_acc {_f(m['avg_acc'])}  last_acc {_f(m['last_acc'])}  forgetting {_f(m['forgetting'])}"
    )
    return "\n".join(lines)


def read_metrics(run_dir: str | Path) -> dict:
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        raise ConfigError(f"{run_dir} is not a ptcl run folder (no metrics.json)")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is damaged (not JSON: {e})") from None
    need = ("method", "backbone", "tasks_done", "num_tasks", "avg_acc", "last_acc", "forgetting",
            "total_time_s", "accuracy_per_task")
    if not isinstance(m, dict) or any(k not in m for k in need):
        raise ConfigError(f"{p} is damaged or not a ptcl metrics file (missing keys)")
    return m


def compare_table(runs: dict[str, dict]) -> str:
    head = f"{'run':<28} {'method':<12} {'backbone':<24} {'tasks':>5} {'avg':>6} {'last':>6} {'forget':>6} {'time_s':>7}"
    lines = [head, "-" * len(head)]
    for label, m in runs.items():
        lines.append(
            f"{label[-28:]:<28} {m['method'][:12]:<12} {m['backbone'][:24]:<24} "
            f"{m['tasks_done']:>2}/{m['num_tasks']:<2} {_f(m['avg_acc'])} {_f(m['last_acc'])} "
            f"{_f(m['forgetting'])} {m['total_time_s']:7.1f}"
        )
    return "\n".join(lines)

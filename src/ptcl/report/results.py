"""``metrics.json`` assembly and text tables.

``metrics.json`` reports two forgetting measures (:mod:`ptcl.metrics`) and the run's
``eval_protocol``; its ``definitions`` entry says in words what each of them is, so a
results file read alone says which is which.
"""

from __future__ import annotations

import json
from pathlib import Path

from ptcl import metrics as M
from ptcl.errors import ConfigError

PER_IMAGE = "per_image"

#: What each ``eval_protocol`` value of ``metrics.json`` means (the value is the learner's
#: ``eval_protocol``; see :mod:`ptcl.engine.evaluate`).
PROTOCOLS = {
    PER_IMAGE: "every test image is predicted on its own, whatever the other images of its "
               "batch (task-agnostic; ptcl's default)",
    "batchwise_mixed_order": "the majority of each test batch picks the prompts (or task) of all its "
                             "images; batches are random mixes of the test set, so a prediction "
                             "depends on the other images of its batch",
    "batchwise_class_order": "the majority of each test batch picks the prompts (or task) of all its "
                             "images and the test set is served sorted by class (LAMDA-PILOT): task "
                             "identity leaks through batch composition",
    "batchwise_task_order": "the majority of each test batch picks the prompts (or task) of all its "
                            "images and every batch holds one task (the per-task test loaders of the "
                            "official L2P, DualPrompt and DAP codes): task identity leaks through "
                            "batch composition",
    "batch_mean_fusion_class_order": "the fused text and prototype tokens are averaged over each test batch "
                                     "(PROOF's official evaluation) and the test set is served sorted by class: "
                                     "a prediction depends on the other images of its batch",
}

DEFINITIONS = {
    "forgetting": "average forgetting of Chaudhry et al. 2018: mean over the old tasks of (best "
                  "accuracy before the last task - final accuracy); negative when old tasks improve",
    "forgetting_pilot": "forgetting as LAMDA-PILOT (trainer.py) and the official L2P, DualPrompt and "
                        "DAP codes compute it: mean over the old tasks of (best accuracy over all "
                        "tasks, the last included - final accuracy); never negative",
    "inference_per_task": "per task, what predicting one image costs after it (Learner.inference_cost): "
                          "backbone_passes (full backbone passes per image), experts_run (tuning states "
                          "evaluated per image: grows by one per task for an ensemble, stays 1 for a "
                          "merged model), parameters (elements of nn.Parameters, buffers not counted); "
                          "test_images: how many images the task's evaluation predicted (its time is "
                          "rows[i].eval_s, seconds)",
}


def leaks_task_identity(protocol: str | None) -> bool:
    """True for protocols whose test batches are formed by class or task while a prediction
    depends on its batch (a batch vote or a batch mean then sees the task)."""
    return protocol is not None and protocol.endswith(("_class_order", "_task_order"))


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
        "forgetting_pilot": M.forgetting_pilot([row[:n] for row in A]),
        "backward_transfer": M.backward_transfer([row[:n] for row in A]),
        "old_acc": [r["old_acc"] for r in rows],
        "new_acc": [r["new_acc"] for r in rows],
        "task_time_s": [r["time_s"] for r in rows],
        "total_time_s": sum(r["time_s"] for r in rows),
        "feature_time_s": sum(r.get("feature_time_s", 0.0) for r in rows),
        "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None),
        "inference_per_task": [r.get("inference") for r in rows],
        "definitions": _definitions(header.get("eval_protocol", PER_IMAGE)),
        **_variants(rows),
        "rows": rows,
    }


def _variants(rows: list[dict]) -> dict:
    """``variants``: per other classifier of the learner (``rows[i]["variants"]``, e.g.
    iCaRL's CNN beside its NME), its accuracy per task, average and last accuracy."""
    names = list(dict.fromkeys(k for r in rows for k in r.get("variants", {})))
    if not names:
        return {}
    out = {}
    for k in names:
        acc = [r["variants"][k]["accuracy"] for r in rows if k in r.get("variants", {})]
        out[k] = {"accuracy_per_task": acc, "avg_acc": M.average_incremental_accuracy(acc),
                  "last_acc": M.last_accuracy(acc)}
    return {"variants": out}


def _definitions(protocol: str) -> dict[str, str]:
    return {**DEFINITIONS, "eval_protocol": PROTOCOLS.get(protocol, "(not described)")}


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
        f"avg_acc {_f(m['avg_acc'])}  last_acc {_f(m['last_acc'])}  forgetting {_f(m['forgetting'])}  "
        f"forgetting_pilot {_f(_forgetting_pilot(m))}"
    )
    lines.append("forgetting: Chaudhry et al. (best accuracy before the last task); "
                 "forgetting_pilot: LAMDA-PILOT's (the last task included, never negative)")
    for k, v in m.get("variants", {}).items():
        lines.append(f"{k} classifier: avg_acc {_f(v['avg_acc'])}  last_acc {_f(v['last_acc'])}")
    protocol = m.get("eval_protocol")
    if protocol is not None and protocol != PER_IMAGE:
        lines.append(f"eval_protocol {protocol}: {PROTOCOLS.get(protocol, '(not described)')}")
    return "\n".join(lines)


def _forgetting_pilot(m: dict) -> float | None:
    """``forgetting_pilot`` of a metrics dict; computed from the accuracy matrix for results
    written before it was recorded."""
    if "forgetting_pilot" in m:
        return m["forgetting_pilot"]
    A = m.get("accuracy_matrix")
    return M.forgetting_pilot(A) if isinstance(A, list) and A else None


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
    """One line per run: accuracies, both forgetting measures, time and ``eval_protocol``
    (``?`` for results written before it was recorded); then what the columns mean."""
    head = (f"{'run':<28} {'method':<12} {'backbone':<24} {'tasks':>5} {'avg':>6} {'last':>6} "
            f"{'forget':>6} {'f_pilot':>7} {'time_s':>7}  protocol")
    lines = [head, "-" * len(head)]
    for label, m in runs.items():
        lines.append(
            f"{label[-28:]:<28} {m['method'][:12]:<12} {m['backbone'][:24]:<24} "
            f"{m['tasks_done']:>2}/{m['num_tasks']:<2} {_f(m['avg_acc'])} {_f(m['last_acc'])} "
            f"{_f(m['forgetting'])}  {_f(_forgetting_pilot(m))} {m['total_time_s']:7.1f}  "
            f"{m.get('eval_protocol') or '?'}"
        )
    lines.append("forget: Chaudhry et al. (best accuracy before the last task); f_pilot: LAMDA-PILOT's "
                 "forgetting (the last task included, never negative)")
    return "\n".join(lines)


def protocol_warning(runs: dict[str, dict]) -> str | None:
    """A warning when ``runs`` were evaluated under different protocols (their accuracies
    are then not comparable), or ``None``. Runs without ``eval_protocol`` count as unknown."""
    protocols = {m.get("eval_protocol") or "?" for m in runs.values()}
    if len(protocols) < 2:
        return None
    leaking = sorted(p for p in protocols if leaks_task_identity(p))
    why = (f"; {', '.join(leaking)} leak{'s' if len(leaking) == 1 else ''} task identity through "
           "batch composition" if leaking else "")
    return (f"the runs were evaluated under different protocols ({', '.join(sorted(protocols))}): "
            f"their accuracies are not comparable{why}")

"""The evaluation protocol of the prompt methods (issue 11 A).

With ``batchwise_prompt`` the majority of a test batch picks the prompts (or task) of all
its images, so how the test set is cut into batches decides the result. ``eval_order``
serves it as the official codes do (``task``: one task per batch, the per-task loaders of
l2p-pytorch / dualprompt-pytorch / dap-cl; ``class``: sorted by class, LAMDA-PILOT) with
the official test batch size; ``metrics.json`` and ``ptcl compare`` name the protocol.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_learner, tiny_overrides

from ptcl.cli import main
from ptcl.engine.evaluate import eval_batches, eval_protocol, predict_seen
from ptcl.methods.base import Learner
from ptcl.methods.prompt_pool import ordered_batches
from ptcl.registry import METHODS
from ptcl.report.results import compare_table, leaks_task_identity, protocol_warning

# ------------------------------------------------------------------------ batch formation

LABELS = np.array([3, 0, 5, 1, 2, 0, 4, 1, 3, 5, 2, 4])  # tasks of 2 classes: ends 2, 4, 6
ENDS = [2, 4, 6]


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def test_class_order_sorts_by_class_and_keeps_the_stored_order_within_a_class():
    batches = ordered_batches(LABELS, "class", 5, ENDS)
    order = _flat(batches)
    assert LABELS[order].tolist() == sorted(LABELS.tolist())
    assert order[:2] == [1, 5] and order[-2:] == [2, 9]  # class 0, class 5: stored order
    assert [len(b) for b in batches] == [5, 5, 2]  # fixed-size chunks straddle classes (PILOT)


def test_task_order_never_mixes_tasks_in_a_batch():
    batches = ordered_batches(LABELS, "task", 3, ENDS)
    tasks = [set(np.searchsorted(ENDS, LABELS[b], side="right").tolist()) for b in batches]
    assert all(len(t) == 1 for t in tasks)
    assert [t.pop() for t in tasks] == [0, 0, 1, 1, 2, 2]  # task by task
    assert [len(b) for b in batches] == [3, 1, 3, 1, 3, 1]  # a task's last batch is smaller
    assert _flat(batches)[:4] == [1, 3, 5, 7]  # stored order within the task
    assert sorted(_flat(batches)) == list(range(len(LABELS)))


def test_mixed_order_is_the_stored_order_or_a_seeded_shuffle():
    stored = ordered_batches(LABELS, "mixed", 5, ENDS)
    assert stored == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    shuffled = ordered_batches(LABELS, "mixed", 5, ENDS, seed=3)
    assert shuffled == ordered_batches(LABELS, "mixed", 5, ENDS, seed=3)
    assert _flat(shuffled) != _flat(stored) and sorted(_flat(shuffled)) == list(range(12))
    with pytest.raises(ValueError, match="unknown eval order"):
        ordered_batches(LABELS, "random", 5, ENDS)


def test_the_engine_checks_a_learners_batches():
    class Drops:
        def eval_batches(self, classes, batch_size):
            return [[0, 1], [3]]

    with pytest.raises(RuntimeError, match="cover each of the 4 test samples once"):
        eval_batches(Drops(), range(2), 2, 4)

    class Plain:  # the Learner defaults: stored order, per image
        eval_protocol = Learner.eval_protocol
        eval_batches = Learner.eval_batches

    assert eval_batches(Plain(), range(2), 3, 7) == [[0, 1, 2], [3, 4, 5], [6]]
    assert eval_protocol(Plain()) == "per_image"


# ------------------------------------------------------------------- on a prompt learner


def _spy_batches(learner, monkeypatch) -> list[np.ndarray]:
    """Record what the batch vote returns for every test batch (one entry per call)."""
    seen: list[np.ndarray] = []
    name = "select" if hasattr(learner, "select") else "task_index"
    original = getattr(learner, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().cpu().numpy())
        return out

    monkeypatch.setattr(learner, name, spy)
    return seen


@pytest.mark.parametrize("method, order", [("l2p", "class"), ("dualprompt", "task")])
def test_batchwise_selection_is_one_choice_per_served_batch(method, order, tmp_path, monkeypatch):
    over = {"method.batchwise_prompt": True, "method.eval_order": order, "method.batch_size": 4,
            **{f"method.{k}": v for k, v in getattr(METHODS.get(method), "test_options", {}).items()}}
    learner, sc = make_learner(tmp_path, method, over, per_class={"train": 2, "test": 5})
    for task in sc.tasks[:2]:
        learner.before_task(task)
    task = sc.tasks[1]
    batches = learner.eval_batches(range(task.end), 16)
    assert all(len(b) <= 4 for b in batches) and max(map(len, batches)) == 4  # method.batch_size
    seen = _spy_batches(learner, monkeypatch)
    pred, y = predict_seen(learner, task, batch_size=16)
    labels = learner.ctx.data.labels("test", range(task.end)).numpy()
    assert y.tolist() == labels[_flat(batches)].tolist()  # served in the learner's order
    if order == "class":
        assert y.tolist() == sorted(y.tolist())
    else:
        ends = np.cumsum(sc.sizes)
        assert all(len(set(np.searchsorted(ends, labels[b], side="right"))) == 1 for b in batches)
    assert len(seen) == len(batches)  # one vote per batch ...
    assert all((s == s[0]).all() for s in seen)  # ... whose choice every image of it gets
    assert learner.eval_protocol == f"batchwise_{order}_order"
    assert leaks_task_identity(learner.eval_protocol)


def test_default_is_per_image_in_the_stored_order(tmp_path):
    learner, sc = make_learner(tmp_path, "l2p", per_class={"train": 2, "test": 5})
    cfg = learner.cfg
    assert (cfg.batchwise_prompt, cfg.eval_order, cfg.eval_batch_size) == (False, "mixed", None)
    assert learner.eval_protocol == "per_image" and not leaks_task_identity("per_image")
    n = len(learner.eval_dataset(range(sc.tasks[1].end)))
    default = [list(range(i, min(i + 7, n))) for i in range(0, n, 7)]
    assert learner.eval_batches(range(sc.tasks[1].end), 7) == default  # the run's batch size
    learner.cfg.batchwise_prompt = True  # mixed + batch vote: a seeded shuffle, never task-sorted
    mixed = learner.eval_batches(range(sc.tasks[1].end), 7)
    assert _flat(mixed) != _flat(default) and learner.eval_protocol == "batchwise_mixed_order"
    assert not leaks_task_identity("batchwise_mixed_order")


# ------------------------------------------------------------ metrics.json and compare


def _cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_metrics_json_marks_the_protocol_and_compare_shows_it(tmp_path, capsys):
    leaky = tmp_path / "leaky"
    over = tiny_overrides("l2p", **{"method.epochs": 1, "method.batch_size": 8,
                                    "method.batchwise_prompt": "true", "method.eval_order": "task"})
    assert _cli(["run", *over, "--out", str(leaky), "-q"], capsys)[0] == 0
    m = json.loads((leaky / "metrics.json").read_text())
    assert m["eval_protocol"] == "batchwise_task_order"
    assert "task identity leaks" in m["definitions"]["eval_protocol"]
    plain = tmp_path / "plain"
    assert _cli(["run", *tiny_overrides("simplecil"), "--out", str(plain), "-q"], capsys)[0] == 0
    assert json.loads((plain / "metrics.json").read_text())["eval_protocol"] == "per_image"
    code, out, err = _cli(["compare", str(leaky), str(plain)], capsys)
    assert code == 0 and "protocol" in out.splitlines()[0]
    rows = {ln.split()[1]: ln for ln in out.splitlines()[2:4]}
    assert rows["l2p"].endswith("batchwise_task_order") and rows["simplecil"].endswith("per_image")
    assert "different protocols" in err and "batchwise_task_order leaks task identity" in err
    code, _, err = _cli(["compare", str(plain), str(plain)], capsys)
    assert code == 0 and "warning" not in err


def _metrics(protocol: str | None, A: list[list[float | None]]) -> dict:
    m = {"method": "l2p", "backbone": "vit", "tasks_done": len(A), "num_tasks": len(A), "avg_acc": 80.0,
         "last_acc": 70.0, "forgetting": 1.0, "total_time_s": 1.0, "accuracy_per_task": [80.0] * len(A),
         "accuracy_matrix": A}
    if protocol is not None:
        m["eval_protocol"] = protocol
    return m


def test_compare_of_results_written_before_the_protocol_was_recorded():
    A = [[90.0, None], [95.0, 80.0]]  # task 0 improved: forgetting_pilot 0, computed from A
    old, new = _metrics(None, A), _metrics("per_image", A)
    table = compare_table({"old": old, "new": new})
    old_row = next(ln for ln in table.splitlines() if ln.startswith("old"))
    assert old_row.split()[-1] == "?" and "  0.00" in old_row
    assert "different protocols (?, per_image)" in protocol_warning({"old": old, "new": new})
    assert protocol_warning({"a": new, "b": dict(new)}) is None


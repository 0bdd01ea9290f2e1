import numpy as np
import pytest

from ptcl import metrics as M

# accuracy matrix of 3 tasks, hand-written
A = [
    [90.0, None, None],
    [70.0, 80.0, None],
    [60.0, 75.0, 85.0],
]


def test_forgetting_and_bwt_hand_computed():
    # forgetting: task0 max(90,70)-60 = 30; task1 80-75 = 5 -> 17.5
    assert M.forgetting(A) == pytest.approx(17.5)
    # bwt: (60-90 + 75-80) / 2 = -17.5
    assert M.backward_transfer(A) == pytest.approx(-17.5)
    assert M.forgetting(A[:1]) is None


def test_forgetting_uses_best_earlier_accuracy():
    B = [[50.0, None, None], [80.0, 60.0, None], [40.0, 60.0, 70.0]]
    # task0's best before the end is 80 (after task 1), not its first value
    assert M.forgetting(B) == pytest.approx(((80 - 40) + (60 - 60)) / 2)


def test_average_and_last():
    acc = [90.0, 75.0, 72.0]
    assert M.average_incremental_accuracy(acc) == pytest.approx(79.0)
    assert M.last_accuracy(acc) == 72.0


def test_accuracy_row_and_old_new():
    target = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 1, 1, 1, 2, 0, 3, 3])
    row = M.accuracy_row(pred, target, bounds=[0, 2, 4], num_tasks=3)
    assert row == [75.0, 75.0, None]
    old, new = M.old_new_accuracy(pred, target, start=2)
    assert (old, new) == (75.0, 75.0)
    assert M.accuracy(pred, target) == 75.0
    assert M.old_new_accuracy(pred, target, start=0)[0] is None


def test_pilot_forgetting_includes_the_last_row():
    # task 0 improves in the last task (70 -> 95): Chaudhry's max runs over rows 0..T-2,
    # PILOT's (trainer.py print_forget) over all rows, so it never goes below 0
    C = [[90.0, None, None], [70.0, 80.0, None], [95.0, 75.0, 85.0]]
    # standard: (max(90, 70) - 95 + 80 - 75) / 2 = (-5 + 5) / 2 = 0
    assert M.forgetting(C) == pytest.approx(0.0)
    # PILOT: (max(90, 70, 95) - 95 + max(80, 75) - 75) / 2 = (0 + 5) / 2 = 2.5
    assert M.forgetting_pilot(C) == pytest.approx(2.5)
    assert M.forgetting_pilot(A) == pytest.approx(M.forgetting(A))  # equal when nothing improves
    assert M.forgetting_pilot(A[:1]) is None


def test_metrics_json_and_table_report_both_forgettings():
    from ptcl.report.results import summarize, task_table

    C = [[90.0, None, None], [70.0, 80.0, None], [95.0, 75.0, 85.0]]
    rows = [{"task": i, "seen_classes": 2 * (i + 1), "accuracy": 80.0, "accuracy_row": r, "old_acc": None,
             "new_acc": 80.0, "time_s": 1.0, "peak_memory_mb": 1.0} for i, r in enumerate(C)]
    m = summarize({"num_tasks": 3, "eval_protocol": "per_image"}, rows)
    assert (m["forgetting"], m["forgetting_pilot"]) == (pytest.approx(0.0), pytest.approx(2.5))
    assert "Chaudhry" in m["definitions"]["forgetting"] and "PILOT" in m["definitions"]["forgetting_pilot"]
    table = task_table(m)
    assert "forgetting   0.00  forgetting_pilot   2.50" in table and "LAMDA-PILOT" in table

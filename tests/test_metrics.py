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

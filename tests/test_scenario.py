import numpy as np
import pytest

from ptcl.data.scenario import Scenario, class_order, subset_per_class, task_sizes
from ptcl.errors import DataError


def test_cifar100_order_seed_1993():
    assert class_order(100, 1993)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def test_no_shuffle_keeps_label_order():
    assert class_order(7, 1993, shuffle=False) == list(range(7))


@pytest.mark.parametrize(
    "n, init, inc, expected",
    [
        (100, 10, 10, [10] * 10),
        (200, 20, 20, [20] * 10),
        (100, 50, 10, [50] + [10] * 5),
        (10, 4, 2, [4, 2, 2, 2]),
        (10, 4, 4, [4, 4, 2]),
        (10, 10, 5, [10]),
        (7, 3, 3, [3, 3, 1]),
    ],
)
def test_task_sizes(n, init, inc, expected):
    assert task_sizes(n, init, inc) == expected


@pytest.mark.parametrize("init, inc", [(0, 2), (2, 0), (11, 2), (-1, 1)])
def test_impossible_split_is_rejected(init, inc):
    with pytest.raises(DataError, match="impossible task split"):
        task_sizes(10, init, inc)


def test_label_map_and_tasks():
    sc = Scenario.build(10, 4, 3, seed=1993)
    assert [t.classes for t in sc.tasks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    lm = sc.label_map
    assert [lm[c] for c in sc.order] == list(range(10))
    assert sc.task_of_label(3) == 0 and sc.task_of_label(4) == 1 and sc.task_of_label(9) == 2


def test_subset_per_class_deterministic_and_balanced():
    y = np.repeat(np.arange(5), 20)
    a = subset_per_class(y, 7, seed=3)
    b = subset_per_class(y, 7, seed=3)
    np.testing.assert_array_equal(a, b)
    assert np.bincount(y[a]).tolist() == [7] * 5
    assert not np.array_equal(a, subset_per_class(y, 7, seed=4))
    assert len(subset_per_class(y, None, seed=0)) == 100
    assert len(subset_per_class(y, 50, seed=0)) == 100  # fewer samples than asked: all kept

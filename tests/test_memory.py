"""Exemplar memory: herding on a hand-checked example, both budget kinds, random draws from
the caller's generator, state round trip, and the served images."""

from __future__ import annotations

import pytest
import torch
from helpers import make_learner

from ptcl.data.memory import ExemplarMemory, herding


def test_herding_picks_the_hand_computed_exemplars():
    # normalised 2-D points; the class mean of the normalised features is (0.6, 0.2)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    fn = torch.nn.functional.normalize(f, dim=1)
    mu = fn.mean(0)
    # by hand: step 1 the point closest to mu; step 2 the one whose mean with it is closest
    first = int(((mu - fn) ** 2).sum(1).argmin())
    rest = [i for i in range(4) if i != first]
    second = min(rest, key=lambda i: float(((mu - (fn[first] + fn[i]) / 2) ** 2).sum()))
    got = herding(f, 3).tolist()
    assert got[:2] == [first, second]
    assert len(set(got)) == 3
    assert herding(f, 10).tolist()[:3] == got  # never more than the class has, order kept
    assert len(herding(f, 10)) == 4
    assert herding(f, 0).tolist() == []
    with pytest.raises(ValueError):
        herding(f[0], 1)


def _task(n_per_class: int, classes: list[int], offset: int = 0):
    labels = torch.tensor([c for c in classes for _ in range(n_per_class)])
    positions = torch.arange(len(labels)) + offset
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(labels), 5, generator=g)
    return positions, labels, feats


def test_fixed_total_budget_shrinks_old_classes_and_keeps_their_first_exemplars():
    mem = ExemplarMemory(total=12)
    p, y, f = _task(10, [0, 1])
    mem.update(p, y, f)
    assert len(mem) == 12 and (mem.labels == 0).sum() == 6
    first0 = mem.positions[mem.labels == 0][:4].tolist()
    p, y, f = _task(10, [2], offset=100)
    mem.update(p, y, f)
    assert len(mem) == 12 and all(int((mem.labels == c).sum()) == 4 for c in range(3))
    assert mem.positions[mem.labels == 0].tolist() == first0  # the priority order is kept
    assert mem.classes() == [0, 1, 2]
    with pytest.raises(ValueError, match="already"):
        mem.update(p, y, f)


def test_fixed_per_class_budget_and_random_selection():
    mem = ExemplarMemory(per_class=3, selection="random")
    p, y, f = _task(10, [0, 1])
    with pytest.raises(ValueError, match="generator"):
        mem.update(p, y, None)
    mem.update(p, y, None, torch.Generator().manual_seed(1))
    p2, y2, _ = _task(10, [5], offset=50)
    mem.update(p2, y2, None, torch.Generator().manual_seed(1))
    assert len(mem) == 9 and [int((mem.labels == c).sum()) for c in (0, 1, 5)] == [3, 3, 3]
    again = ExemplarMemory(per_class=3, selection="random")
    again.update(p, y, None, torch.Generator().manual_seed(1))
    assert torch.equal(again.positions, mem.positions[:6])  # the draw is the generator's
    with pytest.raises(ValueError, match="exactly one"):
        ExemplarMemory(per_class=2, total=10)


def test_state_round_trip_into_a_fresh_memory():
    mem = ExemplarMemory(total=8)
    p, y, f = _task(6, [3, 1])
    mem.update(p, y, f)
    fresh = ExemplarMemory(total=8)
    fresh.load_state_dict(mem.state_dict())
    assert torch.equal(fresh.positions, mem.positions) and torch.equal(fresh.labels, mem.labels)


def test_dataset_serves_the_stored_training_images(tmp_path):
    learner, sc = make_learner(tmp_path, "simplecil")
    data = learner.ctx.data
    task = sc.tasks[0]
    pos = torch.from_numpy(data.positions("train", task.classes))
    feats, labels = data.features("train", task.classes)
    mem = ExemplarMemory(per_class=2)
    mem.update(pos, labels, feats)
    ds = mem.dataset(data, train_transform=False)
    plain = data.images("train", task.classes)
    assert len(ds) == 2 * task.num_new
    for i in range(len(ds)):
        j = int(torch.nonzero(pos == mem.positions[i]).flatten()[0])
        x, y = ds[i]
        x0, y0 = plain[j]
        assert y == y0 == int(mem.labels[i]) and torch.equal(x, x0)

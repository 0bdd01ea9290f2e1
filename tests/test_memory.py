"""Exemplar memory: herding and closest-to-mean on a hand-computed example, both budget kinds
after every task, random draws from the caller's generator, state round trip, the served
images (alone and after the current task's), and kill -9 + resume bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import make_learner, tiny_overrides

from ptcl.data.features import FeatureCache
from ptcl.data.memory import ExemplarMemory, closest_to_mean, herding, images_with_memory
from ptcl.engine.runner import run
from ptcl.io import load_tensors

# Four 2-D features of one class; L2-normalised: f0 = (1, 0), f1 = (0, 1), f2 = (0.6, 0.8),
# f3 = (5/13, 12/13) = (0.384615, 0.923077). Class mean mu = (0.496154, 0.680769).
HAND = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [5.0, 12.0]])


def test_herding_picks_the_hand_computed_exemplars():
    # step 1, |mu - f|^2: f0 0.717308, f1 0.348077, f2 0.025000, f3 0.071154     -> f2
    # step 2, |mu - (f2 + f)/2|^2: f0 0.171154, f1 0.086538, f3 0.032692        -> f3
    # step 3, |mu - (f2 + f3 + f)/3|^2: f0 0.038675, f1 0.079701                -> f0
    # step 4: f1 is left                                                        -> f1
    assert herding(HAND, 4).tolist() == [2, 3, 0, 1]
    assert herding(HAND, 2).tolist() == [2, 3]
    assert herding(HAND, 10).tolist() == [2, 3, 0, 1]  # never more than the class has
    assert herding(HAND * 7.5, 4).tolist() == [2, 3, 0, 1]  # on normalised features: scale-free
    assert herding(HAND, 0).tolist() == []
    with pytest.raises(ValueError):
        herding(HAND[0], 1)


def test_closest_to_mean_ranks_by_distance_to_the_class_mean():
    # |mu - f|^2 (step 1 above): f2 0.025000 < f3 0.071154 < f1 0.348077 < f0 0.717308; herding's
    # third pick (f0) differs: it completes the mean, this one does not
    assert closest_to_mean(HAND, 4).tolist() == [2, 3, 1, 0]
    assert closest_to_mean(HAND, 3).tolist() == [2, 3, 1]
    assert closest_to_mean(torch.ones(3, 2), 2).tolist() == [0, 1]  # ties: lowest index first
    mem = ExemplarMemory(per_class=3, selection="closest_to_mean")
    mem.update(torch.tensor([10, 11, 12, 13]), torch.zeros(4, dtype=torch.long), HAND)
    assert mem.positions.tolist() == [12, 13, 11]
    with pytest.raises(ValueError, match="closest_to_mean needs the features"):
        ExemplarMemory(per_class=3, selection="closest_to_mean").update([0], [0], None)
    with pytest.raises(ValueError, match="selection must be one of"):
        ExemplarMemory(per_class=3, selection="nearest")  # type: ignore[arg-type]


@pytest.mark.parametrize("selection", ["herding", "closest_to_mean", "random"])
@pytest.mark.parametrize("budget", [{"per_class": 4}, {"total": 30}])
def test_the_budget_holds_after_every_task(budget, selection):
    # 4 tasks; class c has 2 + c samples (classes 0..2 smaller than some budgets)
    tasks = [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9, 10, 11]]
    mem = ExemplarMemory(**budget, selection=selection)
    g = torch.Generator().manual_seed(3)
    seen: list[int] = []
    offset = 0
    for t, classes in enumerate(tasks):
        labels = torch.tensor([c for c in classes for _ in range(2 + c)])
        positions = torch.arange(len(labels)) + offset
        offset += len(labels)
        mem.update(positions, labels, torch.randn(len(labels), 6, generator=g), torch.Generator().manual_seed(t))
        seen += classes
        m = budget.get("per_class") or budget["total"] // len(seen)  # PILOT: memory_size // seen classes
        counts = {c: int((mem.labels == c).sum()) for c in seen}
        assert counts == {c: min(m, 2 + c) for c in seen}, (t, m, counts)
        assert len(mem) <= budget.get("total", 10**9)
        assert mem.classes() == seen
        assert len(set(mem.positions.tolist())) == len(mem)  # no sample twice


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


def test_images_with_memory_serves_the_task_then_the_exemplars(tmp_path):
    learner, sc = make_learner(tmp_path, "simplecil", init_cls=4, increment=3)
    data = learner.ctx.data
    old, new = sc.tasks[0], sc.tasks[1]
    feats, labels = data.features("train", old.classes)
    mem = ExemplarMemory(per_class=2)
    mem.update(torch.from_numpy(data.positions("train", old.classes)), labels, feats)
    ds = images_with_memory(data, new.classes, mem, train_transform=False)
    task = data.images("train", new.classes)
    stored = mem.dataset(data, train_transform=False)
    assert len(ds) == len(task) + len(mem) == len(task) + 2 * old.num_new
    for i in range(len(ds)):
        x, y = ds[i]
        x0, y0 = task[i] if i < len(task) else stored[i - len(task)]
        assert y == y0 and torch.equal(x, x0)
    assert {ds[i][1] for i in range(len(task), len(ds))} == set(old.classes)
    assert len(images_with_memory(data, new.classes, None)) == len(task)
    assert len(images_with_memory(data, new.classes, ExemplarMemory(total=5))) == len(task)  # empty memory


KILL_AT_TASK_2 = textwrap.dedent(
    """
    import sys, time
    import ptcl.engine.runner as runner
    from ptcl.cli import main

    evaluate = runner.predict_seen

    def hold_task_2(learner, task, *a, **k):
        if task.index == 2:  # task 1 is saved; wait here for the test's SIGKILL
            time.sleep(600)
        return evaluate(learner, task, *a, **k)

    runner.predict_seen = hold_task_2
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_memory_survives_kill_9_and_resume_bit_identically(tmp_path):
    """PROOF (the tiny CLIP) keeps a shrinking total memory with random selection over 3
    tasks; a run killed with SIGKILL once task 1's checkpoint exists, then resumed, ends with
    the uninterrupted run's memory buffers."""
    over = tiny_overrides("proof", **{"method.epochs": 1, "method.batch_size": 8, "method.memory_size": 20,
                                      "method.memory_selection": "random", "scenario.init_cls": 4,
                                      "scenario.increment": 3})
    full = run(None, over, out=tmp_path / "full", quiet=True, cache=FeatureCache(tmp_path / "fc"))
    assert full["tasks_done"] == 3
    out = tmp_path / "killed"
    env = {**os.environ, "PTCL_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.Popen([sys.executable, "-c", KILL_AT_TASK_2, "run", *over, "--out", str(out), "-q"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    saved = out / "checkpoints" / "task_001.safetensors"
    deadline = time.monotonic() + 600
    while not saved.is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert saved.is_file(), p.stderr.read()[-2000:] if p.poll() is not None else "timed out"
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "checkpoints" / "task_002.safetensors").exists()
    after_kill = load_tensors(saved)
    resumed = run(resume=out, quiet=True, cache=FeatureCache(tmp_path / "cache" / "features"))
    assert resumed["finished"] and resumed["tasks_done"] == 3
    want = load_tensors(tmp_path / "full" / "checkpoints" / "task_002.safetensors")
    got = load_tensors(out / "checkpoints" / "task_002.safetensors")
    for key in ("memory.positions", "memory.labels"):
        assert torch.equal(got[key], want[key]), key
    # the memory changed in the resumed task (10 classes x 20 // 10), so the comparison means something
    assert len(want["memory.labels"]) == 20 and len(after_kill["memory.labels"]) == 7 * (20 // 7)
    assert torch.bincount(want["memory.labels"]).tolist() == [2] * 10


@pytest.mark.parametrize("method", ["proof", "promptfusion"])
def test_clip_methods_choose_closest_to_mean_exemplars_on_frozen_features(tmp_path, method):
    from helpers import make_learner

    from ptcl.data.memory import closest_to_mean as pick

    over = {"method.memory_selection": "closest_to_mean"}
    from ptcl.registry import METHODS

    over.update({f"method.{k}": v for k, v in METHODS.get(method).test_options.items()})
    over.update({"method.memory_per_class": 2} if method == "proof" else {"method.memory_size": 4})
    learner, sc = make_learner(tmp_path, method, over)
    task = sc.tasks[0]
    learner.before_task(task)
    learner.after_task(task)  # the memory update reads the frozen features only
    feats, labels = learner.ctx.data.features("train", task.classes)
    pos = torch.from_numpy(learner.ctx.data.positions("train", task.classes))
    want = torch.cat([pos[torch.nonzero(labels == c).flatten()[pick(feats[labels == c], 2)]]
                      for c in dict.fromkeys(labels.tolist())])
    assert learner.memory.selection == "closest_to_mean"
    assert torch.equal(learner.memory.positions, want)

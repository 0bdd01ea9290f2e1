"""Tests generated from the method registry: every method, 2 tasks, tiny random ViT."""

from __future__ import annotations

import pytest
import torch
from helpers import make_learner, run_task

import ptcl.methods  # noqa: F401
from ptcl.engine.evaluate import eval_dataset, predict_seen
from ptcl.registry import METHODS

METHOD_NAMES = METHODS.names()


def fast_options(name: str) -> dict:
    """Shrink training so each method runs in seconds (only options the method has)."""
    fields = METHODS.get(name).config_cls.__dataclass_fields__
    opts = {"epochs": 1, "batch_size": 8}
    opts.update(getattr(METHODS.get(name), "test_options", {}))
    return {f"method.{k}": v for k, v in opts.items() if k in fields}


def make(name: str, tmp_path, **extra):
    return make_learner(tmp_path, name, {**fast_options(name), **extra})


def batch(learner, seen: int, n: int):
    """``n`` test inputs of the first ``seen`` classes, in the form ``predict`` takes."""
    # through the run's loader: images arrive normalised on the device (served uint8)
    x, _ = next(iter(learner.ctx.data.loader(eval_dataset(learner, range(seen)), n, shuffle=False)))
    return x


def run_tasks(learner, sc, n: int):
    for task in sc.tasks[:n]:
        run_task(learner, task)
        pred, y = predict_seen(learner, task)
        assert pred.max() < task.end and len(pred) == len(y) == 3 * task.end


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_head_covers_seen_classes_and_frozen_weights_stay(name, tmp_path):
    learner, sc = make(name, tmp_path)
    frozen = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    for task in sc.tasks[:2]:
        run_task(learner, task)
        with torch.no_grad():
            assert learner.predict(batch(learner, task.end, 4)).shape == (4, task.end)
    if not learner.updates_backbone:
        after = learner.backbone.state_dict()
        changed = [k for k, v in frozen.items() if not torch.equal(v, after[k])]
        assert not changed, f"{name} changed frozen pre-trained weights: {changed[:3]}"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    learner, sc = make(name, tmp_path)
    run_tasks(learner, sc, 2)
    state = learner.checkpoint_state()
    fresh, _ = make(name, tmp_path)
    for task in sc.tasks[:2]:
        fresh.before_task(task)  # replay structure growth, as resume does
    fresh.load_checkpoint_state(state)
    x = batch(learner, 4, 6)
    learner.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x), learner.predict(x), rtol=0, atol=0)


# A fixed seed repeating is tested on checkpoint tensors in test_determinism.py.

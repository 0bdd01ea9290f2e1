"""Same config and seed, same weights: every checkpoint tensor, for every registered method.

Accuracies of a random tiny ViT hide differences (most methods predict one class), so these
tests compare the checkpoints tensor by tensor:

* a cold feature cache against a warm one (a cache miss must not shift any random stream);
* a run stopped after task 0 (``max_tasks=1``) and resumed, against the uninterrupted run;
* a run killed with SIGKILL during task 1 and resumed, against the uninterrupted run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

import ptcl.methods  # noqa: F401
from ptcl.data.features import FeatureCache
from ptcl.engine.runner import run
from ptcl.io import load_tensors
from ptcl.registry import METHODS

METHOD_NAMES = METHODS.names()
REPO = Path(__file__).resolve().parents[1]


def options(name: str) -> list[str]:
    """Two tasks, one short epoch, every checkpoint kept."""
    fields = METHODS.get(name).config_cls.__dataclass_fields__
    opts = {"epochs": 1, "batch_size": 8, **getattr(METHODS.get(name), "test_options", {})}
    extra = {f"method.{k}": v for k, v in opts.items() if k in fields}
    extra.update({"scenario.init_cls": 4, "scenario.increment": 6, "keep_all_checkpoints": "true"})
    return tiny_overrides(name, **extra)


def checkpoint(run_dir: Path, task: int) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "checkpoints" / f"task_{task:03d}.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different tensors {sorted(set(a) ^ set(b))[:5]}"
    differ = {
        k: float((a[k].double() - b[k].double()).abs().max()) if a[k].shape == b[k].shape else "shape"
        for k in a
        if not (a[k].shape == b[k].shape and torch.equal(a[k], b[k]))
    }
    assert not differ, f"{what}: tensors differ (max abs difference): {dict(list(differ.items())[:5])}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs with a cold cache, one per method (computed on first use)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            root = tmp_path_factory.mktemp(f"ref-{name}")
            run(None, options(name), out=root / "run", quiet=True, cache=FeatureCache(root / "fc"))
            runs[name] = root
        return runs[name] / "run"

    return get


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_cold_and_warm_feature_cache_give_identical_checkpoints(name, reference, tmp_path):
    cold = reference(name)
    cache = FeatureCache(cold.parent / "fc")  # the cache the cold run filled
    warm = run(None, options(name), out=tmp_path / "warm", quiet=True, cache=cache)
    for task in (0, 1):
        assert_same_tensors(checkpoint(cold, task), checkpoint(Path(warm["run_dir"]), task),
                            f"{name} task {task}, cold vs warm cache")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_resumed_after_max_tasks_equals_uninterrupted(name, reference, tmp_path):
    full = reference(name)
    part = tmp_path / "part"
    cache = FeatureCache(tmp_path / "fc")  # cold again: the resume must not depend on it either
    run(None, options(name), out=part, quiet=True, max_tasks=1, cache=cache)
    assert not (part / "checkpoints" / "task_001.safetensors").exists()
    resumed = run(resume=part, quiet=True, cache=FeatureCache(tmp_path / "fc2"))
    assert resumed["finished"]
    assert_same_tensors(checkpoint(full, 1), checkpoint(part, 1), f"{name}: resumed vs uninterrupted")


KILL_DURING_TASK_1 = textwrap.dedent(
    """
    import os, signal, sys
    import ptcl.engine.runner as runner
    from ptcl.cli import main

    evaluate = runner.predict_seen

    def predict_then_die(learner, task, *a, **k):
        if task.index == 1:  # task 1 is trained but not evaluated or saved
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(learner, task, *a, **k)

    runner.predict_seen = predict_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_killed_during_task_1_and_resumed_equals_uninterrupted(name, reference, tmp_path):
    full = reference(name)
    out = tmp_path / "killed"
    env = {**os.environ, "PTCL_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", KILL_DURING_TASK_1, "run", *options(name), "--out", str(out), "-q"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / "checkpoints" / "task_000.safetensors").is_file()
    assert not (out / "checkpoints" / "task_001.safetensors").exists()
    resumed = run(resume=out, quiet=True, cache=FeatureCache(tmp_path / "cache" / "features"))
    assert resumed["finished"] and resumed["tasks_done"] == 2
    assert_same_tensors(checkpoint(full, 1), checkpoint(out, 1), f"{name}: killed+resumed vs uninterrupted")


def test_augmentation_does_not_depend_on_loader_workers(tmp_path, monkeypatch):
    """Per-sample augmentation seeds: 0 and 2 loader workers train identical weights."""
    from ptcl.data import loading

    monkeypatch.setattr(loading, "MIN_WORKER_ITEMS", 1)  # workers even for the tiny test loaders
    over = options("finetune")
    a = run(None, [*over, "num_workers=0"], out=tmp_path / "w0", quiet=True, cache=FeatureCache(tmp_path / "fc"))
    b = run(None, [*over, "num_workers=2"], out=tmp_path / "w2", quiet=True, cache=FeatureCache(tmp_path / "fc"))
    assert_same_tensors(checkpoint(Path(a["run_dir"]), 1), checkpoint(Path(b["run_dir"]), 1), "0 vs 2 workers")


def test_global_random_state_before_a_task_does_not_matter(tmp_path):
    """Draws from the global generators before a run (other work in the process) change
    nothing: each task reseeds, and engine work runs with the generators isolated."""
    over = options("l2p")
    a = run(None, over, out=tmp_path / "a", quiet=True, cache=FeatureCache(tmp_path / "fc"))
    torch.rand(1000)
    import random

    import numpy as np

    random.random()
    np.random.rand(7)
    b = run(None, over, out=tmp_path / "b", quiet=True, cache=FeatureCache(tmp_path / "fc"))
    assert_same_tensors(checkpoint(Path(a["run_dir"]), 1), checkpoint(Path(b["run_dir"]), 1), "global state")

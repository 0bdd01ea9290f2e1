"""An interrupted run continues after its last finished task and ends with the same metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import assert_resume_matches_full, tiny_overrides

from ptcl.engine.runner import run

ACC_KEYS = ("accuracy_matrix", "accuracy_per_task", "avg_acc", "last_acc", "forgetting", "old_acc", "new_acc", "class_order")


@pytest.mark.parametrize("method", ["simplecil", "finetune"])
def test_resume_after_task_2_gives_identical_metrics(method, tmp_path):
    over = tiny_overrides(method, **{"method.epochs": 1} if method == "finetune" else {})
    assert_resume_matches_full(over, tmp_path, ACC_KEYS)


def test_killed_run_resumes(tmp_path):
    """SIGKILL a real run once task 2 is in metrics.json, then resume it."""
    out = tmp_path / "killed"
    over = tiny_overrides("finetune", **{"method.epochs": 3, "dataset.train_per_class": 20})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "ptcl", "run", *over, "--out", str(out), "-q"], env=env)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            m = out / "metrics.json"
            if m.is_file() and json.loads(m.read_text())["tasks_done"] >= 2:
                break
            if p.poll() is not None:
                pytest.fail("run ended before it could be killed")
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    done = json.loads((out / "metrics.json").read_text())["tasks_done"]
    assert 2 <= done < 5
    resumed = run(resume=out, quiet=True)
    full = run(None, over, out=tmp_path / "full", quiet=True)
    for k in ACC_KEYS:
        assert resumed[k] == full[k], k

"""Per-task checkpoints: the learner's state as safetensors, written atomically.

Only tensors are stored (no pickle), so loading a checkpoint cannot execute code.
The pre-trained backbone weights are not stored unless the method changes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from ptcl.io import atomic_save_tensors, load_tensors
from ptcl.methods.base import Learner


def checkpoint_path(run_dir: Path, task: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"task_{task:03d}.safetensors"


def save_checkpoint(run_dir: Path, task: int, learner: Learner, meta: dict) -> Path:
    p = checkpoint_path(run_dir, task)
    atomic_save_tensors(p, learner.checkpoint_state(), metadata={"meta": json.dumps({"task": task, **meta})})
    return p


def load_checkpoint(run_dir: Path, task: int, learner: Learner) -> dict:
    p = checkpoint_path(run_dir, task)
    learner.load_checkpoint_state(load_tensors(p))
    with safe_open(str(p), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))

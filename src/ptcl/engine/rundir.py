"""The run folder: where a run's results live, who may write them, and what a resume trusts.

Layout: ``config.yaml`` (resolved config), ``stream.json`` (what defines the task stream),
``metrics.json`` (rows of the finished tasks), ``run.log``, ``accuracy.png`` and
``checkpoints/task_NNN.safetensors``.

* One process at a time: :meth:`RunFolder.lock` takes an exclusive ``flock`` on
  ``RUN_DIR/.lock`` (released by the kernel when the process ends, even on ``kill -9``).
* Leftover temporary files of interrupted writes are removed when the lock is taken.
* On resume every file is checked before use; a damaged one raises :class:`ResumeError`
  naming it and what to do, and is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors import SafetensorError, safe_open

from ptcl.config import yaml_load
from ptcl.engine.checkpoint import checkpoint_path, load_checkpoint
from ptcl.errors import ConfigError, PtclError
from ptcl.io import atomic_write_json, remove_stale_tmp, writable_dir_error

log = logging.getLogger(__name__)

ROW_KEYS = ("task", "seen_classes", "accuracy", "accuracy_row", "old_acc", "new_acc", "time_s")


class ResumeError(PtclError):
    """A run folder cannot be resumed as it is (damaged file, changed dataset)."""


class RunFolderBusy(PtclError):
    """Another process holds the run folder."""


def check_out_dir(out: str | os.PathLike) -> Path:
    """Validate an ``--out`` folder before anything runs; returns it as a ``Path``."""
    if str(out).strip() == "":
        raise ConfigError("--out is empty; give the run folder's path (or leave --out out)")
    p = Path(out).expanduser()
    why = writable_dir_error(p, "run folder (--out)")
    if why:
        raise ConfigError(f"{why}; choose another --out")
    return p


def stream_identity(splits: Any, scenario: Any, index: dict[str, np.ndarray]) -> dict[str, Any]:
    """What defines the task stream: the dataset's content fingerprints, class order, task
    sizes and the hashes of the selected sample indices (per split)."""
    return {
        "dataset_fingerprint": {s: getattr(splits, s).fingerprint for s in ("train", "test")},
        "num_classes": int(splits.num_classes),
        "class_order": [int(c) for c in scenario.order],
        "task_sizes": [int(s) for s in scenario.sizes],
        "subset": {
            s: hashlib.sha256(np.ascontiguousarray(i, dtype=np.int64).tobytes()).hexdigest()
            for s, i in index.items()
        },
        "samples": {s: int(len(i)) for s, i in index.items()},
    }


class RunFolder:
    """A run folder on disk (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- files ----------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def stream(self) -> Path:
        return self.path / "stream.json"

    def checkpoint(self, task: int) -> Path:
        return checkpoint_path(self.path, task)

    # -- locking --------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the folder for this process; raises :class:`RunFolderBusy` if another has it.
        Also removes leftovers of interrupted writes (they cannot belong to a live writer)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise RunFolderBusy(
                f"run folder {self.path} is in use by another ptcl process (pid {owner}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for folder in (self.path, self.path / "checkpoints"):
            remove_stale_tmp(folder, owned=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # -- reading for resume --------------------------------------------------------------------
    def _damaged(self, p: Path, why: str, what_to_do: str) -> ResumeError:
        return ResumeError(f"cannot resume {self.path}: {p.name} is damaged ({why}); {what_to_do}; "
                           f"the file is left as it is")

    def read_config_data(self) -> dict[str, Any]:
        """``config.yaml`` as a dict (checked to be a mapping)."""
        p = self.config
        if not p.is_file():
            raise ConfigError(f"cannot resume: {self.path} is not a ptcl run folder (no config.yaml)")
        try:
            data = yaml_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise self._damaged(p, f"not YAML: {str(e).splitlines()[0]}", "start again with a new --out") from None
        if not isinstance(data, dict):
            raise self._damaged(p, "not a mapping of config sections", "start again with a new --out")
        return data

    def read_rows(self, num_tasks: int) -> list[dict]:
        """Rows of the finished tasks in ``metrics.json`` (none if it does not exist yet)."""
        p = self.metrics
        if not p.exists():
            return []
        todo = "restore it from a copy, or start again with a new --out"
        try:
            m = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._damaged(p, f"not JSON: {e}", todo) from None
        rows = m.get("rows") if isinstance(m, dict) else None
        if not isinstance(rows, list):
            raise self._damaged(p, "no 'rows' list of finished tasks", todo)
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or any(k not in r for k in ROW_KEYS) or r["task"] != i:
                raise self._damaged(p, f"row {i} is not the record of task {i}", todo)
        if len(rows) > num_tasks:
            raise self._damaged(p, f"{len(rows)} finished tasks but the stream has {num_tasks}", todo)
        return rows

    def check_stream(self, current: dict[str, Any]) -> None:
        """Refuse to resume when what defines the stream differs from the recorded one."""
        p = self.stream
        if not p.exists():
            return
        try:
            saved = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._damaged(p, f"not JSON: {e}", "start again with a new --out") from None
        labels = {  # the most telling difference first
            "task_sizes": "the task sizes changed",
            "num_classes": "the number of classes changed",
            "class_order": "the class order changed",
            "samples": "the number of selected samples changed",
            "subset": "the selected samples changed",
            "dataset_fingerprint": "the dataset's files changed",
        }
        for key, what in labels.items():
            if key in saved and saved[key] != current.get(key):
                detail = ""
                if key in ("task_sizes", "num_classes", "samples"):
                    detail = f" ({saved[key]} -> {current.get(key)})"
                raise ResumeError(
                    f"cannot resume {self.path}: {what} since the run started{detail}; a resumed "
                    "run must see the same stream: restore the data, or start a new run with --out"
                )

    def load_checkpoint(self, task: int, learner: Any, method: str) -> None:
        """Load task ``task``'s checkpoint into ``learner``, checking it is a readable
        safetensors file written by ``method`` for that task and matching the learner."""
        p = self.checkpoint(task)
        earlier = [t for t in range(task) if self.checkpoint(t).is_file()]
        todo = (
            f"move it aside and resume again to continue after task {earlier[-1]} "
            f"(its checkpoint is kept), or start again with a new --out" if earlier
            else "start again with a new --out (no earlier checkpoint is kept; "
                 "keep_all_checkpoints=true keeps them)"
        )
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            why = "empty file" if p.stat().st_size == 0 else f"not a readable safetensors file: {e}"
            raise self._damaged(p, why, todo) from None
        if not isinstance(meta, dict):
            raise self._damaged(p, "its metadata is not a ptcl checkpoint's", todo)
        if meta.get("method") != method:
            raise self._damaged(p, f"it is a checkpoint of method {meta.get('method')!r}, this run "
                                   f"is {method!r}", todo)
        if meta.get("task") != task:
            raise self._damaged(p, f"it holds task {meta.get('task')}, expected task {task}", todo)
        try:
            load_checkpoint(self.path, task, learner)
        except (SafetensorError, RuntimeError, ValueError, KeyError) as e:
            raise self._damaged(p, f"its tensors do not fit the learner: {str(e).splitlines()[0]}", todo) from None

    # -- writing ---------------------------------------------------------------------------
    def write_stream(self, identity: dict[str, Any]) -> None:
        atomic_write_json(self.stream, identity)

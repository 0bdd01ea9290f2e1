"""The run folder: where a run's results live, who may write them, and what a resume trusts.

Layout: ``config.yaml`` (resolved config), ``stream.json`` (what defines the task stream),
``metrics.json`` (rows of the finished tasks), ``run.log``, ``accuracy.png`` and
``checkpoints/task_NNN.safetensors``.

* One process at a time: :meth:`RunFolder.lock` takes an exclusive POSIX lock (``lockf``)
  on ``RUN_DIR/.lock``, released by the kernel when the process ends, even on ``kill -9``
  (unlike ``flock``, it is not inherited by forked data-loader workers that outlive it).
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

from ptcl import dist
from ptcl.config import yaml_load
from ptcl.engine.checkpoint import checkpoint_path, load_checkpoint
from ptcl.errors import ConfigError, PtclError
from ptcl.io import atomic_write_json, remove_stale_tmp, writable_dir_error

log = logging.getLogger(__name__)

ROW_KEYS = ("task", "seen_classes", "accuracy", "accuracy_row", "old_acc", "new_acc", "time_s")


def _percent(v: Any, optional: bool = False) -> bool:
    """A percentage (``nan`` for a task without test samples), or ``None`` if ``optional``."""
    if v is None:
        return optional
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (v != v or 0 <= v <= 100)


def _row_problem(r: Any, i: int, ends: list[int]) -> str | None:
    """Why ``r`` is not a sound record of task ``i`` of the stream, or ``None``."""
    if not isinstance(r, dict):
        return "not a mapping"
    missing = [k for k in ROW_KEYS if k not in r]
    if missing:
        return f"no {missing[0]!r}"
    if r["task"] != i:
        return f"it records task {r['task']!r}"
    if r["seen_classes"] != ends[i]:
        return f"seen_classes {r['seen_classes']!r}, but task {i} ends at {ends[i]} classes"
    row = r["accuracy_row"]
    if not (isinstance(row, list) and len(row) == len(ends)
            and all(v is None if j > i else _percent(v, optional=True) for j, v in enumerate(row))):
        return f"accuracy_row is not {len(ends)} percentages (None after task {i})"
    if not (_percent(r["accuracy"]) and _percent(r["new_acc"]) and _percent(r["old_acc"], optional=True)):
        return "accuracy, old_acc or new_acc is not a percentage"
    for k in ("time_s", "feature_time_s", "peak_memory_mb"):
        v = r.get(k, 0.0)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            return f"{k} is not a non-negative number"
    return None


class ResumeError(PtclError):
    """A run folder cannot be resumed as it is (damaged file, changed dataset)."""


class RunFolderBusy(PtclError):
    """Another process holds the run folder."""


def check_out_dir(out: str | os.PathLike, what: str = "--out") -> Path:
    """Validate a run folder given as ``--out`` (or ``--resume``) before anything runs;
    returns it as a ``Path``."""
    if str(out).strip() == "":
        raise ConfigError(f"{what} is empty; give the run folder's path")
    try:
        p = Path(out).expanduser()
    except RuntimeError as e:  # ~user of an unknown user
        raise ConfigError(f"{what} {out}: {e}") from None
    if p.is_symlink() and not p.exists():
        raise ConfigError(f"{what} {p} is a dangling (or looping) symbolic link; choose another folder")
    why = writable_dir_error(p, f"run folder ({what})")
    if why:
        raise ConfigError(f"{why}; choose another folder")
    return p


def stream_identity(splits: Any, scenario: Any, index: dict[str, np.ndarray]) -> dict[str, Any]:
    """What defines the task stream: the dataset's content fingerprints, class order, task
    sizes, the hashes of the selected sample indices (per split) and the class names a
    learner sees (dataset class order; a CLIP method's text classifier depends on them)."""
    names = getattr(splits, "class_names", None)
    return {
        **({"class_names": [str(n) for n in names]} if names is not None else {}),
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
        Also removes leftovers of interrupted writes (they cannot belong to a live writer).
        Under torchrun only rank 0 writes, so only rank 0 takes the lock (the others no-op)."""
        if not dist.is_main():
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        why = writable_dir_error(self.path, "run folder")
        if why is None and (self.path / "checkpoints").is_dir():
            why = writable_dir_error(self.path / "checkpoints", "checkpoint folder")
        if why:
            raise ConfigError(f"{why}; make it writable or choose another folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot write the run folder {self.path}: {e.strerror or e}") from None
        try:  # POSIX record lock: not inherited by forked loader workers that outlive us
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
            os.close(self._lock_fd)  # closing releases the lock
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

    def read_rows(self, ends: list[int]) -> list[dict]:
        """Rows of the finished tasks in ``metrics.json`` (none if it does not exist yet),
        each checked against the stream (``ends[t]``: classes seen after task ``t``)."""
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
        if len(rows) > len(ends):
            raise self._damaged(p, f"{len(rows)} finished tasks but the stream has {len(ends)}", todo)
        for i, r in enumerate(rows):
            why = _row_problem(r, i, ends)
            if why:
                raise self._damaged(p, f"row {i}: {why}", todo)
        return rows

    def _todo(self, task: int) -> str:
        """What to do when task ``task``'s checkpoint cannot be used."""
        earlier = [t for t in range(task) if self.checkpoint(t).is_file()]
        if earlier:
            return (f"continue after task {earlier[-1]}, whose checkpoint is kept, with `ptcl run "
                    f"--resume {self.path} --from-task {earlier[-1]}` (this drops the records of the "
                    "later tasks), or start again with a new --out")
        return ("start again with a new --out (no earlier checkpoint is kept; "
                "keep_all_checkpoints=true keeps them)")

    def rows_to_resume(self, rows: list[dict], from_task: int | None = None) -> list[dict]:
        """The finished rows a resume continues after: all of them, whose last checkpoint must
        be on disk, or those up to ``from_task`` (whose checkpoint must be kept)."""
        if from_task is not None:
            if not 0 <= from_task < len(rows):
                done = f"tasks 0-{len(rows) - 1}" if rows else "no task"
                raise ResumeError(f"--from-task {from_task}: {self.metrics} records {done}")
            if not self.checkpoint(from_task).is_file():
                raise ResumeError(f"--from-task {from_task}: {self.checkpoint(from_task)} is not kept")
            return rows[: from_task + 1]
        if rows:
            last = len(rows) - 1
            p = self.checkpoint(last)
            if not p.is_file():
                state = "missing" if not p.exists() else "not a file"
                raise ResumeError(
                    f"cannot resume {self.path}: {p.name} is {state}, but metrics.json records "
                    f"tasks 0-{last}; {self._todo(last)}"
                )
        return rows

    def check_stream(self, current: dict[str, Any]) -> None:
        """Refuse to resume when what defines the stream differs from the recorded one."""
        p = self.stream
        if not p.exists():
            return  # run folders written before ptcl recorded the stream
        todo = "start again with a new --out"
        try:
            saved = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._damaged(p, f"not JSON: {e}", todo) from None
        labels = {  # the most telling difference first
            "task_sizes": "the task sizes changed",
            "num_classes": "the number of classes changed",
            "class_order": "the class order changed",
            "samples": "the number of selected samples changed",
            "subset": "the selected samples changed",
            "dataset_fingerprint": "the dataset's files changed",
        }
        if not isinstance(saved, dict) or any(k not in saved for k in labels):
            raise self._damaged(p, "not the record of a stream", todo)
        if "class_names" in saved:  # recorded since the class names reach the learner
            labels["class_names"] = "the class names changed (a name map or dataset.class_names)"
        for key, what in labels.items():
            if saved[key] != current.get(key):
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
        todo = self._todo(task)
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            why = "empty file" if p.stat().st_size == 0 else f"not a readable safetensors file: {e}"
            raise self._damaged(p, why, todo) from None
        if not isinstance(meta, dict):
            raise self._damaged(p, "its metadata is not a ptcl checkpoint's", todo)
        if meta.get("method") != method:
            raise ResumeError(
                f"cannot resume {self.path}: {p.name} is a checkpoint of method "
                f"{meta.get('method')!r}, but config.yaml names {method!r}; was config.yaml "
                "edited? restore its method, or start again with a new --out"
            )
        if meta.get("task") != task:
            raise self._damaged(p, f"it holds task {meta.get('task')}, expected task {task}", todo)
        try:
            load_checkpoint(self.path, task, learner)
        except (SafetensorError, RuntimeError, ValueError, KeyError) as e:
            raise self._damaged(p, f"its tensors do not fit the learner: {str(e).splitlines()[0]}; "
                                   "if config.yaml was edited, restore it", todo) from None

    # -- writing ---------------------------------------------------------------------------
    def write_stream(self, identity: dict[str, Any]) -> None:
        atomic_write_json(self.stream, identity)

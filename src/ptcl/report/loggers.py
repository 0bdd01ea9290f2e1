"""Loggers that write a run's progress while it goes, for watching long runs (``loggers=[...]``).

The top-level option ``loggers`` (:class:`ptcl.config.RunConfig`; default ``[]``: nothing
beyond ``run.log``) names registered :class:`RunLogger` classes (:data:`LOGGERS`), the
loggers users know from Avalanche and Lightning:

``csv``
    ``<run>/logs/train.csv``: one row per training epoch (:data:`EPOCH_FIELDS`);
    ``<run>/logs/tasks.csv``: one row per finished task (:func:`task_values`).
``tensorboard``
    TensorBoard event files written by ``torch.utils.tensorboard.SummaryWriter`` (needs
    ``pip install tensorboard``, or ``pip install 'ptcl[tensorboard]'``), two TensorBoard
    runs side by side (the Keras ``train``/``validation`` layout):
    ``<run>/logs/tb/train``: ``train/loss``, ``train/lr``, ``train/epoch_time_s`` at step =
    the run's epoch counter; ``<run>/logs/tb/tasks``: the per-task values (:data:`TB_TAGS`)
    at step = the task index. Watch with ``tensorboard --logdir <run>/logs/tb``.

The values: per epoch, the mean training loss of the epoch (what :func:`ptcl.train.fit`
returns), the learning rate of the optimiser's first parameter group when the epoch started
(a per-epoch schedule's lr for the whole epoch, a per-step schedule's first) and the epoch's
wall time (seconds); per task, the row ``metrics.json`` records (accuracy on all seen
classes, on the old and the new classes, on each task's classes, in percent; task, feature
and evaluation time in seconds; peak memory in MiB) plus the running average incremental
accuracy and forgetting.

Steps. The epoch counter counts every epoch of every :func:`~ptcl.train.fit` of the run from
0 (a method that fits twice per task advances it by both). ``logs/steps.json`` records it
after each finished task, so ``--resume`` continues it: the csv files keep their header and
the rows of the finished tasks (rows of a task that was interrupted, or dropped with
``--from-task``, are removed) and the new rows are appended; the TensorBoard writers reopen
their folders with ``purge_step`` = the first step not finished (TensorBoard then hides
the interrupted task's events), so resumed events never collide with earlier ones.

Only the main process (rank 0 under torchrun, :func:`ptcl.dist.is_main`) writes. A logger
that fails (a full disk, a removed folder) is switched off with one warning; the run goes on.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from ptcl.errors import ConfigError
from ptcl.registry import Registry

log = logging.getLogger(__name__)

LOGGERS: Registry = Registry("logger")
"""Logger name (as in ``loggers=[...]``) -> :class:`RunLogger` subclass."""

STEPS_FILE = "steps.json"


@dataclass
class EpochRecord:
    """One finished training epoch (a row of ``train.csv``)."""

    step: int  # the run's epoch counter (from 0): TensorBoard's step
    task: int  # the task being trained (from 0)
    fit: str  # the train loop's description (e.g. ``task 1``, ``task 1 adapter``)
    epoch: int  # epoch of this fit, from 1
    epochs: int  # epochs of this fit
    loss: float  # mean training loss of the epoch
    lr: float  # first parameter group's learning rate when the epoch started
    time_s: float  # wall time of the epoch, seconds


EPOCH_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EpochRecord))
"""Columns of ``train.csv``."""

TASK_FIELDS: tuple[str, ...] = (
    "task", "seen_classes", "accuracy", "old_acc", "new_acc", "avg_acc", "forgetting",
    "time_s", "feature_time_s", "eval_s", "peak_memory_mb",
)
"""Columns of ``tasks.csv`` before ``acc_task_0 .. acc_task_{T-1}`` (accuracy on each task's
classes after this task; empty for tasks not seen yet)."""

TB_TAGS: dict[str, str] = {
    "accuracy": "accuracy/all_seen", "old_acc": "accuracy/old", "new_acc": "accuracy/new",
    "avg_acc": "accuracy/average_incremental", "forgetting": "forgetting",
    "time_s": "cost/task_time_s", "feature_time_s": "cost/feature_time_s",
    "eval_s": "cost/eval_time_s", "peak_memory_mb": "cost/peak_memory_mb",
}
"""TensorBoard tag of each per-task value; ``acc_task_j`` is ``accuracy_on_task/j``."""


def task_values(row: dict, summary: dict, num_tasks: int) -> dict[str, float | int | None]:
    """The per-task values of a finished task: ``row`` is its ``metrics.json`` row,
    ``summary`` the ``metrics.json`` content after it (for the running ``avg_acc`` and
    ``forgetting``); ``None`` where a value does not exist (``old_acc`` at task 0)."""
    out: dict[str, Any] = {k: row.get(k) for k in TASK_FIELDS}
    out["avg_acc"], out["forgetting"] = summary.get("avg_acc"), summary.get("forgetting")
    acc_row = list(row.get("accuracy_row") or [])
    for j in range(num_tasks):
        out[f"acc_task_{j}"] = acc_row[j] if j < len(acc_row) else None
    return out


# --------------------------------------------------------------------------- loggers


class RunLogger:
    """One output format. Lifecycle: :meth:`open` (once, in the main process), then
    :meth:`log_epoch` / :meth:`log_task` as the run goes, then :meth:`close`. Any method may
    raise (``OSError`` on a full disk); :class:`RunLoggers` then switches the logger off.

    ``requires``: ``(module, pip package)`` that must be installed, checked by
    :func:`check_loggers` when the config is read."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, str] | None] = None

    def __init__(self, logs: Path, num_tasks: int) -> None:
        self.logs = logs
        self.num_tasks = num_tasks

    def open(self, first_task: int, first_step: int) -> None:
        """Start writing; on resume drop what tasks ``>= first_task`` (epochs at steps
        ``>= first_step``) wrote before."""

    def log_epoch(self, rec: EpochRecord) -> None:
        """One finished epoch."""

    def log_task(self, values: dict[str, float | int | None]) -> None:
        """One finished task (:func:`task_values`)."""

    def close(self) -> None:
        """Flush and release files."""


def _csv_text(columns: Sequence[str], rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


@LOGGERS.register("csv")
class CSVLogger(RunLogger):
    """``logs/train.csv`` (one row per epoch) and ``logs/tasks.csv`` (one row per task),
    flushed after every row; floats as Python writes them (``repr``: read back exactly)."""

    name = "csv"

    def __init__(self, logs: Path, num_tasks: int) -> None:
        super().__init__(logs, num_tasks)
        self.columns = {
            "train": EPOCH_FIELDS,
            "tasks": TASK_FIELDS + tuple(f"acc_task_{j}" for j in range(num_tasks)),
        }
        self._files: dict[str, Any] = {}

    def path(self, kind: str) -> Path:
        return self.logs / f"{kind}.csv"

    def open(self, first_task: int, first_step: int) -> None:
        from ptcl.io import atomic_write_text

        self.logs.mkdir(parents=True, exist_ok=True)
        for kind, cols in self.columns.items():
            p = self.path(kind)
            if p.is_file():  # a resumed run: keep the finished tasks' rows, the header once
                with p.open(newline="") as f:
                    kept = [r for r in csv.DictReader(f) if _int(r.get("task")) < first_task]
                atomic_write_text(p, _csv_text(cols, kept))
            else:
                atomic_write_text(p, _csv_text(cols, []))
            self._files[kind] = p.open("a", newline="")

    def _write(self, kind: str, row: dict) -> None:
        f = self._files[kind]
        csv.DictWriter(f, fieldnames=list(self.columns[kind]), lineterminator="\n").writerow(
            {k: "" if v is None else v for k, v in row.items()})
        f.flush()

    def log_epoch(self, rec: EpochRecord) -> None:
        self._write("train", asdict(rec))

    def log_task(self, values: dict[str, float | int | None]) -> None:
        self._write("tasks", values)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def _int(text: str | None) -> int:
    try:
        return int(text or "")
    except ValueError:
        return -1


@LOGGERS.register("tensorboard")
class TensorBoardLogger(RunLogger):
    """TensorBoard event files via ``torch.utils.tensorboard.SummaryWriter``: per-epoch
    scalars in ``logs/tb/train`` (step: the run's epoch counter), per-task scalars in
    ``logs/tb/tasks`` (step: the task index; tags :data:`TB_TAGS`)."""

    name = "tensorboard"
    requires = ("tensorboard", "tensorboard")

    def __init__(self, logs: Path, num_tasks: int) -> None:
        super().__init__(logs, num_tasks)
        self._writers: dict[str, Any] = {}

    def open(self, first_task: int, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = self.logs / "tb"
        resumed = root.is_dir()
        for kind, first in (("train", first_step), ("tasks", first_task)):
            # purge_step hides the events a killed process wrote at steps >= first
            self._writers[kind] = SummaryWriter(str(root / kind), purge_step=first if resumed else None)

    def log_epoch(self, rec: EpochRecord) -> None:
        w = self._writers["train"]
        w.add_scalar("train/loss", rec.loss, rec.step)
        w.add_scalar("train/lr", rec.lr, rec.step)
        w.add_scalar("train/epoch_time_s", rec.time_s, rec.step)
        w.flush()

    def log_task(self, values: dict[str, float | int | None]) -> None:
        w = self._writers["tasks"]
        step = int(values["task"])  # type: ignore[arg-type]
        for key, v in values.items():
            tag = TB_TAGS.get(key) or (f"accuracy_on_task/{key[len('acc_task_'):]}"
                                       if key.startswith("acc_task_") else None)
            if tag is not None and v is not None and math.isfinite(float(v)):
                w.add_scalar(tag, float(v), step)
        w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


def check_loggers(names: Sequence[str]) -> None:
    """Raise a one-line :class:`ConfigError` for an unknown logger name (listing the valid
    ones), a name given twice, a value that is not a list, or a logger whose package is not
    installed (saying what to ``pip install``)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"loggers must be a list of names, got {names!r}; valid: {', '.join(LOGGERS.names())}")
    seen: set[str] = set()
    for name in names:
        cls = LOGGERS.get(name)  # unknown -> ConfigError listing the valid names
        if name in seen:
            raise ConfigError(f"loggers names {name!r} twice; valid: {', '.join(LOGGERS.names())}")
        seen.add(name)
        if cls.requires is not None and importlib.util.find_spec(cls.requires[0]) is None:
            raise ConfigError(f"loggers=[{name}] needs the {cls.requires[1]} package: "
                              f"pip install {cls.requires[1]} (or pip install 'ptcl[{name}]')")


# --------------------------------------------------------------------------- the run's set


class RunLoggers:
    """The run's loggers, as the runner drives them: :meth:`start_task`, :meth:`epoch` (from
    the train loop's :class:`~ptcl.train.callbacks.EpochEnd`), :meth:`task_done` after the
    task's results are saved, :meth:`close`.

    ``names``: the config's ``loggers``; ``logs``: the run's ``logs`` folder; ``finished``:
    tasks already finished (0, or where ``--resume`` continues). Does nothing outside the
    main process or with no names. Never raises: a logger that fails is closed and dropped
    with one warning naming it and the error."""

    def __init__(self, names: Sequence[str], logs: Path, num_tasks: int, finished: int = 0) -> None:
        from ptcl import dist

        self.logs = logs
        self.task = finished
        self.step = 0  # the run's epoch counter
        self.loggers: list[RunLogger] = []
        self.ends: list[int] = []  # the epoch counter after each finished task
        self._steps_warned = False
        if not names or not dist.is_main():
            return
        self.ends = self._read_steps(finished)
        self.step = self.ends[-1] if self.ends else 0
        for name in names:
            logger = LOGGERS.get(name)(logs, num_tasks)
            if self._call(logger, "open", finished, self.step):
                self.loggers.append(logger)

    def _read_steps(self, finished: int) -> list[int]:
        if not finished:
            return []
        try:
            ends = [int(s) for s in json.loads((self.logs / STEPS_FILE).read_text())["epochs_after_task"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ends = []
            why = e
        else:
            why = None
        if len(ends) < finished:
            log.warning("logs/%s does not hold the epoch counter of task %d (%s); the resumed "
                        "run's epoch steps restart from %d", STEPS_FILE, finished - 1,
                        why or "too few tasks", ends[-1] if ends else 0)
            return ends
        return ends[:finished]

    def _call(self, logger: RunLogger, method: str, *args: Any) -> bool:
        try:
            getattr(logger, method)(*args)
            return True
        except Exception as e:  # a logger never stops the run
            from ptcl.io import is_disk_full

            what = "the disk is full" if is_disk_full(e) else f"{type(e).__name__}: {e}"
            log.warning("logger %s stopped (%s failed: %s); the run goes on, %s logs nothing more",
                        logger.name, method, what, logger.name)
            if logger in self.loggers:
                self.loggers.remove(logger)
            if method != "close":
                try:
                    logger.close()
                except Exception:
                    pass  # already reported
            return False

    def _all(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            self._call(logger, method, *args)

    def start_task(self, index: int) -> None:
        """The task whose epochs follow."""
        self.task = index

    def epoch(self, fit: str, epoch: int, epochs: int, loss: float, lr: float, time_s: float) -> None:
        """One finished epoch of any fit (``epoch`` from 1 of ``epochs``); advances the counter."""
        if self.loggers:
            self._all("log_epoch", EpochRecord(self.step, self.task, fit, epoch, epochs, loss, lr, time_s))
        self.step += 1

    def task_done(self, row: dict, summary: dict) -> None:
        """Task ``row["task"]`` finished and its results are saved."""
        if not self.loggers:
            return
        self._all("log_task", task_values(row, summary, int(summary.get("num_tasks", 0))))
        from ptcl.io import atomic_write_json

        self.ends = self.ends[: int(row["task"])] + [self.step]
        try:
            atomic_write_json(self.logs / STEPS_FILE, {"epochs_after_task": self.ends})
        except OSError as e:
            if not self._steps_warned:
                self._steps_warned = True
                log.warning("cannot write logs/%s (%s); a resumed run would restart its epoch steps",
                            STEPS_FILE, e)

    def close(self) -> None:
        self._all("close")
        self.loggers = []

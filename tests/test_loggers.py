"""The run loggers (``loggers=[csv, tensorboard]``, :mod:`ptcl.report.loggers`).

A trained method runs on the tiny ViT with both loggers; the csv files are read back with
the ``csv`` module and the event files with TensorBoard's own reader, and every value must
equal what the run itself reports (``metrics.json`` rows, the losses the train loop returns).
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import time
from pathlib import Path

import pytest
from helpers import tiny_overrides

import ptcl.methods.base as base
import ptcl.report.loggers as L
from ptcl.config import build_config
from ptcl.engine.runner import run
from ptcl.errors import ConfigError, RunInterrupted

# 10 MNIST classes in 2 tasks (6 + 4 classes)
TWO_TASKS = {"scenario.init_cls": 6, "scenario.increment": 4}


def overrides(method: str = "finetune", **extra: object) -> list[str]:
    """2 tasks of ``method``; finetune trains 2 epochs per task."""
    epochs = {"method.epochs": 2} if method == "finetune" else {}
    return tiny_overrides(method, **{**TWO_TASKS, **epochs, **extra})


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(text: str) -> float | None:
    return None if text == "" else float(text)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard run in ``folder`` -> ``[(step, value)]``, as
    TensorBoard's reader shows them (events hidden by a purge left out)."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def same(series: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float = 1e-6) -> bool:
    """Steps equal and values equal as float32 holds them."""
    return ([s for s, _ in series] == [s for s, _ in expected]
            and [v for _, v in series] == pytest.approx([v for _, v in expected], rel=rel))


def record_losses(monkeypatch) -> list[list[float]]:
    """The per-epoch losses every fit of the run returns, in order."""
    fits: list[list[float]] = []
    fit = base.fit

    def recording_fit(*args, **kwargs):
        losses = fit(*args, **kwargs)
        fits.append(list(losses))
        return losses

    monkeypatch.setattr(base, "fit", recording_fit)
    return fits


def test_csv_and_tensorboard_hold_the_run_s_values(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    fits = record_losses(monkeypatch)
    m = run(None, overrides(loggers="[csv,tensorboard]"), out=tmp_path / "r", quiet=True)
    logs = tmp_path / "r" / "logs"
    rows = json.loads((tmp_path / "r" / "metrics.json").read_text())["rows"]
    assert len(rows) == 2 and len(fits) == 2  # one fit per task

    # per epoch: the loss the loop returned, the first epoch at the configured lr
    losses = [v for f in fits for v in f]
    train = read_csv(logs / "train.csv")
    assert [float(r["loss"]) for r in train] == losses  # written with repr: exact
    assert [int(r["step"]) for r in train] == list(range(4))
    assert [(int(r["task"]), int(r["epoch"]), int(r["epochs"])) for r in train] == [(0, 1, 2), (0, 2, 2), (1, 1, 2), (1, 2, 2)]
    assert [r["fit"] for r in train] == ["task 0", "task 0", "task 1", "task 1"]
    lr = build_config(None, overrides()).method.lr
    assert float(train[0]["lr"]) == float(train[2]["lr"]) == lr
    assert float(train[1]["lr"]) < lr  # the cosine schedule's second epoch

    # per task: the metrics.json rows
    tasks = read_csv(logs / "tasks.csv")
    assert [int(r["task"]) for r in tasks] == [0, 1]
    for t, (r, row) in enumerate(zip(tasks, rows)):
        for key in ("accuracy", "old_acc", "new_acc", "time_s", "peak_memory_mb", "eval_s"):
            assert number(r[key]) == row[key], key
        assert [number(r[f"acc_task_{j}"]) for j in range(2)] == row["accuracy_row"]
        assert number(r["avg_acc"]) == pytest.approx(sum(m["accuracy_per_task"][: t + 1]) / (t + 1))
    assert tasks[0]["old_acc"] == "" and number(tasks[1]["forgetting"]) == m["forgetting"]

    # TensorBoard: the same values (float32) at the documented steps
    tb_train = scalars(logs / "tb" / "train")
    assert [s for s, _ in tb_train["train/loss"]] == list(range(4))
    assert [v for _, v in tb_train["train/loss"]] == pytest.approx(losses, rel=1e-6)
    assert [v for _, v in tb_train["train/lr"]] == pytest.approx([float(r["lr"]) for r in train], rel=1e-6)
    tb = scalars(logs / "tb" / "tasks")
    assert same(tb["accuracy/all_seen"], list(enumerate(m["accuracy_per_task"])))
    assert same(tb["accuracy/old"], [(1, rows[1]["old_acc"])])  # none at task 0
    assert same(tb["accuracy/new"], [(t, r["new_acc"]) for t, r in enumerate(rows)])
    assert same(tb["accuracy_on_task/0"], [(t, r["accuracy_row"][0]) for t, r in enumerate(rows)])
    assert same(tb["accuracy_on_task/1"], [(1, rows[1]["accuracy_row"][1])])
    assert same(tb["cost/peak_memory_mb"], [(t, r["peak_memory_mb"]) for t, r in enumerate(rows)])
    assert same(tb["cost/task_time_s"], [(t, r["time_s"]) for t, r in enumerate(rows)])


def test_default_writes_nothing_beyond_run_log_and_frozen_methods_log_tasks(tmp_path):
    run(None, overrides("simplecil"), out=tmp_path / "plain", quiet=True)
    assert not (tmp_path / "plain" / "logs").exists()
    m = run(None, overrides("simplecil", loggers="[csv]"), out=tmp_path / "csv", quiet=True)
    logs = tmp_path / "csv" / "logs"
    assert read_csv(logs / "train.csv") == []  # no training epochs: the header alone
    assert (logs / "train.csv").read_text().splitlines() == [",".join(L.EPOCH_FIELDS)]
    assert [float(r["accuracy"]) for r in read_csv(logs / "tasks.csv")] == m["accuracy_per_task"]
    assert not (logs / "tb").exists()


def test_resume_after_an_interruption_appends_without_duplicates(tmp_path, monkeypatch):
    """Killed after task 1's first epoch: the resumed run drops that epoch's rows and events,
    keeps the header once and continues the steps; it logs what an uninterrupted run logs."""
    pytest.importorskip("tensorboard")
    over = overrides(loggers="[csv,tensorboard]")
    run(None, over, out=tmp_path / "full", quiet=True)

    epoch = L.RunLoggers.epoch

    def interrupt(self, fit, n, *args):
        epoch(self, fit, n, *args)
        if self.task == 1 and n == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(L.RunLoggers, "epoch", interrupt)
        with pytest.raises(RunInterrupted):
            run(None, over, out=tmp_path / "part", quiet=True)
    logs = tmp_path / "part" / "logs"
    assert [int(r["task"]) for r in read_csv(logs / "train.csv")] == [0, 0, 1]  # the stale epoch
    time.sleep(1.1)  # TensorBoard orders event files by the second in their names; a real resume is later
    run(resume=tmp_path / "part", quiet=True)

    full, part = tmp_path / "full" / "logs", tmp_path / "part" / "logs"
    text = (part / "train.csv").read_text()
    assert text.count("step,task,") == 1  # the header once
    strip = ("time_s",)  # wall times differ; everything else repeats exactly
    rows = [{k: v for k, v in r.items() if k not in strip} for r in read_csv(part / "train.csv")]
    assert rows == [{k: v for k, v in r.items() if k not in strip} for r in read_csv(full / "train.csv")]
    assert [r["accuracy"] for r in read_csv(part / "tasks.csv")] == [r["accuracy"] for r in read_csv(full / "tasks.csv")]
    resumed, uninterrupted = scalars(part / "tb" / "train"), scalars(full / "tb" / "train")
    assert [s for s, _ in resumed["train/loss"]] == list(range(4))  # the stale event is hidden
    assert resumed["train/loss"] == uninterrupted["train/loss"]
    assert scalars(part / "tb" / "tasks")["accuracy/all_seen"] == scalars(full / "tb" / "tasks")["accuracy/all_seen"]
    assert json.loads((part / "steps.json").read_text()) == {"epochs_after_task": [2, 4]}


def test_resume_after_a_finished_task_continues_the_steps(tmp_path):
    part = run(None, overrides(loggers="[csv]"), out=tmp_path / "r", quiet=True, max_tasks=1)
    assert part["tasks_done"] == 1
    run(resume=tmp_path / "r", quiet=True)
    train = read_csv(tmp_path / "r" / "logs" / "train.csv")
    assert [(int(r["step"]), int(r["task"])) for r in train] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert (tmp_path / "r" / "logs" / "tasks.csv").read_text().count("task,seen_classes") == 1


def test_a_failing_logger_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    def full_disk(self, rec):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L.CSVLogger, "log_epoch", full_disk)
    with caplog.at_level(logging.WARNING, logger="ptcl"):
        m = run(None, overrides(loggers="[csv]"), out=tmp_path / "r", quiet=True)
    assert m["finished"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "logger csv stopped" in warnings[0] and "disk is full" in warnings[0]
    assert read_csv(tmp_path / "r" / "logs" / "tasks.csv") == []  # switched off after the failure


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    import ptcl.dist

    monkeypatch.setattr(ptcl.dist, "is_main", lambda: False)
    loggers = L.RunLoggers(["csv"], tmp_path / "logs", num_tasks=2)
    loggers.epoch("task 0", 1, 1, 0.5, 0.1, 1.0)
    loggers.task_done({"task": 0, "accuracy": 50.0, "accuracy_row": [50.0, None]}, {"num_tasks": 2})
    loggers.close()
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(("value", "message"), [
    ("[csv,wandb]", "unknown logger 'wandb'; valid: csv, tensorboard"),
    ("[csv,csv]", "loggers names 'csv' twice"),
    ("csv", "loggers must be a list"),
])
def test_bad_loggers_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build_config(None, [f"loggers={value}"])
    assert build_config(None, []).loggers == []


def test_tensorboard_without_the_package_says_what_to_install(monkeypatch):
    find_spec = L.importlib.util.find_spec
    monkeypatch.setattr(L.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(ConfigError) as e:
        build_config(None, ["loggers=[tensorboard]"])
    assert "pip install tensorboard" in str(e.value) and "\n" not in str(e.value)
    build_config(None, ["loggers=[csv]"])  # csv needs nothing


def test_task_values_leave_unseen_tasks_empty():
    row = {"task": 1, "seen_classes": 4, "accuracy": 50.0, "old_acc": 25.0, "new_acc": 75.0,
           "accuracy_row": [25.0, 75.0, None], "time_s": 1.0}
    v = L.task_values(row, {"avg_acc": 60.0, "forgetting": 5.0}, num_tasks=3)
    assert [v[f"acc_task_{j}"] for j in range(3)] == [25.0, 75.0, None]
    assert v["avg_acc"] == 60.0 and v["forgetting"] == 5.0 and math.isfinite(v["accuracy"])

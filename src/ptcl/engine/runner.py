"""The run driver: config -> scenario -> backbone -> learner -> per-task evaluation -> run folder.

Everything that can fail on user input (config, output folder, cache folder, dataset,
split, backbone, method options against the stream) happens before the run folder is
written. After every finished task the checkpoint, then ``metrics.json`` (with all rows so
far) are written atomically, so a killed run loses nothing that finished and
``run(resume=RUN_DIR)`` continues after the last finished task; the plot
(``accuracy.png``) is drawn once, when the run ends or stops. Tasks are numbered from 0
everywhere (logs, tables, ``metrics.json``, plots).
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError

from ptcl import dist
from ptcl._version import __version__
from ptcl.backbones import build_backbone
from ptcl.backbones.transforms import Augment
from ptcl.config import RunConfig, TrainConfig, build_config, load_file, save_config
from ptcl.data.datasets import load_dataset
from ptcl.data.features import FeatureCache
from ptcl.data.scenario import Scenario
from ptcl.data.server import DataManager
from ptcl.engine.checkpoint import save_checkpoint
from ptcl.engine.evaluate import eval_protocol, predict_seen
from ptcl.engine.resources import TaskMemory
from ptcl.engine.rundir import ResumeError, RunFolder, check_out_dir, stream_identity
from ptcl.errors import ConfigError, PtclError, ResultsWriteError, RunInterrupted, one_line
from ptcl.io import atomic_write_json, atomic_write_text, is_disk_full, remove_stale_tmp
from ptcl.methods.base import LearnerContext
from ptcl.metrics import accuracy, accuracy_row, old_new_accuracy
from ptcl.paths import cache_dir
from ptcl.registry import METHODS
from ptcl.report.loggers import RunLoggers
from ptcl.report.plots import try_plot_run
from ptcl.report.results import summarize, task_table
from ptcl.seeding import isolated_rng, seed_everything, task_seed
from ptcl.train.callbacks import EpochEnd

log = logging.getLogger("ptcl")

__all__ = ["run", "seed_everything"]

FILE_ONLY = {"file_only": True}  # log records for run.log only (the CLI prints them itself)


class _RunLog(logging.FileHandler):
    """``run.log``; a failed write (full disk) is dropped instead of printing a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging API)
        pass


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method.name}_{cfg.dataset.name}_{stamp}"


def resolve_config(config: RunConfig | dict | str | Path | None, overrides: list[str] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return build_config(config.to_dict(), overrides)
        return config
    if isinstance(config, (str, Path)):
        return build_config(load_file(config), overrides)
    return build_config(config or {}, overrides)


def _saved(done: int) -> str:
    """``task 0 is saved`` / ``tasks 0-2 are saved``."""
    return "task 0 is saved" if done == 1 else f"tasks 0-{done - 1} are saved"


@dist.process_group  # torchrun (WORLD_SIZE > 1): the process group lives as long as the run
def run(
    config: RunConfig | dict | str | Path | None = None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
    max_tasks: int | None = None,
    cache: FeatureCache | None = None,
    from_task: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a class-incremental experiment and return its metrics.

    ``config``: a :class:`RunConfig`, a dict, a YAML/JSON path (relative paths inside it
    are relative to the file), or ``None`` (the embedded default). ``overrides``:
    ``key=value`` strings. ``out``: the run folder (default ``runs/<method>_<dataset>_<time>``).
    ``resume``: an interrupted run folder to continue (``out`` must then be ``None``).
    ``max_tasks``: stop (resumably) after this many finished tasks. ``from_task`` (with
    ``resume``): continue after this finished task, whose checkpoint must be kept, dropping
    the records of later tasks (the way out when a later checkpoint is damaged).

    Raises :class:`~ptcl.errors.PtclError` subclasses for anything the user can fix (bad
    config, busy or damaged run folder, changed dataset on resume, diverged training, full
    disk) and :class:`~ptcl.errors.RunInterrupted` on Ctrl-C, each with one-line messages.
    """
    quiet = quiet or not dist.is_main()  # torchrun: rank 0 alone shows progress
    if max_tasks is not None and max_tasks < 1:
        raise ConfigError(f"--max-tasks must be >= 1, got {max_tasks}")
    if from_task is not None and resume is None:
        raise ConfigError("--from-task is for --resume: it names the finished task to continue after")
    if resume is not None:
        if out is not None:
            raise ConfigError("--resume continues RUN_DIR in place; it cannot be combined with --out")
        folder = RunFolder(check_out_dir(resume, "--resume"))
        if not folder.config.is_file():
            raise ConfigError(f"cannot resume: {folder.path} is not a ptcl run folder (no config.yaml)")
        folder.lock()
        try:
            cfg = build_config(folder.read_config_data())
        except ConfigError as e:
            folder.unlock()
            raise ConfigError(f"{folder.config} (of the run to resume): {e}") from None
        except BaseException:
            folder.unlock()
            raise
    else:
        cfg = resolve_config(config, overrides)
        # torchrun: one folder for all ranks (the default one is timestamped on rank 0)
        folder = RunFolder(check_out_dir(out) if out is not None else dist.broadcast_object(default_run_dir(cfg)))
        if folder.config.exists():
            raise ConfigError(
                f"run folder {folder.path} already holds a run; continue it with "
                f"`ptcl run --resume {folder.path}` or choose another --out"
            )
    try:
        return _run(cfg, folder, resume is not None, quiet, max_tasks, cache, from_task)
    finally:
        folder.unlock()


def _run(
    cfg: RunConfig, folder: RunFolder, resuming: bool, quiet: bool, max_tasks: int | None,
    cache: FeatureCache | None, from_task: int | None,
) -> dict[str, Any]:
    # ---- set-up: everything that can fail on bad input, before writing anything
    device = dist.resolve_device(cfg.device)
    cache = cache or FeatureCache(cache_dir("features"))
    for leftovers in (cache.root, cache_dir("extracted")):  # of killed writers (processes gone)
        remove_stale_tmp(leftovers)
    # loading data and weights never shifts the run's random stream; under torchrun rank 0
    # fills the caches (extracted archive, converted weights) before the others read them
    with isolated_rng(), dist.main_first():
        splits = load_dataset(cfg.dataset)
        scenario = Scenario.build(splits.num_classes, cfg.scenario.init_cls, cfg.scenario.increment,
                                  cfg.seed, cfg.scenario.shuffle)
        backbone = build_backbone(cfg.backbone).to(device)
    data = DataManager(
        splits, scenario, {"train": cfg.dataset.train_per_class, "test": cfg.dataset.test_per_class},
        cfg.seed, backbone, cache, device, cfg.eval_batch_size, cfg.num_workers, quiet,
        subset_seed=cfg.dataset.subset_seed, precision=cfg.precision,
    )
    if isinstance(cfg.method, TrainConfig):
        m = cfg.method
        data.augment = Augment(m.augment, (m.crop_scale[0], m.crop_scale[1]), m.brightness, m.interpolation)
    seed_everything(cfg.seed)
    ctx = LearnerContext(data=data, scenario=scenario, device=device, seed=cfg.seed, quiet=quiet,
                         class_names=scenario.by_label(splits.class_names), precision=cfg.precision)
    learner = METHODS.get(cfg.method.name)(cfg.method, backbone, ctx).to(device)
    stream = stream_identity(splits, scenario, data.index)
    memory = TaskMemory(device)
    header = {
        "ptcl_version": __version__,
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "class_order": scenario.order,
        "class_names": scenario.by_label(splits.class_names),  # as the learner sees them
        "class_folders": [splits.train.classes[c] for c in scenario.order],
        "task_sizes": scenario.sizes,
        "num_tasks": scenario.num_tasks,
        "train_samples": int(len(data.index["train"])),
        "test_samples": int(len(data.index["test"])),
        "dataset_fingerprint": stream["dataset_fingerprint"],
        "device": str(device),
        "precision": cfg.precision,  # of the training steps and image-input evaluation (ptcl.precision)
        **({"world_size": dist.world_size()} if dist.world_size() > 1 else {}),  # torchrun ranks (rank 0's device)
        "peak_memory_kind": memory.kind(),
        "eval_protocol": eval_protocol(learner),  # per_image, or how test batches leak task identity
    }
    rows: list[dict] = []
    created = False
    if resuming:
        folder.check_stream(stream)
        rows = folder.rows_to_resume(folder.read_rows([t.end for t in scenario.tasks]), from_task)
    elif dist.is_main():  # torchrun: rank 0 alone writes the run folder
        created = not folder.path.exists()
        folder.lock()
        if folder.config.exists():  # another process finished a run here meanwhile
            raise ConfigError(f"run folder {folder.path} already holds a run; choose another --out")
        try:
            atomic_write_text(folder.config, save_config(cfg))
            folder.write_stream(stream)
        except OSError as e:
            if created:
                shutil.rmtree(folder.path, ignore_errors=True)
            raise ResultsWriteError(f"cannot write the run folder {folder.path}: {e}") from None

    # ---- the run
    handler = _RunLog(folder.path / "run.log") if dist.is_main() else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    start = len(rows)
    log.info("run folder %s; %s on %s with %s; task sizes %s (tasks 0-%d)%s", folder.path,
             cfg.method.name, cfg.dataset.name, cfg.backbone.name, scenario.sizes,
             scenario.num_tasks - 1, f"; resuming after task {start - 1}" if start else "")
    metrics = summarize(header, rows)
    task_index = start
    loggers = RunLoggers(cfg.loggers, folder.path / "logs", scenario.num_tasks, start)  # rank 0 only
    if loggers.loggers:
        ctx.callbacks.append(EpochEnd(lambda s, lr, sec: loggers.epoch(s.desc, s.epoch + 1, s.epochs,
                                                                       s.epoch_loss, lr, sec)))
    try:
        for task in scenario.tasks:
            task_index = task.index
            seed_everything(task_seed(cfg.seed, task.index))
            learner.before_task(task)
            if task.index < start:
                if task.index == start - 1:
                    folder.load_checkpoint(task.index, learner, cfg.method.name)
                continue
            if max_tasks is not None and len(rows) >= max_tasks:
                break
            loggers.start_task(task.index)
            rows.append(_train_and_evaluate(learner, task, scenario, data, memory, cfg))
            header["peak_memory_kind"] = memory.kind()  # known once a task has measured it
            metrics = summarize(header, rows)
            if dist.is_main():
                _save_task(folder, task.index, learner, cfg, metrics)
            loggers.task_done(rows[-1], metrics)
            r = rows[-1]
            log.info("task %d done (tasks 0-%d): %d classes seen, accuracy %.2f%% (%.1f s)",
                     task.index, scenario.num_tasks - 1, task.end, r["accuracy"], r["time_s"])
    except BaseException as e:
        loggers.close()
        log.removeHandler(handler)
        handler.close()
        if isinstance(e, ResumeError):  # raised before anything was written: says it all
            raise
        kept = _saved_rows(folder)
        if kept and dist.is_main():  # the plot of the saved tasks (drawn once, not per task)
            try_plot_run(folder.metrics, folder.path / "accuracy.png")
        removed = kept == 0 and not resuming
        if removed and dist.is_main():  # nothing finished: leave no half-written folder
            _remove_run_files(folder, created)
        where = (f"nothing had finished, so the run folder {folder.path} was removed" if removed and created
                 else f"nothing had finished, so the run's files in {folder.path} were removed" if removed
                 else f"{_saved(kept)} in {folder.path}" if kept
                 else f"no task is saved in {folder.path}")
        resume_hint = "" if removed else f"; continue with `ptcl run --resume {folder.path}`"
        when = f"after task {kept - 1}" if kept > task_index else f"during task {task_index}"
        e = dist.collective_failure(e) or e  # torchrun: another rank died, was killed or timed out
        if isinstance(e, KeyboardInterrupt):
            how = "stopped by SIGTERM (torchrun stops all ranks when one fails)" if isinstance(
                e, dist.Terminated) else "interrupted"
            raise RunInterrupted(f"{how} {when}; {where}{resume_hint}") from None
        if isinstance(e, ResultsWriteError):
            raise ResultsWriteError(f"{e}; {where}; free space (or fix the folder){resume_hint}") from None
        if isinstance(e, PtclError):
            hint = resume_hint if isinstance(e, dist.DistributedError) else ""
            raise type(e)(f"task {task_index}: {one_line(e)}; {where}{hint}") from None
        raise
    loggers.close()
    if rows and dist.is_main():
        try_plot_run(metrics, folder.path / "accuracy.png")
    log.info("results:\n%s", task_table(metrics), extra=FILE_ONLY)
    log.removeHandler(handler)
    handler.close()
    return {**metrics, "run_dir": str(folder.path)}


def _train_and_evaluate(learner, task, scenario, data, memory: TaskMemory, cfg: RunConfig) -> dict:
    t0, f0 = time.perf_counter(), data.cache.compute_s
    memory.start()
    log.info("task %d: training on classes %d-%d", task.index, task.start, task.end - 1)
    learner.train_task(task)
    learner.after_task(task)
    e0 = time.perf_counter()
    variants: dict[str, np.ndarray] = {}
    pred, y = predict_seen(learner, task, cfg.eval_batch_size, variants)
    eval_s = time.perf_counter() - e0
    old, new = old_new_accuracy(pred, y, task.start)
    bounds = [0] + [t.end for t in scenario.tasks[: task.index + 1]]
    extra = {}
    if variants:  # the learner's other classifiers (iCaRL's CNN beside its NME)
        extra["variants"] = {k: _accuracies(p, y, task, bounds, scenario.num_tasks) for k, p in variants.items()}
    return {
        "task": task.index,
        "seen_classes": task.end,
        "accuracy": accuracy(pred, y),
        "accuracy_row": accuracy_row(pred, y, bounds, scenario.num_tasks),
        "old_acc": old,
        "new_acc": new,
        "time_s": time.perf_counter() - t0,
        "feature_time_s": data.cache.compute_s - f0,
        "peak_memory_mb": memory.peak_mb(),
        "eval_s": eval_s,
        "inference": {**learner.inference_cost(), "test_images": len(y)},
        **extra,
    }


def _accuracies(pred: np.ndarray, y: np.ndarray, task, bounds: list[int], num_tasks: int) -> dict:
    old, new = old_new_accuracy(pred, y, task.start)
    return {"accuracy": accuracy(pred, y), "accuracy_row": accuracy_row(pred, y, bounds, num_tasks),
            "old_acc": old, "new_acc": new}


def _save_task(folder: RunFolder, index: int, learner, cfg: RunConfig, metrics: dict) -> None:
    """Checkpoint, then metrics; a write failure becomes one line. (The plot is drawn once,
    when the run ends or stops.)"""
    with isolated_rng():
        try:
            save_checkpoint(folder.path, index, learner, {"method": cfg.method.name})
            atomic_write_json(folder.metrics, metrics)
            if not cfg.keep_all_checkpoints:  # only after metrics.json
                for t in range(index):
                    folder.checkpoint(t).unlink(missing_ok=True)
        except (OSError, SafetensorError) as e:
            what = "the disk is full" if is_disk_full(e) else str(e)
            raise ResultsWriteError(f"cannot write the results of task {index} into {folder.path}: {what}") from None


def _remove_run_files(folder: RunFolder, created: bool) -> None:
    """Remove a run that finished no task: the whole folder if this run created it, else
    only the files it wrote (the folder may hold the user's other files)."""
    if created:
        shutil.rmtree(folder.path, ignore_errors=True)
        return
    for name in ("config.yaml", "stream.json", "metrics.json", "run.log", "accuracy.png", ".lock"):
        (folder.path / name).unlink(missing_ok=True)
    shutil.rmtree(folder.path / "checkpoints", ignore_errors=True)
    shutil.rmtree(folder.path / "logs", ignore_errors=True)


def _saved_rows(folder: RunFolder) -> int:
    """How many finished tasks ``metrics.json`` holds with their checkpoint on disk."""
    import json

    try:
        rows = json.loads(folder.metrics.read_text()).get("rows", [])
    except (OSError, ValueError, AttributeError):
        return 0
    n = len(rows)
    while n and not folder.checkpoint(n - 1).is_file():
        n -= 1
    return n

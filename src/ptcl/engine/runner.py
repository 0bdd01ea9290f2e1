"""The run driver: config -> scenario -> backbone -> learner -> per-task evaluation -> run folder.

Everything that can fail on user input (config, dataset, split, backbone) happens before
the run folder is written. After every finished task the checkpoint, then ``metrics.json``
(with all rows so far) and the plot are written atomically, so a killed run loses nothing
that finished and ``run(resume=RUN_DIR)`` continues after the last finished task.
"""

from __future__ import annotations

import logging
import random
import resource
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptcl import __version__
from ptcl.backbones import build_backbone
from ptcl.config import RunConfig, build_config, load_file, save_config
from ptcl.data.datasets import load_dataset
from ptcl.data.features import FeatureCache
from ptcl.data.scenario import Scenario
from ptcl.engine import dist
from ptcl.engine.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from ptcl.engine.data import DataManager
from ptcl.engine.evaluate import predict_seen
from ptcl.errors import ConfigError
from ptcl.io import atomic_write_json, atomic_write_text
from ptcl.methods.base import LearnerContext
from ptcl.metrics import accuracy, accuracy_row, old_new_accuracy
from ptcl.registry import METHODS
from ptcl.report.plots import plot_run
from ptcl.report.results import read_metrics, summarize, task_table

log = logging.getLogger("ptcl")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


def run(
    config: RunConfig | dict | str | Path | None = None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
    max_tasks: int | None = None,
    cache: FeatureCache | None = None,
) -> dict[str, Any]:
    """Run (or resume) a class-incremental experiment and return its metrics.

    ``config``: a :class:`RunConfig`, a dict, a YAML/JSON path, or ``None`` (the embedded
    default). ``overrides``: ``key=value`` strings. ``out``: the run folder (default
    ``runs/<method>_<dataset>_<time>``). ``resume``: an interrupted run folder to continue.
    ``max_tasks``: stop (resumably) after this many finished tasks.
    """
    rows: list[dict] = []
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"cannot resume: {run_dir} is not a ptcl run folder (no config.yaml)")
        cfg = build_config(load_file(run_dir / "config.yaml"))
        if (run_dir / "metrics.json").is_file():
            rows = read_metrics(run_dir)["rows"]
        while rows and not checkpoint_path(run_dir, len(rows) - 1).is_file():
            rows.pop()  # a row is only kept with its checkpoint
    else:
        cfg = resolve_config(config, overrides)
        run_dir = Path(out) if out is not None else default_run_dir(cfg)
        if (run_dir / "config.yaml").exists():
            raise ConfigError(
                f"run folder {run_dir} already holds a run; continue it with "
                f"`ptcl run --resume {run_dir}` or choose another --out"
            )

    # ---- set-up: everything that can fail on bad input, before writing anything
    seed_everything(cfg.seed)
    device = dist.resolve_device(cfg.device)
    splits = load_dataset(cfg.dataset)
    scenario = Scenario.build(splits.num_classes, cfg.scenario.init_cls, cfg.scenario.increment,
                              cfg.seed, cfg.scenario.shuffle)
    backbone = build_backbone(cfg.backbone).to(device)
    data = DataManager(
        splits, scenario, {"train": cfg.dataset.train_per_class, "test": cfg.dataset.test_per_class},
        cfg.seed, backbone, cache or FeatureCache(), device, cfg.eval_batch_size, cfg.num_workers, quiet,
    )
    ctx = LearnerContext(data=data, scenario=scenario, device=device, seed=cfg.seed, quiet=quiet)
    learner = METHODS.get(cfg.method.name)(cfg.method, backbone, ctx).to(device)
    header = {
        "ptcl_version": __version__,
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "class_order": scenario.order,
        "class_names": [splits.train.classes[c] for c in scenario.order],
        "task_sizes": scenario.sizes,
        "num_tasks": scenario.num_tasks,
        "train_samples": int(len(data.index["train"])),
        "test_samples": int(len(data.index["test"])),
        "device": str(device),
    }

    # ---- the run folder
    main = dist.is_main()
    created = not run_dir.exists()
    handler = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", save_config(cfg))
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    start = len(rows)
    log.info("run folder %s; %s on %s with %s; tasks %s%s", run_dir, cfg.method.name,
             cfg.dataset.name, cfg.backbone.name, scenario.sizes,
             f"; resuming after task {start - 1}" if start else "")
    metrics = summarize(header, rows)
    try:
        for task in scenario.tasks:
            seed_everything(cfg.seed + task.index)
            learner.before_task(task)
            if task.index < start:
                if task.index == start - 1:
                    load_checkpoint(run_dir, task.index, learner)
                continue
            if max_tasks is not None and len(rows) >= max_tasks:
                break
            t0, f0 = time.perf_counter(), data.cache.compute_s
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            learner.train_task(task)
            learner.after_task(task)
            pred, y = predict_seen(learner, task, cfg.eval_batch_size)
            old, new = old_new_accuracy(pred, y, task.start)
            bounds = [0] + [t.end for t in scenario.tasks[: task.index + 1]]
            rows.append({
                "task": task.index,
                "seen_classes": task.end,
                "accuracy": accuracy(pred, y),
                "accuracy_row": accuracy_row(pred, y, bounds, scenario.num_tasks),
                "old_acc": old,
                "new_acc": new,
                "time_s": time.perf_counter() - t0,
                "feature_time_s": data.cache.compute_s - f0,
                "peak_memory_mb": peak_memory_mb(device),
            })
            metrics = summarize(header, rows)
            if main:
                save_checkpoint(run_dir, task.index, learner, {"method": cfg.method.name})
                atomic_write_json(run_dir / "metrics.json", metrics)
                plot_run(metrics, run_dir / "accuracy.png")
                if not cfg.keep_all_checkpoints and task.index > 0:  # only after metrics.json
                    checkpoint_path(run_dir, task.index - 1).unlink(missing_ok=True)
            log.info("task %d/%d: %d classes, accuracy %.2f%% (%.1fs)", task.index + 1,
                     scenario.num_tasks, task.end, rows[-1]["accuracy"], rows[-1]["time_s"])
    except BaseException:
        if main and created and not rows and run_dir.exists():
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
                handler = None
            shutil.rmtree(run_dir)  # nothing finished: leave no half-written folder
        raise
    finally:
        if handler is not None:
            log.info("results:\n%s", task_table(metrics))
            log.removeHandler(handler)
            handler.close()
    return {**metrics, "run_dir": str(run_dir)}

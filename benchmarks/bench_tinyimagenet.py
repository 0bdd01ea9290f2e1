"""Tiny-ImageNet-200 class-incremental protocols for the methods that run on cached frozen
features, on one backbone (default EfficientNet-Lite0, ImageNet-1k supervised).

Protocols (the field's Tiny-ImageNet settings, class order from seed 1993):

- ``b0inc20``: 20 classes per task, 10 tasks;
- ``b0inc10``: 10 classes per task, 20 tasks;
- ``b100inc10``: 100 classes first, then 10 tasks of 10 (11 tasks).

Every run shares one feature cache. The one-off feature pass (the backbone over every train
and val image, with the cache cold) is done by a first run (``--feature-pass-method``,
default simplecil, on the first protocol) and printed on its own line: its backbone seconds, images and images per second,
and that run's wall time. All table rows then run warm: their ``backbone_s`` is the
backbone time they add (0.0 when every feature comes from the cache), and ``wall_s`` is the
whole ``ptcl.engine.runner.run`` call (loading the dataset index, the method, evaluation
after every task, writing the run folder).

A method is ``NAME`` or ``NAME:key=value`` (``method.`` keys, as in ``bench_methods.py``).
``aper:tuning=none`` is SimpleCIL itself (APER without its first-session tuning) and is
not run twice by default.

    python benchmarks/bench_tinyimagenet.py \\
        [--archive ../shared/data/tiny-imagenet-200-sub100.tar.gz] [--backbone efficientnet_lite0] \\
        [--image-size N] [--methods simplecil fecam ranpac:tuning=none] \\
        [--protocols b0inc20 b0inc10 b100inc10] [--cache DIR] [--rows rows.jsonl] [--keep-runs DIR]

``--rows`` appends every finished row to a JSON-lines file (a long comparison survives an
interruption, and can be split over several invocations sharing ``--cache``); ``--table``
only prints the table of that file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from bench_methods import method_overrides

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared/data/tiny-imagenet-200-sub100.tar.gz"
PROTOCOLS: dict[str, tuple[int, int]] = {"b0inc20": (20, 20), "b0inc10": (10, 10), "b100inc10": (100, 10)}
"""Protocol name -> (init_cls, increment)."""
FROZEN_METHODS = ["simplecil", "fecam", "ranpac:tuning=none"]


def cpu_name() -> str:
    """The processor model from /proc/cpuinfo (else platform's), and the core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def base_overrides(args: argparse.Namespace, protocol: str) -> list[str]:
    init, inc = PROTOCOLS[protocol]
    over = [
        f"backbone.name={args.backbone}", "dataset.name=tinyimagenet", f"dataset.root={args.archive}",
        f"scenario.init_cls={init}", f"scenario.increment={inc}", "seed=1993", *args.set,
    ]
    if args.image_size:
        over.append(f"backbone.image_size={args.image_size}")
    if args.train_per_class:
        over.append(f"dataset.train_per_class={args.train_per_class}")
    if args.test_per_class:
        over.append(f"dataset.test_per_class={args.test_per_class}")
    return over


def timed_run(over: list[str], out: Path, cache) -> tuple[dict, float]:
    from ptcl.engine.runner import run

    t0 = time.perf_counter()
    m = run(None, over, out=out, quiet=True, cache=cache)
    return m, time.perf_counter() - t0


def print_table(rows: list[dict]) -> None:
    head = (f"{'protocol':<10} {'method':<20} {'tasks':>5} {'avg':>6} {'last':>6} {'forget':>6} "
            f"{'wall_s':>7} {'backbone_s':>10} {'peak_MiB':>8}")
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for r in rows:
        f = "-" if r["forgetting"] is None else f"{r['forgetting']:.2f}"
        print(  # noqa: T201
            f"{r['protocol']:<10} {r['method']:<20} {r['tasks']:>5} {r['avg']:6.2f} {r['last']:6.2f} {f:>6} "
            f"{r['wall_s']:7.1f} {r['backbone_s']:10.1f} {r['peak_mb']:8.0f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", default=str(ARCHIVE), help="Tiny-ImageNet folder, .zip or .tar.gz")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=None, help="backbone.image_size (default: the backbone's)")
    ap.add_argument("--methods", nargs="*", default=FROZEN_METHODS)
    ap.add_argument("--feature-pass-method", default="simplecil",
                    help="the method of the first run, which fills the cache (cheapest: simplecil)")
    ap.add_argument("--protocols", nargs="*", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--train-per-class", type=int, default=None, help="default: all")
    ap.add_argument("--test-per-class", type=int, default=None, help="default: all")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    ap.add_argument("--cache", type=Path, default=None,
                    help="PTCL_CACHE_DIR for the runs (features, extracted archive); default a fresh "
                         "temporary folder, so the feature pass is cold")
    ap.add_argument("--rows", type=Path, default=None, help="JSON-lines file the rows are appended to")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep each run folder under this folder")
    ap.add_argument("--table", action="store_true", help="only print the table of --rows")
    args = ap.parse_args()
    if args.table:
        if args.rows is None or not args.rows.is_file():
            raise SystemExit("--table needs an existing --rows file")
        print_table([json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()])
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    logging.getLogger("ptcl").setLevel(logging.INFO)  # each run's run.log is complete

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PTCL_CACHE_DIR"] = str(args.cache or Path(tmp) / "cache")
        from ptcl.data.features import FeatureCache
        from ptcl.paths import cache_dir

        runs = args.keep_runs or Path(tmp) / "runs"
        cache = FeatureCache(cache_dir("features"))
        was_empty = not any(cache.root.glob("*.safetensors"))

        # dataset load (extracts the archive once, unless the cache holds it already)
        from ptcl.config import DatasetConfig
        from ptcl.data.datasets import load_dataset

        t0 = time.perf_counter()
        splits = load_dataset(DatasetConfig(name="tinyimagenet", root=args.archive))
        load_s = time.perf_counter() - t0
        n_train, n_test = len(splits.train), len(splits.test)

        # the one-off feature pass: a run of --feature-pass-method on the first protocol
        first_p, first_m = args.protocols[0], args.feature_pass_method
        over = [*method_overrides(first_m), *base_overrides(args, first_p)]
        m, wall = timed_run(over, runs / f"feature_pass_{first_p}_{first_m}".replace(":", "_"), cache)
        feat_s = m["feature_time_s"]
        images = m["train_samples"] + m["test_samples"]
        state = "cold" if was_empty and cache.misses else "NOT cold (the cache held features already)"
        feature_line = (
            f"feature pass ({state}): {images} images ({m['train_samples']} train + {m['test_samples']} val) "
            f"through {args.backbone} at {args.image_size or 'its default'} px: backbone {feat_s:.1f} s "
            f"({images / feat_s if feat_s else float('nan'):.1f} img/s); the whole first run "
            f"({first_m}, {first_p}) {wall:.1f} s"
        )
        print(feature_line, flush=True)  # noqa: T201

        rows: list[dict] = []
        for spec in args.methods:  # method by method: a slow method last keeps the others' rows
            for p in args.protocols:
                over = [*method_overrides(spec), *base_overrides(args, p)]
                out = runs / f"{p}_{spec}".replace(":", "_").replace("=", "-")
                m, wall = timed_run(over, out, cache)
                row = {
                    "protocol": p, "method": spec, "tasks": m["num_tasks"], "avg": m["avg_acc"],
                    "last": m["last_acc"], "forgetting": m["forgetting"], "wall_s": wall,
                    "run_total_s": m["total_time_s"], "backbone_s": m["feature_time_s"],
                    "peak_mb": m["peak_memory_mb"], "acc": m["accuracy_per_task"],
                    "backbone": args.backbone, "image_size": args.image_size,
                }
                rows.append(row)
                print(f"done {p} {spec}: avg {row['avg']:.2f} last {row['last']:.2f} "  # noqa: T201
                      f"wall {wall:.1f} s", flush=True)
                if args.rows is not None:
                    with args.rows.open("a") as f:
                        f.write(json.dumps(row) + "\n")

    print()  # noqa: T201
    print(f"Tiny-ImageNet-200 ({n_train} train / {n_test} val images, 200 classes; dataset load "  # noqa: T201
          f"{load_s:.1f} s), backbone {args.backbone}, image size {args.image_size or 'default'}, "
          f"seed 1993; CPU: {cpu_name()}, torch threads {__import__('torch').get_num_threads()}")
    print(feature_line)  # noqa: T201
    print_table(rows)


if __name__ == "__main__":
    main()

"""The input pipeline before and after issue 14, on the same work in one invocation.

* **before**: ``num_workers=0`` and the per-image float transform (``ToTensor`` +
  ``Normalize`` in the main process, ``DataManager.on_device = False``), as ptcl ran before;
* **after**: the defaults: ``num_workers=auto`` (:func:`ptcl.data.loading.resolve_num_workers`)
  decoding and resizing in loader workers into uint8 tensors, normalised on the device in
  whole batches (:class:`ptcl.data.loading.DeviceLoader`).

Two runs on the CIFAR-10 archive (extracted once before the timings):

1. **frozen, cold**: simplecil with an empty feature cache (one pass of the backbone over
   the train and test images), ``--frozen-backbone`` (EfficientNet-Lite0 at 112 px);
2. **trained**: ranpac with adapter tuning (``--train-epochs`` epoch on the first task), then
   its statistics of the tuned features, ``--train-backbone`` (DINOv2 ViT-S/14 at 112 px), the
   first ``--train-tasks`` tasks, cold cache too.

The four (run, pipeline) pairs are timed ``--reps`` times, interleaved (A B C D A B C D ...), so
that the load of the (shared) machine affects both pipelines alike; the table gives medians.
Columns: the wall time of ``ptcl.engine.runner.run``, and from ``run.log`` the seconds the
train loop, feature extraction and evaluation waited for batches (``data wait``) vs the rest
of their time (``compute``), summed over the tasks; ``wait %`` = wait / (wait + compute).
The bit-identity of the two pipelines is tested (``tests/test_loader_workers.py``); here
the accuracies are printed as a check.

    python benchmarks/bench_input_pipeline.py [--archive ../shared/data/cifar10-jpg.tar.gz] [--reps 3]
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_input_pipeline")
TOTAL = re.compile(r"task \d+ input pipeline: data wait (\d+\.\d+) s \(\d+%\), compute (\d+\.\d+) s")


def settings(args) -> dict[str, list[str]]:
    data = ["dataset.name=imagefolder", f"dataset.root={args.archive}", "seed=1993", "eval_batch_size=64"]
    fb, fs = args.frozen_backbone.split("@")
    tb, ts = args.train_backbone.split("@")
    return {
        "simplecil (cold)": [
            "method.name=simplecil", f"backbone.name={fb}", f"backbone.image_size={fs}", *data,
            f"dataset.train_per_class={args.frozen_per_class[0]}", f"dataset.test_per_class={args.frozen_per_class[1]}",
            "scenario.init_cls=2", "scenario.increment=2"],
        f"ranpac adapter, {args.train_epochs} ep": [
            "method.name=ranpac", "method.tuning=adapter", f"method.epochs={args.train_epochs}",
            f"backbone.name={tb}", f"backbone.image_size={ts}", *data,
            f"dataset.train_per_class={args.train_per_class[0]}", f"dataset.test_per_class={args.train_per_class[1]}",
            "scenario.init_cls=4", "scenario.increment=2"],
    }


def one_run(over: list[str], before: bool, max_tasks: int | None) -> dict:
    from ptcl.data.features import FeatureCache
    from ptcl.data.server import DataManager
    from ptcl.engine.runner import run

    DataManager.on_device = not before
    extra = ["num_workers=0"] if before else []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            m = run(None, [*over, *extra], out=Path(tmp) / "run", quiet=True, cache=FeatureCache(Path(tmp) / "fc"),
                    max_tasks=max_tasks)
            wall = time.perf_counter() - t0
            text = (Path(tmp) / "run" / "run.log").read_text()
    finally:
        DataManager.on_device = True
    split = [(float(a), float(b)) for a, b in TOTAL.findall(text)]
    workers = sorted({int(w) for w in re.findall(r"(\d+) workers", text)})
    return {"wall": wall, "wait": sum(a for a, _ in split), "compute": sum(b for _, b in split),
            "last": m["accuracy_per_task"][-1], "workers": workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", default=str(REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--frozen-backbone", default="efficientnet_lite0@112")
    ap.add_argument("--frozen-per-class", type=int, nargs=2, default=[60, 30], metavar=("TRAIN", "TEST"))
    ap.add_argument("--train-backbone", default="dinov2_vits14_imgfocus@112")
    ap.add_argument("--train-per-class", type=int, nargs=2, default=[70, 20], metavar=("TRAIN", "TEST"))
    ap.add_argument("--train-epochs", type=int, default=1)
    ap.add_argument("--train-tasks", type=int, default=2, help="tasks of the trained run (max_tasks)")
    args = ap.parse_args()
    logging.getLogger("ptcl").setLevel(logging.INFO)  # run.log gets the data wait / compute lines
    logging.getLogger("ptcl").propagate = False  # ... and nothing reaches the terminal
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # one progress line per run

    from ptcl.backbones import build_backbone
    from ptcl.config import build_config
    from ptcl.data.datasets import load_dataset
    from ptcl.data.loading import resolve_num_workers, usable_cores

    runs = settings(args)
    t0 = time.perf_counter()
    for over in runs.values():  # one-off: archive extraction, weight conversion (outside the timings)
        cfg = build_config(None, over)
        load_dataset(cfg.dataset)
        build_backbone(cfg.backbone)
    one_off = time.perf_counter() - t0
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.reps):  # interleaved: every (run, pipeline) once per round
        for name, over in runs.items():
            for pipe in ("before", "after"):
                trained = name.startswith("ranpac")
                r = one_run(over, pipe == "before", args.train_tasks if trained else None)
                results.setdefault((name, pipe), []).append(r)
                log.info("%s, %s: wall %.1f s, data wait %.1f s, compute %.1f s", name, pipe,
                         r["wall"], r["wait"], r["compute"])

    print(f"{usable_cores()} usable cores, num_workers=auto -> {resolve_num_workers('auto')}; "  # noqa: T201
          f"medians of {args.reps} interleaved rounds; one-off extraction/weights before: {one_off:.1f} s")
    head = (f"{'run':<24} {'pipeline':<34} {'wall s':>7} {'wait s':>7} {'compute s':>9} {'wait %':>6} "
            f"{'last acc':>8}  walls")
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for (name, pipe), rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "wait", "compute")}
        share = 100 * med["wait"] / max(med["wait"] + med["compute"], 1e-9)
        workers = sorted({w for r in rs for w in r["workers"]})
        label = ("num_workers=0, ToTensor+Normalize/img" if pipe == "before"
                 else f"workers {'/'.join(map(str, workers))}, uint8 + device norm")
        accs = "/".join(f"{a:.2f}" for a in sorted({r["last"] for r in rs}))
        walls = " ".join(f"{r['wall']:.1f}" for r in rs)
        print(f"{name:<24} {label:<34} {med['wall']:7.1f} {med['wait']:7.1f} {med['compute']:9.1f} {share:6.0f} "  # noqa: T201
              f"{accs:>8}  {walls}")
    for name in runs:
        b, a = (statistics.median(r["wall"] for r in results[(name, p)]) for p in ("before", "after"))
        print(f"{name}: after / before wall time = {a / b:.2f}")  # noqa: T201
    print(f"trained run: {args.train_tasks} tasks")  # noqa: T201


if __name__ == "__main__":
    main()

"""Inference cost against the number of tasks: a merged model against an ensemble.

Runs each method on a stream of many small tasks (default: CIFAR-10 from ``../shared/data``,
one class per task, so 10 tasks) and prints, after every task, what ``metrics.json`` records
(``inference_per_task``, :meth:`ptcl.methods.base.Learner.inference_cost`): tuning states
(experts) run per image, full backbone passes per image, parameters; and the measured
evaluation time per test image (``rows[i].eval_s / test_images``, milliseconds; for a method
whose ``predict`` takes cached features the backbone passes are spent in feature extraction,
partly inside the evaluation, so no time is printed: ``-``). A merged model (CoFiMA) should stay flat apart from its growing
head; an ensemble (ESN's per-task heads, EASE's and MOS's per-task adapter sets) grows
linearly.

    python benchmarks/bench_inference_cost.py --methods cofima esn lae \\
        [--backbone dinov2_vits14_imgfocus --image-size 112] [--train-per-class 20] \\
        [--test-per-class 50] [--increment 1] [--epochs 1] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--backbone", default="dinov2_vits14_imgfocus")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpg.tar.gz"))
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--init-cls", type=int, default=1)
    ap.add_argument("--increment", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every method")
    ap.add_argument("--cache", type=Path, default=None, help="feature/weights cache (default: ptcl's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.cache:
        os.environ["PTCL_CACHE_DIR"] = str(args.cache)
    from ptcl.engine.runner import run
    from ptcl.methods.base import FEATURES
    from ptcl.registry import METHODS

    print(f"backbone={args.backbone} size={args.image_size} tasks={args.init_cls}+{args.increment}.. "  # noqa: T201
          f"train/test per class={args.train_per_class}/{args.test_per_class} epochs={args.epochs}")
    head = f"{'method':<12} {'task':>4} {'classes':>7} {'experts':>7} {'passes':>6} {'params_M':>9} {'ms/img':>8}"
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for name in args.methods:
        over = [
            f"method.name={name}", f"backbone.name={args.backbone}", f"backbone.image_size={args.image_size}",
            "dataset.name=imagefolder", f"dataset.root={args.archive}",
            f"dataset.train_per_class={args.train_per_class}", f"dataset.test_per_class={args.test_per_class}",
            f"scenario.init_cls={args.init_cls}", f"scenario.increment={args.increment}", "seed=1993", *args.set,
        ]
        if "epochs" in METHODS.get(name).config_cls.__dataclass_fields__:
            over.append(f"method.epochs={args.epochs}")
        with tempfile.TemporaryDirectory() as tmp:
            m = run(None, over, out=Path(tmp) / "run", quiet=True)
        timed = METHODS.get(name).inputs is not FEATURES
        for row, cost in zip(m["rows"], m["inference_per_task"]):
            ms = f"{1000 * row['eval_s'] / cost['test_images']:8.2f}" if timed else f"{'-':>8}"
            print(  # noqa: T201
                f"{name:<12} {row['task']:>4} {row['seen_classes']:>7} {cost['experts_run']:>7} "
                f"{cost['backbone_passes']:>6} {cost['parameters'] / 1e6:9.3f} {ms}"
            )


if __name__ == "__main__":
    main()

"""Wall time of each method on the offline CIFAR-10 setting, split into backbone passes
(feature extraction that fills the cache, including adapted features) and the rest
(training, statistics, classifiers, evaluation).

Every method runs with a cold feature cache, so its backbone passes are counted.

    python benchmarks/bench_methods.py --methods simplecil ranpac fecam \\
        [--backbone efficientnet_lite0] [--image-size 224] [--init-cls 2 --increment 2] \\
        [--epochs 3] [--set method.tuning=none]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpg.tar.gz"))
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--init-cls", type=int, default=2)
    ap.add_argument("--increment", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="method.epochs for trainable methods")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every method")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from ptcl.engine.runner import run
    from ptcl.registry import METHODS

    base = [
        f"backbone.name={args.backbone}", "dataset.name=imagefolder", f"dataset.root={args.archive}",
        f"dataset.train_per_class={args.train_per_class}", f"dataset.test_per_class={args.test_per_class}",
        f"scenario.init_cls={args.init_cls}", f"scenario.increment={args.increment}", "seed=1993",
        *args.set,
    ] + ([f"backbone.image_size={args.image_size}"] if args.image_size else [])
    rows = []
    for name in args.methods:
        over = [f"method.name={name}", *base]
        if args.epochs is not None and "epochs" in METHODS.get(name).config_cls.__dataclass_fields__:
            over.append(f"method.epochs={args.epochs}")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["PTCL_CACHE_DIR"] = tmp  # cold cache: every backbone pass is counted
            m = run(None, over, out=Path(tmp) / "run", quiet=True)
        total, feat = m["total_time_s"], m["feature_time_s"]
        rows.append((name, m["avg_acc"], m["last_acc"], total, feat, total - feat))
    head = f"{'method':<14} {'avg':>6} {'last':>6} {'total_s':>8} {'backbone_s':>10} {'rest_s':>8}"
    print(f"backbone={args.backbone} size={args.image_size or 'default'} tasks={args.init_cls}+{args.increment}.. "  # noqa: T201
          f"epochs={args.epochs} extra={args.set}")
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for r in rows:
        print(f"{r[0]:<14} {r[1]:6.2f} {r[2]:6.2f} {r[3]:8.1f} {r[4]:10.1f} {r[5]:8.1f}")  # noqa: T201


if __name__ == "__main__":
    main()

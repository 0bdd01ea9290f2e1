"""Foundation benchmark: SimpleCIL on the offline CIFAR-10 setting, run twice.

Prints backbone images/s, the time of a first run (cold feature cache), of a second run
(cache hit), and the first run's time divided by the floor: one plain forward pass of the
backbone over all selected train+test images, already decoded and transformed in memory.

    python benchmarks/bench_foundation.py [--archive ../shared/data/cifar10-jpg.tar.gz]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def overrides(archive: str, per_class: tuple[int, int], size: int | None) -> list[str]:
    o = [
        "method.name=simplecil", "backbone.name=efficientnet_lite0", "dataset.name=imagefolder",
        f"dataset.root={archive}", f"dataset.train_per_class={per_class[0]}",
        f"dataset.test_per_class={per_class[1]}", "scenario.init_cls=2", "scenario.increment=2", "seed=1993",
    ]
    return o + ([f"backbone.image_size={size}"] if size else [])


def floor_seconds(over: list[str], batch: int) -> tuple[float, int]:
    """One plain forward pass over all selected images, pre-decoded in memory."""
    from ptcl.backbones import build_backbone
    from ptcl.config import build_config
    from ptcl.data.datasets import load_dataset
    from ptcl.data.scenario import subset_per_class

    cfg = build_config(None, over)
    splits = load_dataset(cfg.dataset)
    bb = build_backbone(cfg.backbone)
    tf = bb.transform(train=False)
    xs = []
    for split, n in (("train", cfg.dataset.train_per_class), ("test", cfg.dataset.test_per_class)):
        s = getattr(splits, split)
        xs += [tf(s.load(int(i))) for i in subset_per_class(s.targets, n, cfg.seed)]
    x = torch.stack(xs)
    with torch.inference_mode():
        bb(x[:8])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            bb(x[i : i + batch])
        return time.perf_counter() - t0, len(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpg.tar.gz"))
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from ptcl.config import DatasetConfig
    from ptcl.data.datasets import load_dataset
    from ptcl.engine.runner import run

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PTCL_CACHE_DIR"] = tmp
        over = overrides(args.archive, (args.train_per_class, args.test_per_class), args.image_size)
        t0 = time.perf_counter()
        load_dataset(DatasetConfig(name="imagefolder", root=args.archive))  # one-off archive extraction
        t_extract = time.perf_counter() - t0
        t0 = time.perf_counter()
        m1 = run(None, over, out=Path(tmp) / "run1", quiet=True)
        t1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        m2 = run(None, over, out=Path(tmp) / "run2", quiet=True)
        t2 = time.perf_counter() - t0
        floor, n = floor_seconds(over, 64)
    assert m1["accuracy_per_task"] == m2["accuracy_per_task"]
    rows = [
        ("images (train+test)", f"{n}"),
        ("torch threads", f"{torch.get_num_threads()}"),
        ("archive extraction (one-off)", f"{t_extract:.1f} s"),
        ("backbone images/s (plain forward)", f"{n / floor:.1f}"),
        ("floor: plain forward over all images", f"{floor:.1f} s"),
        ("run 1 (cold feature cache)", f"{t1:.1f} s"),
        ("run 2 (feature cache hit)", f"{t2:.1f} s"),
        ("run 1 / floor", f"{t1 / floor:.2f}"),
        ("avg / last accuracy", f"{m1['avg_acc']:.2f} / {m1['last_acc']:.2f}"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  value")  # noqa: T201  (a benchmark prints its table)
    print("-" * (w + 12))  # noqa: T201
    for k, v in rows:
        print(f"{k:<{w}}  {v}")  # noqa: T201


if __name__ == "__main__":
    main()

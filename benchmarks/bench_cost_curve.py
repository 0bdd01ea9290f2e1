"""The cost curve: wall time and peak memory against the number of tasks T on the same data.

Data: the first ``--classes`` (default 100) Tiny-ImageNet-200 classes in sorted-wnid order,
all their train and val images (a subset folder of symbolic links into the extracted
archive, with a filtered ``wnids.txt`` and ``val_annotations.txt``), split into T equal tasks
(B0 Inc ``classes / T``). Every run is a separate ``ptcl run`` process (so its peak memory is
its own), at ``--image-size`` (default 64, Tiny-ImageNet's native size).

- A frozen-feature method (default ``simplecil``) runs twice per T: cold (an empty feature
  cache: the backbone passes every train and val image once) and warm (the same cache: no
  backbone pass at all).
- A trained method (default ``finetune`` with ``--epochs`` 1) runs once per T: the backbone
  changes every task, so it trains on every task's images and re-embeds the seen test images
  after every task.

Columns: ``run_s`` (the sum of the run's task times: training, statistics, feature
extraction and evaluation; import and set-up excluded), ``backbone_s`` (backbone passes that
filled the feature cache), ``eval_s`` (evaluation after every task, summed), ``wall_s`` (the
whole process, imports included), ``peak_MiB`` (the largest per-task peak resident set size,
``metrics.json`` ``peak_memory_mb``), and ``reembed_imgs``: how many test images a protocol
that re-embeds the seen test set after every task passes through the backbone (LAMDA-PILOT's
SimpleCIL evaluation; ptcl's trained methods), ``sum_t test_per_class x seen_classes(t)``,
computed from the task sizes (it grows with T^2 / 2 at a fixed class count), beside
``test_embeds``, the test images this run passes through the backbone for evaluation (a
frozen method: every test image once when cold, none when warm; a trained method: the same
re-embedding count, since its backbone changes every task).

    python benchmarks/bench_cost_curve.py [--archive ../shared/data/tiny-imagenet-200-sub100.tar.gz] \\
        [--classes 100] [--tasks 5 10 20] [--image-size 64] [--frozen simplecil] \\
        [--trained finetune] [--epochs 1] [--workdir DIR] [--rows rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared/data/tiny-imagenet-200-sub100.tar.gz"


def subset_root(source: Path, n: int, dest: Path) -> Path:
    """A Tiny-ImageNet layout at ``dest/tiny-imagenet-200`` holding the first ``n`` classes
    (sorted wnids) of the layout at ``source``: links to their train folders and to the val
    images, ``wnids.txt`` and ``val_annotations.txt`` filtered to them."""
    from ptcl.data.tinyimagenet import find_root, read_wnids

    src = find_root(source)
    keep = read_wnids(src)[:n]
    root = dest / "tiny-imagenet-200"
    if (root / "wnids.txt").is_file() and (root / "wnids.txt").read_text().split() == keep:
        return root
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(exist_ok=True)
    for w in keep:
        link = root / "train" / w
        if not link.exists():
            link.symlink_to(src / "train" / w)
    if not (root / "val" / "images").exists():
        (root / "val" / "images").symlink_to(src / "val" / "images")
    if not (root / "words.txt").exists():
        (root / "words.txt").symlink_to(src / "words.txt")
    wanted = set(keep)
    lines = (src / "val" / "val_annotations.txt").read_text().splitlines()
    (root / "val" / "val_annotations.txt").write_text(
        "".join(ln + "\n" for ln in lines if ln.split("\t")[1:2] and ln.split("\t")[1] in wanted))
    (root / "wnids.txt").write_text("".join(w + "\n" for w in keep))  # last: marks it complete
    return root


def reembed_count(sizes: list[int], test_per_class: int) -> int:
    """Test images passed through the backbone when the seen test set is re-embedded after
    every task: ``sum_t test_per_class * (sizes[0] + ... + sizes[t])``."""
    seen, total = 0, 0
    for s in sizes:
        seen += s
        total += test_per_class * seen
    return total


def one_run(over: list[str], out: Path, cache: Path) -> tuple[dict, float]:
    """``ptcl run`` in its own process with ``PTCL_CACHE_DIR=cache``; metrics and wall time."""
    env = {**os.environ, "PTCL_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "ptcl", "run", "-q", "--out", str(out), *over]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text()), wall


def row_of(m: dict, wall: float, method: str, cache: str, epochs: int | None) -> dict:
    """A table row from a run's ``metrics.json``. ``test_embeds``: the test images this run
    passes through the backbone for evaluation, derived from what the method does: a frozen
    method with a cold cache once each (the cached features serve every task), warm none, a
    trained method the seen test set after every task."""
    test_per_class = m["test_samples"] // sum(m["task_sizes"])
    reembed = reembed_count(m["task_sizes"], test_per_class)
    if epochs is not None:
        test_embeds = reembed
    else:
        test_embeds = m["test_samples"] if m["feature_time_s"] > 0 else 0
    return {
        "method": method, "epochs": epochs, "cache": cache, "tasks": m["num_tasks"],
        "run_s": m["total_time_s"], "backbone_s": m["feature_time_s"],
        "eval_s": sum(r["eval_s"] for r in m["rows"]), "wall_s": wall, "peak_mb": m["peak_memory_mb"],
        "avg": m["avg_acc"], "last": m["last_acc"], "test_embeds": test_embeds, "reembed_imgs": reembed,
        "task_time_s": m["task_time_s"],
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'method':<22} {'cache':<5} {'T':>3} {'run_s':>7} {'backbone_s':>10} {'eval_s':>7} "
            f"{'wall_s':>7} {'peak_MiB':>8} {'last':>6} {'test_embeds':>11} {'reembed_imgs':>12}")
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for r in rows:
        print(  # noqa: T201
            f"{r['method']:<22} {r['cache']:<5} {r['tasks']:>3} {r['run_s']:7.1f} {r['backbone_s']:10.1f} "
            f"{r['eval_s']:7.1f} {r['wall_s']:7.1f} {r['peak_mb']:8.0f} {r['last']:6.2f} "
            f"{r['test_embeds']:>11} {r['reembed_imgs']:>12}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", default=str(ARCHIVE))
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--tasks", type=int, nargs="*", default=[5, 10, 20])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--frozen", default="simplecil", help="frozen-feature method (cold and warm runs)")
    ap.add_argument("--trained", default="finetune", help="trained method ('' to skip)")
    ap.add_argument("--epochs", type=int, default=1, help="method.epochs of the trained method")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    ap.add_argument("--workdir", type=Path, default=None, help="runs, caches and the subset folder (default: temporary)")
    ap.add_argument("--rows", type=Path, default=None, help="JSON-lines file the rows are appended to")
    ap.add_argument("--table", action="store_true", help="only print the table of --rows")
    args = ap.parse_args()
    if args.table:
        if args.rows is None or not args.rows.is_file():
            raise SystemExit("--table needs an existing --rows file")
        print_table([json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()])
        return
    for t in args.tasks:
        if args.classes % t:
            raise SystemExit(f"--classes {args.classes} is not divisible into {t} equal tasks")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        data_cache = work / "data-cache"
        os.environ["PTCL_CACHE_DIR"] = str(data_cache)
        from ptcl.data.archive import extract_once, is_archive

        src = Path(args.archive)
        root = subset_root(extract_once(src) if is_archive(src) else src, args.classes, work / "subset")
        rows: list[dict] = []

        def add(row: dict) -> None:
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "task_time_s"}), flush=True)  # noqa: T201
            if args.rows is not None:
                with args.rows.open("a") as f:
                    f.write(json.dumps(row) + "\n")

        for t in args.tasks:
            inc = args.classes // t
            base = [
                f"backbone.name={args.backbone}", f"backbone.image_size={args.image_size}",
                "dataset.name=tinyimagenet", f"dataset.root={root}", f"scenario.init_cls={inc}",
                f"scenario.increment={inc}", "seed=1993", *args.set,
            ]
            cache = work / f"cache-frozen-T{t}"  # empty: the first run is cold
            for state in ("cold", "warm"):
                m, wall = one_run([f"method.name={args.frozen}", *base], work / f"{args.frozen}-T{t}-{state}", cache)
                add(row_of(m, wall, args.frozen, state, None))
            if args.trained:
                over = [f"method.name={args.trained}", f"method.epochs={args.epochs}", *base]
                m, wall = one_run(over, work / f"{args.trained}-T{t}", work / f"cache-trained-T{t}")
                add(row_of(m, wall, f"{args.trained}", "-", args.epochs))

    print()  # noqa: T201
    print(f"cost curve: first {args.classes} Tiny-ImageNet classes (all their train / val images), "  # noqa: T201
          f"{args.backbone} at {args.image_size} px, B0 Inc(classes/T), seed 1993; trained method "
          f"{args.trained or '-'} with {args.epochs} epoch(s) per task")
    print_table(rows)


if __name__ == "__main__":
    main()

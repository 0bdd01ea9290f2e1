"""Wall time of each method on the offline CIFAR-10 setting, split into backbone passes
(feature extraction that fills the cache, including adapted features) and the rest
(training -- which for methods that train through the backbone includes their prompted or
adapted forward/backward passes --, statistics, classifiers, evaluation).

Every method runs with a cold feature cache, so its backbone passes are counted; with
``--cache DIR`` the runs share that cache instead, so the pre-trained features' pass is paid
once (by the first run) and ``backbone_s`` counts only the passes a method adds (adapted
features, re-extraction by an updated backbone).

A method is ``NAME`` or ``NAME:key=value:key=value`` (``method.`` keys), e.g.
``aper:tuning=ssf`` or ``ranpac:tuning=none``. ``--rows FILE`` appends each finished row
to a JSON-lines file and prints the table of every row in it, so a long comparison can be
run one method at a time (and survives an interruption); ``--table`` only prints it.

    python benchmarks/bench_methods.py --methods simplecil ranpac:tuning=none fecam \\
        [--backbone efficientnet_lite0] [--image-size 224] [--init-cls 2 --increment 2] \\
        [--epochs 3] [--set method.lr=0.01] [--rows rows.jsonl] [--keep-runs DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def method_overrides(spec: str) -> list[str]:
    """``aper:tuning=ssf:epochs=5`` -> ``["method.name=aper", "method.tuning=ssf", ...]``."""
    name, *opts = spec.split(":")
    for o in opts:
        if "=" not in o:
            raise SystemExit(f"bad method spec {spec!r}: options are key=value (e.g. aper:tuning=ssf)")
    return [f"method.name={name}", *(f"method.{o}" for o in opts)]


def variants_text(r: dict) -> str:
    """``cnn 55.10/40.20``: the avg/last accuracy of each other classifier the run recorded
    (``metrics.json`` ``variants``, e.g. iCaRL's CNN beside its NME)."""
    return " ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in r.get("variants", {}).items())


def print_table(rows: list[dict]) -> None:
    other = any(r.get("variants") for r in rows)
    head = f"{'method':<36} {'epochs':>6} {'avg':>6} {'last':>6} {'total_s':>8} {'backbone_s':>10} {'rest_s':>8}"
    head += "  other classifier (avg/last)" if other else ""
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for r in rows:
        print(  # noqa: T201
            f"{r['method']:<36} {r['epochs'] or '-':>6} {r['avg']:6.2f} {r['last']:6.2f} "
            f"{r['total_s']:8.1f} {r['backbone_s']:10.1f} {r['rest_s']:8.1f}"
            + (f"  {variants_text(r)}" if other else "")
        )


def variants_of(m: dict) -> dict:
    """``{name: [avg, last]}`` of the run's other classifiers (``metrics.json`` ``variants``)."""
    return {k: [v["avg_acc"], v["last_acc"]] for k, v in m.get("variants", {}).items()}


def row_from_run(run_dir: Path) -> dict:
    """A table row from a finished ``ptcl run`` folder (times as that run measured them)."""
    from ptcl.config import load_file
    from ptcl.report.results import read_metrics

    cfg, m = load_file(run_dir / "config.yaml"), read_metrics(run_dir)
    if not m.get("finished"):
        raise SystemExit(f"{run_dir} is not a finished run")
    method = cfg["method"]
    spec = method["name"] + (f":tuning={method['tuning']}" if "tuning" in method else "")
    total, feat = m["total_time_s"], m["feature_time_s"]
    return {
        "method": spec, "epochs": method.get("epochs"), "avg": m["avg_acc"], "last": m["last_acc"],
        "total_s": total, "backbone_s": feat, "rest_s": total - feat, "wall_s": None,
        "acc": m["accuracy_per_task"], "backbone": cfg["backbone"]["name"],
        "image_size": cfg["backbone"].get("image_size"),
        "tasks": f"{cfg['scenario']['init_cls']}+{cfg['scenario']['increment']}", "extra": [],
        "cache": "run", "run": str(run_dir), "variants": variants_of(m),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", default=[])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpg.tar.gz"))
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--init-cls", type=int, default=2)
    ap.add_argument("--increment", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="method.epochs for trainable methods")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every method")
    ap.add_argument("--rows", type=Path, default=None, help="JSON-lines file the rows are appended to")
    ap.add_argument("--table", action="store_true", help="only print the table of --rows")
    ap.add_argument("--from-runs", nargs="*", type=Path, default=[],
                    help="add rows read from finished run folders (their config.yaml and metrics.json)")
    ap.add_argument("--cache", type=Path, default=None, help="shared feature cache (default: cold per method)")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep each run folder under this folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # quiet console ...
    logging.getLogger("ptcl").setLevel(logging.INFO)  # ... but each run's run.log is complete
    if args.table:
        if args.rows is None or not args.rows.is_file():
            raise SystemExit("--table needs an existing --rows file")
        print_table([json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()])
        return
    from ptcl.config import build_config
    from ptcl.engine.runner import run
    from ptcl.registry import METHODS

    base = [
        f"backbone.name={args.backbone}", "dataset.name=imagefolder", f"dataset.root={args.archive}",
        f"dataset.train_per_class={args.train_per_class}", f"dataset.test_per_class={args.test_per_class}",
        f"scenario.init_cls={args.init_cls}", f"scenario.increment={args.increment}", "seed=1993",
        *args.set,
    ] + ([f"backbone.image_size={args.image_size}"] if args.image_size else [])
    rows = [row_from_run(d) for d in args.from_runs]
    for spec in args.methods:
        over = [*method_overrides(spec), *base]
        name = spec.split(":")[0]
        has_epochs = "epochs" in METHODS.get(name).config_cls.__dataclass_fields__
        if args.epochs is not None and has_epochs and ":epochs=" not in spec:
            over.append(f"method.epochs={args.epochs}")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["PTCL_CACHE_DIR"] = str(args.cache or tmp)  # default cold: every pass counted
            out = args.keep_runs / spec.replace(":", "_").replace("=", "-") if args.keep_runs else Path(tmp) / "run"
            t0 = time.perf_counter()
            m = run(None, over, out=out, quiet=True)
            wall = time.perf_counter() - t0
        mcfg = build_config(None, over).method
        epochs = None if getattr(mcfg, "tuning", None) == "none" else getattr(mcfg, "epochs", None)
        total, feat = m["total_time_s"], m["feature_time_s"]
        row = {
            "method": spec, "epochs": epochs, "avg": m["avg_acc"], "last": m["last_acc"],
            "total_s": total, "backbone_s": feat, "rest_s": total - feat, "wall_s": wall,
            "acc": m["accuracy_per_task"], "backbone": args.backbone, "image_size": args.image_size,
            "tasks": f"{args.init_cls}+{args.increment}", "extra": args.set,
            "cache": "shared" if args.cache else "cold", "variants": variants_of(m),
        }
        rows.append(row)
    if args.rows is not None:
        with args.rows.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"backbone={args.backbone} size={args.image_size or 'default'} tasks={args.init_cls}+{args.increment}.. "  # noqa: T201
          f"epochs={args.epochs} extra={args.set}")
    if args.rows is not None and args.rows.is_file():
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    print_table(rows)


if __name__ == "__main__":
    main()

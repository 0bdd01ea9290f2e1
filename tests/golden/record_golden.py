"""Record the golden results that refactors must reproduce (``tests/test_golden.py``).

    python tests/golden/record_golden.py            # every registered method, tiny setting
    python tests/golden/record_golden.py --cifar10  # also simplecil / ranpac on CIFAR-10
    python tests/golden/record_golden.py --methods slca mos  # re-record these only

Tiny setting: a random tiny ViT (``vit_tiny_test``), 6 train / 3 test MNIST images per
class, tasks ``[4, 3, 3]``, one short epoch. For each method it stores the accuracy matrix
and, for every tensor of the final checkpoint, its SHA-256 plus float64 sum and L2 norm
(compared exactly on the recording platform, with a tolerance elsewhere: another CPU or
library version may round differently). CIFAR-10 setting: the README's EfficientNet-Lite0
run (200 / 100 images per class, 5 tasks of 2), accuracy matrices only.

Record with torch's default thread count on a 2-core machine (CI's): a matrix product's
reduction order, and so its last bits, depends on the thread count, so a record made under
``OMP_NUM_THREADS=1`` does not reproduce bit for bit with 2 threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def platform_key() -> str:
    import numpy
    import torch

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | torch {torch.__version__} | numpy {numpy.__version__}"


def tiny_overrides(name: str) -> list[str]:
    from helpers import tiny_overrides as base

    from ptcl.registry import METHODS

    fields = METHODS.get(name).config_cls.__dataclass_fields__
    opts = {"epochs": 1, "batch_size": 8, **getattr(METHODS.get(name), "test_options", {})}
    extra = {f"method.{k}": v for k, v in opts.items() if k in fields}
    extra.update({"scenario.init_cls": 4, "scenario.increment": 3})
    return base(name, **extra)


def tensor_digest(t) -> dict:
    import torch

    t = t.detach().cpu().contiguous()
    d = t.double()
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).replace("torch.", ""),
        "sha256": hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
        "sum": float(d.sum()),
        "norm": float(d.norm()),
    }


def record_tiny(out_dir: Path, only: list[str] | None = None) -> dict:
    """Record every registered method, or re-record ``only`` these and keep the others'
    records from the existing file (a result changed on purpose for one method)."""
    import ptcl
    from ptcl.io import load_tensors

    methods = {}
    if only:
        methods = json.loads((HERE / "tiny_methods.json").read_text())["methods"]
        unknown = sorted(set(only) - set(ptcl.METHODS.names()))
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; registered: {ptcl.METHODS.names()}")
    for name in only or ptcl.METHODS.names():
        m = ptcl.run(None, tiny_overrides(name), out=out_dir / name, quiet=True)
        last = out_dir / name / "checkpoints" / f"task_{m['num_tasks'] - 1:03d}.safetensors"
        methods[name] = {
            "accuracy_matrix": m["accuracy_matrix"],
            "tensors": {k: tensor_digest(v) for k, v in sorted(load_tensors(last).items())},
        }
        print(name, m["accuracy_per_task"], flush=True)
    setting = [o for o in tiny_overrides("simplecil") if not o.startswith("method")]
    return {"platform": platform_key(), "setting": setting, "methods": dict(sorted(methods.items()))}


def cifar10_overrides(method: str, archive: Path) -> list[str]:
    return [
        *method.split(), "backbone=efficientnet_lite0", "dataset=imagefolder", f"dataset.root={archive}",
        "dataset.train_per_class=200", "dataset.test_per_class=100", "scenario.init_cls=2",
        "scenario.increment=2", "seed=1993",
    ]


CIFAR10_METHODS = ("method=simplecil", "method=ranpac method.tuning=none")


def record_cifar10(out_dir: Path, archive: Path) -> dict:
    import ptcl

    runs = {}
    for method in CIFAR10_METHODS:
        m = ptcl.run(None, cifar10_overrides(method, archive), out=out_dir / method.replace(" ", "_"), quiet=True)
        runs[method] = {"accuracy_matrix": m["accuracy_matrix"], "avg_acc": m["avg_acc"], "last_acc": m["last_acc"]}
        print(method, m["avg_acc"], m["last_acc"], flush=True)
    return {"platform": platform_key(), "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar10", action="store_true")
    p.add_argument("--only-cifar10", action="store_true")
    p.add_argument("--methods", nargs="+", default=None, help="re-record only these methods (tiny setting)")
    p.add_argument("--archive", default=str(HERE.parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"))
    a = p.parse_args()
    os.environ.setdefault("PTCL_CACHE_DIR", tempfile.mkdtemp(prefix="ptcl-golden-"))
    with tempfile.TemporaryDirectory() as tmp:
        if not a.only_cifar10:
            (HERE / "tiny_methods.json").write_text(json.dumps(record_tiny(Path(tmp), a.methods), indent=1) + "\n")
        if a.cifar10 or a.only_cifar10:
            data = record_cifar10(Path(tmp), Path(a.archive))
            (HERE / "cifar10_efficientnet.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()

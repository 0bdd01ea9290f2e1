"""A prompt method trained once, evaluated after every task under several test protocols.

The protocols differ only in how the test set is cut into batches and whether the batch's
majority vote picks the prompts (``batchwise_prompt``, ``eval_order``, see
``ptcl.methods.prompt_pool``); training is the same run, so the differences are the
protocol's alone. The run itself evaluates with the method's configured protocol; after
each task this script also evaluates the learner under every protocol listed and prints
avg / last / forgetting per protocol::

    python benchmarks/bench_eval_protocol.py --method dualprompt --set method.epochs=5 \\
        backbone.name=dinov2_vits14_imgfocus backbone.image_size=112 \\
        dataset.name=imagefolder dataset.root=../shared/data/cifar10-jpg.tar.gz \\
        dataset.train_per_class=200 dataset.test_per_class=100 scenario.init_cls=4 scenario.increment=2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

PROTOCOLS = {
    "per_image": {"batchwise_prompt": False, "eval_order": "mixed"},
    "batchwise_mixed": {"batchwise_prompt": True, "eval_order": "mixed"},
    "batchwise_class": {"batchwise_prompt": True, "eval_order": "class"},
    "batchwise_task": {"batchwise_prompt": True, "eval_order": "task"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="dualprompt")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides of the run")
    ap.add_argument("--protocols", nargs="*", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write the matrices here")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ptcl.engine.runner as runner
    from ptcl.metrics import (
        accuracy,
        accuracy_row,
        average_incremental_accuracy,
        forgetting,
        forgetting_pilot,
    )

    original = runner.predict_seen
    rows: dict[str, list[list[float | None]]] = {p: [] for p in a.protocols}
    accs: dict[str, list[float]] = {p: [] for p in a.protocols}

    def predict_all(learner, task, batch_size):
        sc = learner.ctx.scenario
        bounds = [0] + [t.end for t in sc.tasks[: task.index + 1]]
        saved = {k: getattr(learner.cfg, k) for k in ("batchwise_prompt", "eval_order")}
        try:
            for name in a.protocols:
                for k, v in PROTOCOLS[name].items():
                    setattr(learner.cfg, k, v)
                pred, y = original(learner, task, batch_size)
                rows[name].append(accuracy_row(pred, y, bounds, sc.num_tasks))
                accs[name].append(accuracy(pred, y))
        finally:
            for k, v in saved.items():
                setattr(learner.cfg, k, v)
        return original(learner, task, batch_size)

    runner.predict_seen = predict_all
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp) / "run"
        runner.run(None, [f"method.name={a.method}", *a.set], out=out, quiet=True)
    head = f"{'protocol':<18} {'avg':>6} {'last':>6} {'forget':>7} {'f_pilot':>8}  accuracy after each task"
    print(head)  # noqa: T201
    print("-" * len(head))  # noqa: T201
    for name in a.protocols:
        A = rows[name]
        f, fp = forgetting(A), forgetting_pilot(A)
        print(  # noqa: T201
            f"{name:<18} {average_incremental_accuracy(accs[name]):6.2f} {accs[name][-1]:6.2f} "
            f"{'-' if f is None else f'{f:7.2f}':>7} {'-' if fp is None else f'{fp:8.2f}':>8}  "
            + " / ".join(f"{x:.1f}" for x in accs[name])
        )
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "acc": accs}, indent=1))


if __name__ == "__main__":
    main()

"""Is a prompt method's low accuracy on new classes the classifier protocol or the prompts?

L2P, DualPrompt and CODA-Prompt train one shared linear head with cross-entropy over the
current task's classes only (old logits masked). This probe runs exactly that protocol on
the *frozen* pre-trained features (no prompts at all): a growing linear head, Adam, masked
cross-entropy, task after task, and prints the accuracy on each task's classes after the
last task. If new tasks' classes are already at ~0% here, the failure belongs to masked
training on that backbone's features, not to the prompt machinery.

    python benchmarks/probe_masked_head.py --backbone dinov2_vits14_imgfocus --image-size 112
    python benchmarks/probe_masked_head.py --backbone efficientnet_lite0
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def masked_run(xtr, ytr, xte, yte, sc, args, seed: int) -> torch.Tensor:
    """Per-task accuracies (and the overall one, last) of one head trained task by task."""
    from ptcl.heads.linear import IncrementalLinear

    torch.manual_seed(seed)
    head = IncrementalLinear(xtr.shape[1])
    for t in sc.tasks:
        head.grow(t.num_new)
        opt = torch.optim.Adam(head.parameters(), lr=args.lr)
        sel = (ytr >= t.start) & (ytr < t.end)
        x, y = xtr[sel], ytr[sel]
        lo = 0 if args.no_mask else t.start
        for _ in range(args.epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), args.batch_size):
                b = perm[i : i + args.batch_size]
                loss = F.cross_entropy(head(x[b])[:, lo : t.end], y[b] - lo)
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        pred = head(xte).argmax(1)
    accs = [(pred[(yte >= t.start) & (yte < t.end)] == yte[(yte >= t.start) & (yte < t.end)]).float().mean()
            for t in sc.tasks]
    return 100 * torch.stack([*accs, (pred == yte).float().mean()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dinov2_vits14_imgfocus")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpg.tar.gz"))
    ap.add_argument("--init-cls", type=int, default=4)
    ap.add_argument("--increment", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.001875)  # L2P's Adam lr
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=5, help="head initialisations / orders averaged")
    ap.add_argument("--no-mask", action="store_true", help="cross-entropy over all seen classes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from ptcl.backbones import build_backbone
    from ptcl.config import build_config
    from ptcl.data.datasets import load_dataset
    from ptcl.data.features import FeatureCache
    from ptcl.data.scenario import Scenario
    from ptcl.data.server import DataManager

    over = [f"backbone.name={args.backbone}", "dataset.name=imagefolder", f"dataset.root={args.archive}"]
    over += [f"backbone.image_size={args.image_size}"] if args.image_size else []
    cfg = build_config(None, over)
    torch.manual_seed(0)
    splits = load_dataset(cfg.dataset)
    sc = Scenario.build(splits.num_classes, args.init_cls, args.increment, 1993)
    bb = build_backbone(cfg.backbone)
    dm = DataManager(splits, sc, {"train": 200, "test": 100}, 1993, bb, FeatureCache(), torch.device("cpu"), quiet=True)
    xtr, ytr = dm.features("train", range(sc.num_classes))
    xte, yte = dm.features("test", range(sc.num_classes))
    runs = torch.stack([masked_run(xtr, ytr, xte, yte, sc, args, seed) for seed in range(args.seeds)])
    per_task, overall = runs[:, :-1].mean(0), runs[:, -1].mean()
    norm = xtr.norm(dim=1).mean()
    cos_mean = F.cosine_similarity(xtr, xtr.mean(0, keepdim=True)).mean()
    print(f"{args.backbone}: feature norm {norm:.1f}, mean cosine to the mean feature {cos_mean:.2f}")  # noqa: T201
    print(f"masked={not args.no_mask}, mean of {args.seeds} seeds: accuracy on each task's classes after "  # noqa: T201
          f"the last task {[round(float(a), 1) for a in per_task]}, all classes {overall:.1f}")


if __name__ == "__main__":
    main()

"""What the cached query saves the prompt-pool methods: one training step, two ways.

L2P, DualPrompt, CODA-Prompt and DAP match a query -- the frozen pre-trained CLS feature
of the image -- to prompt keys (CODA weights its components by it). ptcl reads it from the feature cache (``input_kind = "images+features"``);
the official code computes it with an extra no-grad forward pass of the frozen ViT in
every step. This times one training step (prompted forward + backward + Adam step) of
each method with the query given vs. computed by that extra pass, and prints a table.

    python benchmarks/bench_prompt_query.py [--backbone dinov2_vits14_imgfocus --size 112]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ptcl.backbones import build_backbone
from ptcl.config import BackboneConfig, build_config
from ptcl.data.scenario import Task
from ptcl.peft import disabled
from ptcl.registry import METHODS


def timed_step(learner, opt, images: torch.Tensor, y: torch.Tensor, query: torch.Tensor | None) -> float:
    """Seconds of one training step; ``query=None`` computes it with a frozen pass."""
    t0 = time.perf_counter()
    if query is None:
        with torch.no_grad(), disabled(learner.backbone.model):
            query = learner.backbone(images)
    feats, pull = learner.prompted_features(images, query, Task(0, 0, 2, 1))
    loss = F.cross_entropy(learner.head(feats), y) - 0.1 * pull
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def compare(learner, images: torch.Tensor, query: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median step seconds (cached query, extra pass), the two kinds interleaved so that
    a change of machine load hits both alike; one warm-up step each."""
    params = [p for n, p in learner.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.Adam(params, lr=1e-3)
    y = torch.randint(0, 2, (len(images),))
    cached, extra = [], []
    for _ in range(reps + 1):
        cached.append(timed_step(learner, opt, images, y, query))
        extra.append(timed_step(learner, opt, images, y, None))
    return statistics.median(cached[1:]), statistics.median(extra[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dinov2_vits14_imgfocus")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in ("l2p", "dualprompt", "coda_prompt", "dap"):
        cfg = build_config({"method": {"name": name}}).method
        bb = build_backbone(BackboneConfig(name=args.backbone, image_size=args.size))
        learner = METHODS.get(name)(cfg, bb, None)
        learner.before_task(Task(0, 0, 2, 1))
        learner.prepare_task(Task(0, 0, 2, 1))
        images = torch.randn(cfg.batch_size, 3, args.size, args.size)
        with torch.no_grad():
            query = bb(images)
        cached, extra = compare(learner, images, query, args.reps)
        rows.append((name, cfg.batch_size, cached, extra))
    print(f"backbone {args.backbone} @ {args.size}px, {torch.get_num_threads()} threads, median of {args.reps}")
    print("| method | batch | step, cached query (s) | step, extra frozen pass (s) | saved |")
    print("|---|---|---|---|---|")
    for name, b, c, e in rows:
        print(f"| {name} | {b} | {c:.3f} | {e:.3f} | {100 * (e - c) / e:.0f}% |")


if __name__ == "__main__":
    main()

"""Helpers shared by test modules."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

import ptcl.methods  # noqa: F401  (registers every method in METHODS)
from ptcl.backbones import build_backbone
from ptcl.backbones.base import Backbone, Preprocess
from ptcl.config import build_config
from ptcl.data.datasets import load_dataset
from ptcl.data.features import FeatureCache
from ptcl.data.scenario import Scenario, Task
from ptcl.data.server import DataManager
from ptcl.engine.runner import run, seed_everything
from ptcl.methods.base import Learner, LearnerContext
from ptcl.registry import METHODS

CPU = torch.device("cpu")


def tiny_overrides(method: str, **extra: object) -> list[str]:
    """A 2-task run on a tiny random ViT and a few MNIST images per class (seconds on CPU).

    The backbone is the method's ``test_backbone`` class attribute where it sets one (e.g.
    ``clip_tiny_test`` for a method that needs a text tower), else ``vit_tiny_test``."""
    over = {
        "method.name": method,
        "backbone.name": getattr(METHODS.get(method), "test_backbone", "vit_tiny_test"),
        "dataset.name": "mnist_demo",
        "dataset.train_per_class": 6,
        "dataset.test_per_class": 3,
        "scenario.init_cls": 2,
        "scenario.increment": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in over.items()]


def make_learner(
    tmp_path: Path,
    method: str,
    overrides: Mapping[str, object] | None = None,
    init_cls: int = 2,
    increment: int = 2,
    per_class: Mapping[str, int] | None = None,
) -> tuple[Learner, Scenario]:
    """``method`` built as a run builds it, on :func:`tiny_overrides` plus ``overrides``.

    Seeds with the run seed, splits the classes ``init_cls`` then ``increment`` at a time and
    keeps ``per_class`` images per class and split (6 train, 3 test by default); features are
    cached under ``tmp_path / "fc"``. Returns the learner and its scenario.
    """
    cfg = build_config(None, tiny_overrides(method, **(overrides or {})))
    seed_everything(cfg.seed)
    splits = load_dataset(cfg.dataset)
    sc = Scenario.build(splits.num_classes, init_cls, increment, cfg.seed)
    bb = build_backbone(cfg.backbone)
    sizes = dict(per_class) if per_class is not None else {"train": 6, "test": 3}
    dm = DataManager(splits, sc, sizes, cfg.seed, bb, FeatureCache(tmp_path / "fc"), CPU, 16, 0, True)
    ctx = LearnerContext(dm, sc, CPU, cfg.seed, quiet=True)
    return METHODS.get(method)(cfg.method, bb, ctx), sc


def run_task(learner: Learner, task: Task, reseed: bool = True) -> None:
    """One task of the run loop; ``reseed`` seeds as the runner does before each task."""
    if reseed:
        seed_everything(1993 + task.index)
    learner.before_task(task)
    learner.train_task(task)
    learner.after_task(task)


def train_batch(learner: Learner, classes, n: int = 8, shuffle: bool = False,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images (eval transform) of ``classes`` and their labels, as the run's
    loader serves them (normalised, on the learner's device)."""
    ds = learner.ctx.data.images("train", classes, train_transform=False)
    return next(iter(learner.ctx.data.loader(ds, n, shuffle=shuffle, seed=seed)))


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s state dict (to compare before and after training)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_resume_matches_full(over: list[str], tmp_path: Path, keys: tuple[str, ...]) -> None:
    """A run stopped after task 2 and resumed ends with the uninterrupted run's ``keys``."""
    full = run(None, over, out=tmp_path / "full", quiet=True)
    part = run(None, over, out=tmp_path / "part", quiet=True, max_tasks=2)
    assert part["tasks_done"] == 2 and not part["finished"]
    resumed = run(resume=tmp_path / "part", quiet=True)
    assert resumed["finished"]
    for k in keys:
        assert resumed[k] == full[k], k


def tiny_timm_vit(depth: int) -> Backbone:
    """A random timm ViT (32 px, patch 8, 32 dims, 2 heads) of ``depth`` blocks, seeded with 0."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, embed_dim=32, depth=depth, num_heads=2).eval()
    return Backbone(vit, "vit_test", 32, Preprocess(32, (0.5,) * 3, (0.5,) * 3))


class FakeData:
    """``images_with_features`` / ``loader`` of a DataManager on random tensors."""

    def images_with_features(self, split, classes, train_transform=False):
        g = torch.Generator().manual_seed(classes[0])
        return [((torch.randn(3, 32, 32, generator=g), torch.randn(32, generator=g)), c) for c in classes for _ in range(4)]

    def loader(self, dataset, batch_size, shuffle, seed=0, drop_last=False, shard=True):
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last)


def fake_context(data: object | None = None) -> LearnerContext:
    """A quiet CPU context with seed 0 on ``data`` (default :class:`FakeData`) and no scenario."""
    return LearnerContext(data if data is not None else FakeData(), None, CPU, 0, quiet=True)  # type: ignore[arg-type]

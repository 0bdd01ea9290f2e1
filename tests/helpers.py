"""Helpers shared by test modules."""

from __future__ import annotations


def tiny_overrides(method: str, **extra: object) -> list[str]:
    """A 2-task run on a tiny random ViT and a few MNIST images per class (seconds on CPU)."""
    over = {
        "method.name": method,
        "backbone.name": "vit_tiny_test",
        "dataset.name": "mnist_demo",
        "dataset.train_per_class": 6,
        "dataset.test_per_class": 3,
        "scenario.init_cls": 2,
        "scenario.increment": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in over.items()]

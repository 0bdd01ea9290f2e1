"""End-to-end on real data: SimpleCIL, EfficientNet-Lite0, CIFAR-10 from the shared archive.

200 train / 100 test images per class, 224 px, 5 tasks of 2 classes, seed 1993.
"""

from __future__ import annotations

import pytest

from ptcl.engine.runner import run


@pytest.mark.slow
def test_simplecil_efficientnet_cifar10(cifar10_archive, tmp_path):
    m = run(None, [
        "method.name=simplecil", "backbone.name=efficientnet_lite0", "dataset.name=imagefolder",
        f"dataset.root={cifar10_archive}", "dataset.train_per_class=200", "dataset.test_per_class=100",
        "scenario.init_cls=2", "scenario.increment=2", "seed=1993",
    ], out=tmp_path / "run", quiet=True)
    assert m["class_names"][:2] and len(m["accuracy_per_task"]) == 5
    assert m["train_samples"] == 2000 and m["test_samples"] == 1000
    assert m["last_acc"] >= 62.0, m["accuracy_per_task"]
    assert m["avg_acc"] >= 70.0, m["accuracy_per_task"]

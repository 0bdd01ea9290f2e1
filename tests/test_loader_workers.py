"""Issue 14, the input pipeline: uint8 batches normalised on the device (bit for bit the old
``ToTensor + Normalize``), loader workers by default (``num_workers: auto``) with weights that
do not depend on the worker count, and the data-wait / compute split in ``run.log``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_overrides
from PIL import Image

import ptcl
from ptcl.backbones.transforms import (
    Augment,
    Preprocess,
    eval_transform,
    normalize_batch,
    train_transform,
)
from ptcl.config import RunConfig, build_config
from ptcl.data import loading
from ptcl.data.features import FeatureCache
from ptcl.data.loading import DeviceLoader, resolve_num_workers
from ptcl.data.server import DataManager
from ptcl.engine.runner import run
from ptcl.errors import ConfigError
from ptcl.io import load_tensors
from ptcl.seeding import SeededItems, SeededSampler, seeded

PREPROCESS = [
    Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the tiny test ViT's
    Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    Preprocess(32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), crop_ratio=0.875),  # SLCA CIFAR
    Preprocess(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), interpolation="bilinear"),  # input_norm: none
]


def _images(n: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41 - 3 * i, 3), dtype=np.uint8)) for i in range(n)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)  # -0.0 vs 0.0 or NaN payloads would differ here


@pytest.mark.parametrize("p", PREPROCESS, ids=["half", "imagenet", "slca", "none"])
def test_on_device_normalisation_equals_totensor_normalize_bit_for_bit(p):
    imgs = _images()
    old = torch.stack([eval_transform(p)(im) for im in imgs])
    served = torch.stack([eval_transform(p, on_device=True)(im) for im in imgs])
    assert served.dtype == torch.uint8 and served.shape == old.shape
    new = normalize_batch(served, p)
    assert new.dtype == old.dtype == torch.float32
    assert torch.equal(_bits(new), _bits(old))
    # the train transform too, with the same per-sample seed on both paths
    aug = Augment("crop_flip", (0.08, 1.0), 0.25)
    with seeded(7):
        a = torch.stack([train_transform(p, aug)(im) for im in imgs])
    with seeded(7):
        b = normalize_batch(torch.stack([train_transform(p, aug, on_device=True)(im) for im in imgs]), p)
    assert torch.equal(_bits(a), _bits(b))
    # channels-last batches (the CNN path) give the same numbers
    cl = normalize_batch(served.contiguous(memory_format=torch.channels_last), p)
    assert torch.equal(_bits(cl.contiguous()), _bits(old))


def test_normalize_batch_rejects_float_input():
    with pytest.raises(TypeError, match="uint8"):
        normalize_batch(torch.zeros(1, 3, 4, 4), PREPROCESS[0])


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 1), (4, 3), (9, 8), (64, 8)])
def test_num_workers_auto_resolves_as_documented(monkeypatch, cores, expected):
    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert loading.usable_cores() == cores
    assert resolve_num_workers("auto") == expected  # min(8, usable cores - 1)
    assert resolve_num_workers(3) == 3 and resolve_num_workers(0) == 0  # an integer is kept
    assert loading.loader_workers(expected, loading.MIN_WORKER_ITEMS - 1) == 0  # small loaders: none
    assert loading.loader_workers(expected, loading.MIN_WORKER_ITEMS) == expected


def test_num_workers_option():
    assert RunConfig().num_workers == "auto"
    assert build_config(None, ["num_workers=auto"], methods=ptcl.METHODS).num_workers == "auto"
    assert build_config(None, ["num_workers=2"], methods=ptcl.METHODS).num_workers == 2
    for bad in ("num_workers=-1", "num_workers=many", "num_workers=1.5"):
        with pytest.raises(ConfigError, match="num_workers"):
            build_config(None, [bad], methods=ptcl.METHODS)
    with pytest.raises(ConfigError, match="num_workers"):
        resolve_num_workers(-2)


class _Augmented(torch.utils.data.Dataset):
    """A random 'augmentation' drawn from the global generator, served as uint8 images."""

    augmented = True

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.randint(0, 256, (3, 2, 2), dtype=torch.uint8), i


@pytest.mark.parametrize("persistent", [True, False])
def test_worker_loader_repeats_the_single_process_batches_every_epoch(persistent):
    """Three epochs through 0 and 2 workers: same order, same augmentation, normalised
    floats (a persistent loader draws its workers' seed as a fresh iterator would)."""
    p = PREPROCESS[1]

    def epochs(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ds, g = _Augmented(), torch.Generator().manual_seed(5)
        kw = {"persistent_workers": persistent} if workers else {}
        dl = DeviceLoader(SeededItems(ds), sampler=SeededSampler(ds, True, g), generator=g, batch_size=5,
                          num_workers=workers, preprocess=p, **kw)
        return [b for _ in range(3) for b in dl]

    a, b = epochs(0), epochs(2)
    assert len(a) == len(b) == 9
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == torch.float32 and torch.equal(ya, yb) and torch.equal(_bits(xa), _bits(xb))
    assert not torch.equal(a[0][1], a[3][1])  # each epoch reshuffles


TWO_TASKS = {"scenario.init_cls": 4, "scenario.increment": 6, "keep_all_checkpoints": "true"}


def _checkpoint(result: dict, task: int) -> dict[str, torch.Tensor]:
    return load_tensors(Path(result["run_dir"]) / "checkpoints" / f"task_{task:03d}.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys() and a
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("method, extra", [
    ("finetune", {"method.epochs": 2, "method.batch_size": 8, "method.brightness": 0.2}),  # trained, augmented
    ("simplecil", {}),  # frozen features
])
def test_zero_and_two_workers_give_identical_checkpoints(tmp_path, monkeypatch, caplog, method, extra):
    caplog.set_level(logging.INFO, logger="ptcl")  # run.log gets what the ptcl logger passes
    monkeypatch.setattr(loading, "MIN_WORKER_ITEMS", 1)  # workers even for the tiny test loaders
    over = tiny_overrides(method, **extra, **TWO_TASKS)
    a = run(None, [*over, "num_workers=0"], out=tmp_path / "w0", quiet=True, cache=FeatureCache(tmp_path / "c0"))
    b = run(None, [*over, "num_workers=2"], out=tmp_path / "w2", quiet=True, cache=FeatureCache(tmp_path / "c2"))
    assert "2 workers" in (tmp_path / "w2" / "run.log").read_text()  # the workers did serve
    assert "2 workers" not in (tmp_path / "w0" / "run.log").read_text()
    for task in (0, 1):
        assert not _same(_checkpoint(a, task), _checkpoint(b, task)), f"{method} task {task}"


def test_served_uint8_path_equals_the_float_path(tmp_path, monkeypatch):
    """The run with on-device normalisation and the per-image ToTensor + Normalize run of
    before give identical weights (trained with augmentation) and features."""
    over = tiny_overrides("finetune", **{"method.epochs": 1, "method.batch_size": 8}, **TWO_TASKS)
    a = run(None, over, out=tmp_path / "new", quiet=True, cache=FeatureCache(tmp_path / "c1"))
    monkeypatch.setattr(DataManager, "on_device", False)
    b = run(None, over, out=tmp_path / "old", quiet=True, cache=FeatureCache(tmp_path / "c2"))
    for task in (0, 1):
        assert not _same(_checkpoint(a, task), _checkpoint(b, task))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


SPLIT = re.compile(r"data wait (\d+\.\d+) s \((\d+)%\), compute (\d+\.\d+) s")


def test_run_log_has_the_data_wait_compute_split(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ptcl")  # as `ptcl run` sets it
    over = tiny_overrides("finetune", **{"method.epochs": 1, "method.batch_size": 8}, **TWO_TASKS)
    run(None, over, out=tmp_path / "r", quiet=True, cache=FeatureCache(tmp_path / "c"))
    lines = (tmp_path / "r" / "run.log").read_text().splitlines()

    def split(marker: str) -> list[tuple[float, float]]:
        found = [SPLIT.search(ln) for ln in lines if marker in ln]
        assert found and all(found), f"no data wait / compute split on the {marker!r} lines"
        return [(float(m.group(1)), float(m.group(3))) for m in found if m]

    fits = split(": 1 epochs, ")  # one line per fit
    evals = split("eval ")
    totals = split("input pipeline: ")
    assert len(fits) == 2 and len(evals) == 2 and len(totals) == 2  # two tasks
    for (w, c) in fits + evals + totals:
        assert w >= 0 and c >= 0
    for t in (0, 1):  # a task's total holds its fit and its evaluation (each rounded to 0.01 s)
        assert sum(totals[t]) > 0
        assert totals[t][0] >= fits[t][0] + evals[t][0] - 0.02 and totals[t][1] >= fits[t][1] + evals[t][1] - 0.02

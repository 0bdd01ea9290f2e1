"""The input pipeline options of issue 11: normalisation, evaluation crop, train augmentation,
shuffling, and the feature cache keyed by all of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import ptcl
from ptcl.backbones import build_backbone
from ptcl.backbones.transforms import Augment, Preprocess, eval_transform, train_transform
from ptcl.config import BackboneConfig, build_config
from ptcl.data.features import FeatureCache
from ptcl.engine.runner import run
from ptcl.errors import ConfigError


def _image(w: int = 64, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _bb(**kw):
    return build_backbone(BackboneConfig(name="vit_tiny_test", **kw))


def test_input_norm_none_feeds_unit_range_pixels():
    bb = _bb(input_norm="none")
    assert bb.preprocess.mean == (0.0, 0.0, 0.0) and bb.preprocess.std == (1.0, 1.0, 1.0)
    tf = bb.transform(train=False)
    assert not any(isinstance(t, T.Normalize) for t in tf.transforms)
    x = tf(_image())
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9


def test_input_norm_backbone_is_the_default_and_normalises():
    x = _bb().transform(train=False)(_image())
    assert x.min() < 0  # (p - 0.5) / 0.5: the tiny ViT's own mean/std
    assert torch.equal(_bb(input_norm="backbone").transform(False)(_image()), x)


def test_input_norm_imagenet_and_custom():
    assert _bb(input_norm="imagenet").preprocess.std == (0.229, 0.224, 0.225)
    bb = _bb(input_norm="custom", mean=[0.5071, 0.4867, 0.4408], std=[0.2675, 0.2565, 0.2761])
    norm = [t for t in bb.transform(False).transforms if isinstance(t, T.Normalize)][0]
    assert tuple(norm.mean) == (0.5071, 0.4867, 0.4408) and tuple(norm.std) == (0.2675, 0.2565, 0.2761)


@pytest.mark.parametrize("kw, msg", [
    ({"input_norm": "custom"}, "needs backbone.mean"),
    ({"input_norm": "custom", "mean": [0.5] * 3, "std": [0.2] * 2}, "needs backbone.std"),
    ({"mean": [0.5] * 3}, "only used with backbone.input_norm=custom"),
    ({"input_norm": "custom", "mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, "backbone.std"),
    ({"eval_crop_ratio": 1.2}, "eval_crop_ratio"),
    ({"eval_crop_ratio": 0.0}, "eval_crop_ratio"),
])
def test_input_options_are_checked(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        BackboneConfig(name="vit_tiny_test", **kw)


def test_eval_crop_ratio_resizes_then_crops():
    tf = eval_transform(Preprocess(224, (0.5,) * 3, (0.5,) * 3, crop_ratio=0.875))
    resize = [t for t in tf.transforms if isinstance(t, T.Resize)][0]
    crop = [t for t in tf.transforms if isinstance(t, T.CenterCrop)][0]
    assert resize.size == 256 and tuple(crop.size) == (224, 224)  # PILOT's Resize(256) + CenterCrop(224)
    bb_full, bb_crop = _bb(), _bb(eval_crop_ratio=0.875)
    a, b = bb_full.transform(False)(_image()), bb_crop.transform(False)(_image())
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)  # the 0.875 crop zooms in


def test_default_transforms_are_unchanged():
    p = Preprocess(32, (0.5,) * 3, (0.5,) * 3)
    assert repr(eval_transform(p)) == repr(T.Compose([
        T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
        T.Normalize((0.5,) * 3, (0.5,) * 3)]))
    assert repr(train_transform(p)) == repr(T.Compose([
        T.RandomResizedCrop(32, scale=(0.05, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]))


def test_slca_augmentation_and_resize_only():
    p = Preprocess(32, (0.5,) * 3, (0.5,) * 3)
    tf = train_transform(p, Augment("crop_flip", (0.08, 1.0), 63 / 255))
    rrc = [t for t in tf.transforms if isinstance(t, T.RandomResizedCrop)][0]
    jitter = [t for t in tf.transforms if isinstance(t, T.ColorJitter)][0]
    assert tuple(rrc.scale) == (0.08, 1.0) and jitter.brightness == pytest.approx((1 - 63 / 255, 1 + 63 / 255))
    plain = Augment("resize")
    assert not plain.random
    tf = train_transform(p, plain)
    img = _image()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        a = tf(img)
        torch.manual_seed(2)
        b = tf(img)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)  # no randomness, aspect not kept


@pytest.mark.parametrize("opt", ["crop_scale=[0.5,0.1]", "crop_scale=[0.0,1.0]", "crop_scale=[1.0]",
                                 "brightness=-0.1", "augment=autoaugment", "shuffle=maybe"])
def test_train_augment_options_are_checked(opt):
    with pytest.raises(ConfigError, match=opt.split("=")[0]):
        build_config(None, ["method.name=finetune", f"method.{opt}"], methods=ptcl.METHODS)


def _tiny(tmp_path, name, *extra):
    return [f"method.name={name}", "backbone.name=vit_tiny_test", "dataset.name=mnist_demo",
            "dataset.train_per_class=6", "dataset.test_per_class=3", "scenario.init_cls=4",
            "scenario.increment=3", *(["method.epochs=1", "method.batch_size=8"] if name != "simplecil" else []),
            *extra]


def test_runner_hands_the_method_augmentation_to_the_data_server(tmp_path, monkeypatch):
    seen = []
    from ptcl.data import server

    orig = server.DataManager.images

    def spy(self, split, classes, train_transform=False):
        ds = orig(self, split, classes, train_transform)
        if train_transform:
            seen.append((self.augment, ds.augmented, repr(ds.transform)))
        return ds

    monkeypatch.setattr(server.DataManager, "images", spy)
    run(None, _tiny(tmp_path, "finetune", "method.augment=resize"), out=tmp_path / "a", quiet=True, max_tasks=1)
    run(None, _tiny(tmp_path, "finetune", "method.crop_scale=[0.08,1.0]", "method.brightness=0.25"),
        out=tmp_path / "b", quiet=True, max_tasks=1)
    (aug_a, random_a, tf_a), (aug_b, random_b, tf_b) = seen[0], seen[-1]
    assert aug_a.kind == "resize" and not random_a and "RandomResizedCrop" not in tf_a
    assert aug_b.crop_scale == (0.08, 1.0) and random_b and "ColorJitter" in tf_b


def test_shuffle_false_keeps_the_dataset_order(tmp_path, monkeypatch):
    orders = []
    from ptcl.data import server

    orig = server.DataManager.loader

    def spy(self, dataset, batch_size, shuffle, seed=0, drop_last=False):
        orders.append(shuffle)
        return orig(self, dataset, batch_size, shuffle, seed, drop_last)

    monkeypatch.setattr(server.DataManager, "loader", spy)
    run(None, _tiny(tmp_path, "finetune", "method.shuffle=false"), out=tmp_path / "a", quiet=True, max_tasks=1)
    assert orders and not any(orders)


def test_changed_input_pipeline_misses_the_feature_cache(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    over = _tiny(tmp_path, "simplecil")
    a = run(None, over, out=tmp_path / "a", quiet=True, cache=cache)
    misses = cache.misses
    run(None, over, out=tmp_path / "a2", quiet=True, cache=cache)
    assert cache.misses == misses  # same pipeline: served from the cache
    for opt in ("backbone.input_norm=none", "backbone.eval_crop_ratio=0.875"):
        before = cache.misses
        b = run(None, [*over, opt], out=tmp_path / opt.split("=")[0], quiet=True, cache=cache)
        assert cache.misses > before, opt  # another entry, not the old features
    assert b["accuracy_matrix"] is not None and a["accuracy_matrix"] is not None


@pytest.mark.slow
def test_simplecil_cifar10_official_input_pipeline_differs(cifar10_archive, tmp_path):
    """Issue 11: simplecil on the CIFAR-10 EfficientNet-Lite0 setting with input_norm=none and
    eval_crop_ratio=0.875 runs and differs from the default run (cache not reused)."""
    cache = FeatureCache(tmp_path / "cache")
    over = ["method.name=simplecil", "backbone.name=efficientnet_lite0", "dataset.name=imagefolder",
            f"dataset.root={cifar10_archive}", "dataset.train_per_class=40", "dataset.test_per_class=20",
            "scenario.init_cls=2", "scenario.increment=2"]
    a = run(None, over, out=tmp_path / "a", quiet=True, cache=cache)
    before = cache.misses
    b = run(None, [*over, "backbone.input_norm=none", "backbone.eval_crop_ratio=0.875"],
            out=tmp_path / "b", quiet=True, cache=cache)
    assert cache.misses - before == 2  # train and test features computed again
    assert a["accuracy_matrix"] != b["accuracy_matrix"]


def test_interpolation_options():
    p = Preprocess(32, (0.5,) * 3, (0.5,) * 3, interpolation="bilinear")
    resize = [t for t in eval_transform(p).transforms if isinstance(t, T.Resize)][0]
    assert resize.interpolation == T.InterpolationMode.BILINEAR
    assert _bb(eval_interpolation="bilinear").preprocess.interpolation == "bilinear"
    rrc = train_transform(p, Augment(interpolation="bilinear")).transforms[0]
    assert rrc.interpolation == T.InterpolationMode.BILINEAR
    assert train_transform(p).transforms[0].interpolation == T.InterpolationMode.BICUBIC
    a = _bb().transform(False)(_image(70, 50))
    b = _bb(eval_interpolation="bilinear").transform(False)(_image(70, 50))
    assert not torch.equal(a, b)

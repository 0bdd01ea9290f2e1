"""The feature cache: one backbone pass per (weights, data, split, transform, subset)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from ptcl.backbones import build_backbone
from ptcl.config import BackboneConfig, DatasetConfig
from ptcl.data.datasets import load_dataset
from ptcl.data.features import FeatureCache, cache_key
from ptcl.data.scenario import Scenario
from ptcl.data.server import DataManager


def manager(tmp_path, per_class=4, image_size=None, seed=1993, weights=None):
    splits = load_dataset(DatasetConfig(name="mnist_demo"))
    bb = build_backbone(BackboneConfig(name="vit_tiny_test", image_size=image_size, weights=weights))
    sc = Scenario.build(10, 2, 2, seed)
    return DataManager(splits, sc, {"train": per_class, "test": 2}, seed, bb,
                       FeatureCache(tmp_path / "fc"), torch.device("cpu"), 16, 0, True)


def test_second_run_reads_the_cache(tmp_path):
    a = manager(tmp_path)
    fa = a.frozen_features("train")
    assert (a.cache.misses, a.cache.hits) == (1, 0)
    b = manager(tmp_path)
    fb = b.frozen_features("train")
    assert (b.cache.misses, b.cache.hits) == (0, 1)
    assert torch.equal(fa, fb)
    assert fa.shape == (40, 32)
    # slicing by task never calls the backbone again
    x, y = b.features("train", range(2, 4))
    assert x.shape == (8, 32) and set(y.tolist()) == {2, 3}
    assert b.cache.misses == 0


def test_changes_invalidate(tmp_path):
    bb = manager(tmp_path).backbone
    bb.model.cls_token.data += 1.0
    weights = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    manager(tmp_path).frozen_features("train")
    for kwargs in ({"per_class": 5}, {"image_size": 40}, {"weights": str(weights)}):
        m = manager(tmp_path, **kwargs)
        m.frozen_features("train")
        assert m.cache.misses == 1, kwargs


def test_features_match_a_plain_forward_pass(tmp_path):
    m = manager(tmp_path)
    feats = m.frozen_features("test")
    ds = m.images("test", range(10))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        ref = m.backbone(x)
    order = m.positions("test", range(10))
    torch.testing.assert_close(feats[torch.from_numpy(order)], ref, rtol=1e-5, atol=1e-5)


def test_damaged_entry_is_recomputed(tmp_path):
    m = manager(tmp_path)
    m.frozen_features("train")
    for p in (tmp_path / "fc").glob("*.safetensors"):
        p.write_bytes(b"garbage")
    m2 = manager(tmp_path)
    m2.frozen_features("train")
    assert m2.cache.misses == 1


def test_cache_key_is_stable_and_sensitive():
    assert cache_key({"a": 1, "b": "x"}) == cache_key({"b": "x", "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})

"""Every file in configs/ is a valid run config."""

from pathlib import Path

import pytest

from ptcl.config import build_config, load_file
from ptcl.registry import METHODS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.y*ml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_file_is_valid(path):
    cfg = build_config(load_file(path))
    assert cfg.method.name in METHODS


def test_every_method_has_published_settings():
    names = {p.name for p in CONFIGS}
    for method in METHODS.names():
        for setting in ("cifar100_b0inc10", "imagenetr_b0inc20"):
            assert f"{method}_{setting}.yaml" in names, (method, setting)


def test_every_aper_variant_has_published_settings():
    names = {p.name for p in CONFIGS}
    for variant in ("ssf", "vpt_shallow", "vpt_deep", "finetune"):
        for setting in ("cifar100_b0inc10", "imagenetr_b0inc20"):
            path = f"aper_{variant}_{setting}.yaml"
            assert path in names, path
            assert build_config(load_file(CONFIGS[0].parent / path)).method.tuning == variant

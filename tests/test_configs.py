"""Every file in configs/ is a valid run config; the published settings name their sources."""

import re
from pathlib import Path

import pytest
import timm

from ptcl.backbones.timm_models import ALIASES
from ptcl.config import TrainConfig, build_config, load_file
from ptcl.registry import METHODS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.y*ml"))
PUBLISHED = [p for p in CONFIGS if re.search(r"_(cifar100|imagenetr)_b0inc\d+\.ya?ml$", p.name)]
INC5 = ("ease", "mos", "simplecil", "aper", "aper_ssf", "aper_vpt_shallow", "aper_vpt_deep", "aper_finetune")
"""Methods whose papers report CIFAR-100 at B0 Inc5 (PILOT exps/ease.json, mos.json;
RevisitingCIL exps/*/cifar224_5_5_*.json)."""

_SOURCE_FILE = re.compile(r"[\w./-]+\.(?:json|ya?ml|py|csv|sh)\b")


def _header(path: Path) -> str:
    """The leading comment block of a config file, without the ``#`` marks."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def _source_lines(header: str) -> str:
    """The ``Source:`` paragraph of a header (up to the next ``Key:`` line)."""
    m = re.search(r"^Source:(.*?)(?=^\w[\w ]*:|\Z)", header, re.M | re.S)
    return m.group(1) if m else ""


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
        for setting in ("cifar100_b0inc10", "imagenetr_b0inc20", "cifar100_b0inc5"):
            path = f"aper_{variant}_{setting}.yaml"
            assert path in names, path
            assert build_config(load_file(CONFIGS[0].parent / path)).method.tuning == variant


@pytest.mark.parametrize("stem", INC5)
def test_inc5_settings(stem):
    path = CONFIGS[0].parent / f"{stem}_cifar100_b0inc5.yaml"
    assert path.is_file(), path.name
    cfg = build_config(load_file(path))
    assert (cfg.scenario.init_cls, cfg.scenario.increment) == (5, 5)
    assert cfg.dataset.name == "cifar100"


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_published_header_names_its_sources(path):
    """A ``Source:`` line naming the official file(s), and the backbone in the header."""
    header = _header(path)
    source = _source_lines(header)
    assert _SOURCE_FILE.search(source), f"{path.name}: no 'Source:' line naming a file"
    cfg = build_config(load_file(path))
    assert f"Backbone: {cfg.backbone.name}" in header, f"{path.name}: header does not name {cfg.backbone.name}"


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_published_vit_is_an_alias_or_explicit_tag(path):
    """A ViT is named by a ptcl alias or a timm name with its pretrained tag, never by a bare
    timm name (whose default tag changes between timm versions)."""
    name = build_config(load_file(path)).backbone.name
    if "vit" not in name:
        return
    if name in ALIASES:
        return
    assert "." in name, f"{path.name}: {name} has no pretrained tag"
    assert name in timm.list_pretrained(name), f"{path.name}: timm has no pretrained {name}"


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_published_input_pipeline_is_explicit(path):
    """Each published setting states its input pipeline instead of relying on defaults."""
    raw = load_file(path)
    for key in ("input_norm", "eval_crop_ratio"):
        assert key in raw["backbone"], f"{path.name}: backbone.{key} not set"
    method = build_config(raw).method
    if isinstance(method, TrainConfig) and getattr(method, "tuning", None) != "none":  # it trains
        assert "augment" in raw["method"], f"{path.name}: method.augment not set"

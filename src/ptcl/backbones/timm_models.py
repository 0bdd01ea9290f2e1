"""Backbones from timm: any timm model by name, and tiny random ViTs for tests.

Aliases of the field's two ViT-B/16 checkpoints (the names of LAMDA-PILOT's ``backbone_type``):

* ``vit_base_patch16_224_in21k`` -> ``vit_base_patch16_224.augreg_in21k`` (ViT-B/16-IN21K);
* ``vit_base_patch16_224_in1k`` -> ``vit_base_patch16_224.augreg_in21k_ft_in1k``
  (ViT-B/16-IN1K: IN21K pre-training fine-tuned on IN1K), the weights timm 0.6 served for
  ``vit_base_patch16_224``, which PILOT's and the official exps load (not the later
  ``augreg2_in21k_ft_in1k`` re-fine-tuning, another checkpoint).

Pre-trained weights are downloaded by timm from the Hugging Face hub on first use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import timm
import torch

from ptcl.backbones.base import Backbone, Preprocess
from ptcl.backbones.transforms import IMAGENET_MEAN, IMAGENET_STD
from ptcl.config import BackboneConfig
from ptcl.errors import BackboneError
from ptcl.io import read_state_dict
from ptcl.registry import BACKBONES

log = logging.getLogger(__name__)

ALIASES = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    # the weights of timm 0.6's ``vit_base_patch16_224``, which PILOT's exps load
    "vit_base_patch16_224_in1k": "vit_base_patch16_224.augreg_in21k_ft_in1k",
}


def is_timm_model(name: str) -> bool:
    base = ALIASES.get(name, name).split(".")[0]
    return bool(timm.list_models(base))


def load_weights_file(model: torch.nn.Module, path: str) -> None:
    """Load a local checkpoint (read by :func:`ptcl.io.read_state_dict`) into ``model``; a
    missing classifier is fine (``num_classes=0``), unexpected tensors are ignored."""
    sd = read_state_dict(path, "backbone.weights")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(("head", "fc.", "classifier"))]
    if missing:
        raise BackboneError(f"backbone.weights {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        log.info("ignored %d unexpected tensors in %s", len(unexpected), path)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host name resolves (cheap offline detection)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


@contextlib.contextmanager
def _hub_offline_if_unreachable(pretrained: bool) -> Iterator[None]:
    """Offline: make huggingface_hub read only its local cache instead of retrying for a
    minute, so cached weights still load and missing ones fail at once."""
    if not pretrained or hub_reachable():
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def wrap_timm(model: torch.nn.Module, name: str, image_size: int | None) -> Backbone:
    dc = model.pretrained_cfg or {}
    size = image_size or int(dc.get("input_size", (3, 224, 224))[-1])
    pre = Preprocess(size, tuple(dc.get("mean", (0.5,) * 3)), tuple(dc.get("std", (0.5,) * 3)))
    kind = "vit" if hasattr(model, "blocks") and hasattr(model, "patch_embed") else "cnn"
    return Backbone(model, name, model.num_features, pre, kind=kind)


def build_timm(cfg: BackboneConfig) -> Backbone:
    """Any timm model (``name`` may carry a pretrained tag, e.g. ``.augreg_in21k``)."""
    name = ALIASES.get(cfg.name, cfg.name)
    kwargs: dict = {"num_classes": 0}
    if cfg.image_size is not None:
        kwargs["img_size"] = cfg.image_size
    pretrained = cfg.pretrained and cfg.weights is None
    try:
        with _hub_offline_if_unreachable(pretrained):
            try:
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
            except TypeError:  # CNNs take no img_size
                kwargs.pop("img_size", None)
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneError(f"unknown timm model {cfg.name!r}") from e
        raise BackboneError(_offline_message(cfg.name, e)) from e
    except OSError as e:  # hub unreachable, missing file
        raise BackboneError(_offline_message(cfg.name, e)) from e
    except Exception as e:  # huggingface_hub raises its own error types when offline
        if type(e).__module__.startswith(("huggingface_hub", "requests", "httpx", "urllib3")):
            raise BackboneError(_offline_message(cfg.name, e)) from e
        raise
    if cfg.weights is not None:
        load_weights_file(model, cfg.weights)
    return wrap_timm(model, cfg.name, cfg.image_size)


def _offline_message(name: str, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (
        f"cannot download pretrained weights for backbone {name!r} ({first}); connect to the "
        f"internet once (timm caches them in ~/.cache/huggingface), or pass "
        f"backbone.weights=PATH to a local file, or backbone.pretrained=false"
    )


@BACKBONES.register("vit_tiny_test")
def build_vit_tiny_test(cfg: BackboneConfig) -> Backbone:
    """A tiny randomly initialised ViT (depth 2, dim 32, patch 8, 32 px) for unit tests.

    Its weights come from ``torch.manual_seed(0)`` so every build is identical.
    """
    size = cfg.image_size or 32
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=size,
            patch_size=8, embed_dim=32, depth=2, num_heads=2,
        )
    if cfg.weights is not None:
        load_weights_file(model, cfg.weights)
    return Backbone(model, "vit_tiny_test", 32, Preprocess(size, (0.5,) * 3, (0.5,) * 3), kind="vit")


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """A registered backbone, or any timm model by name."""
    if cfg.name in BACKBONES:
        bb = BACKBONES.get(cfg.name)(cfg)
    elif is_timm_model(cfg.name):
        bb = build_timm(cfg)
    else:
        raise BackboneError(BACKBONES.unknown_message(cfg.name) + ", or any timm model name")
    bb.preprocess = input_options(bb.preprocess, cfg)
    bb.eval()
    bb.fingerprint()  # hash the pre-trained weights now, before any tuning module attaches
    return bb


def input_options(pre: Preprocess, cfg: BackboneConfig) -> Preprocess:
    """``pre`` with the config's ``input_norm`` (``backbone``: unchanged; ``none``: mean 0,
    std 1, i.e. [0, 1] pixels; ``imagenet``: torchvision's ImageNet statistics; ``custom``:
    ``cfg.mean`` / ``cfg.std``), ``eval_crop_ratio`` and ``eval_interpolation``."""
    norms = {
        "backbone": (pre.mean, pre.std),
        "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "custom": (tuple(cfg.mean or ()), tuple(cfg.std or ())),
    }
    mean, std = norms[cfg.input_norm]
    return dataclasses.replace(pre, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                               crop_ratio=float(cfg.eval_crop_ratio), interpolation=cfg.eval_interpolation)

"""Backbones: timm models by name, packaged offline weights, CLIP (open_clip), tiny test models."""

from ptcl.backbones import clip, packaged, timm_models  # noqa: F401  (register the built-in backbones)
from ptcl.backbones.base import Backbone, Preprocess
from ptcl.backbones.clip import CLIPBackbone, TextTower
from ptcl.backbones.timm_models import build_backbone

__all__ = ["Backbone", "CLIPBackbone", "Preprocess", "TextTower", "build_backbone"]

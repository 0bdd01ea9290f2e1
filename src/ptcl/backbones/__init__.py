"""Backbones: timm models by name, packaged offline weights, tiny test ViTs."""

from ptcl.backbones import packaged, timm_models  # noqa: F401  (register the built-in backbones)
from ptcl.backbones.base import Backbone, Preprocess
from ptcl.backbones.timm_models import build_backbone

__all__ = ["Backbone", "Preprocess", "build_backbone"]

"""Classifier heads that grow with the class stream."""

from ptcl.heads.linear import CosineHead, IncrementalLinear

__all__ = ["CosineHead", "IncrementalLinear"]

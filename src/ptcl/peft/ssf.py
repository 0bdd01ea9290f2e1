"""SSF: scale and shift the deep features of a frozen model.

Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model
Tuning", NeurIPS 2022. Used by ADAM/APER and EASE-style baselines in LAMDA-PILOT
(``vit_ssf``).

Each tuned layer's output ``y`` becomes ``y * gamma + beta`` with one ``gamma`` and
``beta`` per channel. Sites, chosen by layer type (the classifier head and other tuning
modules are skipped):

* ViT: the patch-embed output (token dim), every ``nn.Linear`` (qkv, proj, fc1, fc2, ...)
  and every LayerNorm (norm1, norm2, final norm) -- on the last dim, as in the paper code;
* CNN: every ``nn.Conv2d`` and every BatchNorm/GroupNorm -- per channel on dim 1. timm's
  fused ``BatchNormAct2d`` is tuned between the normalisation and its activation (a
  pre-hook on its ``act``), i.e. right after BN as in the paper.

``init="identity"`` (default) starts at ``gamma=1, beta=0`` exactly, so attaching leaves
the output bit-identical. The paper's code initialises ``gamma ~ N(1, 0.02)`` and
``beta ~ N(0, 0.02)``; ask for that with ``init="paper"``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from timm.layers import LayerNorm2d
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import PEFT_METHODS, TuningModule

logger = logging.getLogger(__name__)


class ScaleShift(TuningModule):
    """Per-channel ``gamma`` and ``beta`` applied on ``channel_dim`` (-1 tokens, 1 images)."""

    def __init__(self, channels: int, channel_dim: int, init: str) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if init == "paper":
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale.to(x.dtype), self.shift.to(x.dtype)  # keep autocast dtype
        if self.channel_dim != -1:
            shape = [1, -1] + [1] * (x.dim() - 2)
            scale, shift = scale.view(shape), shift.view(shape)
        return x * scale + shift

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        """Forward hook: scale and shift the layer's output."""
        return self(output) if self.enabled else None

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        """Forward pre-hook (on a fused norm's activation): scale and shift its input."""
        return (self(args[0]), *args[1:]) if self.enabled else None


def _find_sites(model: nn.Module) -> list[tuple[str, nn.Module, int, int, bool]]:
    """``(name, host, channels, channel_dim, before_act)`` for every layer SSF tunes."""
    skip: set[int] = set()
    for m in model.modules():
        if isinstance(m, TuningModule):
            skip.update(id(s) for s in m.modules())
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module):
        skip.update(id(s) for s in head.modules())
    sites = []
    pe = getattr(model, "patch_embed", None)
    if isinstance(pe, nn.Module) and isinstance(getattr(pe, "proj", None), nn.Conv2d):
        sites.append(("patch_embed", pe, pe.proj.out_channels, -1, False))
        skip.update(id(s) for s in pe.modules())
    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Linear):
            sites.append((name, m, m.out_features, -1, False))
        elif isinstance(m, LayerNorm2d):
            sites.append((name, m, m.normalized_shape[0], 1, False))
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            sites.append((name, m, m.normalized_shape[0], -1, False))
        elif isinstance(m, nn.Conv2d):
            sites.append((name, m, m.out_channels, 1, False))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
            channels = m.num_features if hasattr(m, "num_features") else m.num_channels
            fused = isinstance(getattr(m, "act", None), nn.Module)
            sites.append((name, m.act if fused else m, channels, 1, fused))
    return sites


@PEFT_METHODS.register("ssf")
class SSF(TuningModule):
    """SSF scale/shift pairs for every tuned layer, keyed by the layer's module path."""

    def __init__(
        self, model: nn.Module, *, init: Literal["identity", "paper"] = "identity"
    ) -> None:
        super().__init__()
        if init not in ("identity", "paper"):
            raise ConfigError(f"ssf init must be 'identity' or 'paper', got {init!r}")
        self.sites = nn.ModuleDict()
        self._hosts: dict[str, tuple[nn.Module, bool]] = {}
        for name, host, channels, dim, before in _find_sites(model):
            key = name.replace(".", "_")
            if key in self.sites:
                raise ConfigError(f"ssf site name clash for {name!r}")
            self.sites[key] = ScaleShift(channels, dim, init)
            self._hosts[key] = (host, before)
        if not self.sites:
            raise ConfigError(f"ssf found no Linear/Conv2d/norm layer in {type(model).__name__}")
        logger.debug("ssf tunes %d layers", len(self.sites))

    def install(self, model: nn.Module) -> None:
        for key, (host, before) in self._hosts.items():
            site = self.sites[key]
            if before:
                host.register_forward_pre_hook(site._before)
            else:
                host.register_forward_hook(site._after)
        self._hosts = {}

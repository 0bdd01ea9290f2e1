"""AdaptFormer parallel adapters on every ViT block's MLP branch.

Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition",
NeurIPS 2022. Used as the adapter of APER (Zhou et al., IJCV 2024) and EASE
(Zhou et al., CVPR 2024) in LAMDA-PILOT.

Per block, with ``x`` the residual stream entering the MLP branch::

    x' = x + drop_path(ls2(mlp(norm2(x))) + s * up(dropout(relu(down(x)))))

Facts checked in the official code (AdaptFormer ``models/custom_modules.py`` /
``models/adapter.py`` and PILOT's ``vit_adapter``): the adapter input is the residual
stream ``x`` *before* ``norm2`` (not the normed MLP input), with no extra LayerNorm
(``ffn_adapter_layernorm_option="none"``), ``s = 0.1``, bottleneck 64, dropout 0.1, and
"lora" init: ``down`` kaiming-uniform (a=sqrt 5), ``up`` and both biases zero, so the
output at attach time is exactly the pre-trained one.

Placement here: a forward pre-hook on ``block.norm2`` records ``x`` and a forward hook on
``block.ls2`` (the layer scale after the MLP; ``Identity`` in ViT-B, a ``LayerScale`` in
DINOv2) adds the adapter output, so the adapter is parallel to the whole MLP branch as in
the paper and is not multiplied by DINOv2's layer scale. ``input="normed"`` feeds the
adapter the MLP's own (normed) input instead.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import PEFT_METHODS, TuningModule


class Adapter(TuningModule):
    """One bottleneck adapter ``s * up(dropout(relu(down(x))))`` for one block."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        self.scale = scale
        self._x: torch.Tensor | None = None
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(torch.relu(self.down(x)))) * self.scale

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Pre-hook on the layer whose input feeds the adapter: remember that input."""
        if self.enabled:
            self._x = args[0]

    def _add(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        """Forward hook at the end of the MLP branch: add the adapter's output."""
        if not self.enabled:
            self._x = None
            return None
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("adapter input was not captured; is this a pre-norm timm Block?")
        return output + self(x)


@PEFT_METHODS.register("adapter")
class AdapterSet(TuningModule):
    """AdaptFormer adapters, one per ViT block (``adapters[i]`` tunes ``blocks[i]``)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        bottleneck: int = 64,
        scale: float = 0.1,
        dropout: float = 0.1,
        input: Literal["residual", "normed"] = "residual",
    ) -> None:
        super().__init__()
        blocks = getattr(model, "blocks", None)
        if (
            not hasattr(model, "embed_dim")
            or not isinstance(blocks, nn.Sequential | nn.ModuleList)
            or not all(hasattr(b, "norm2") and hasattr(b, "mlp") for b in blocks)
        ):
            raise ConfigError(
                f"adapter needs a timm ViT whose blocks have norm2 and mlp; got {type(model).__name__}"
            )
        if bottleneck <= 0:
            raise ConfigError(f"adapter bottleneck must be > 0, got {bottleneck}")
        if input not in ("residual", "normed"):
            raise ConfigError(f"adapter input must be 'residual' or 'normed', got {input!r}")
        self.input = input
        dim = int(model.embed_dim)
        self.adapters = nn.ModuleList(Adapter(dim, bottleneck, scale, dropout) for _ in blocks)

    def install(self, model: nn.Module) -> None:
        for block, adapter in zip(model.blocks, self.adapters):
            source = block.norm2 if self.input == "residual" else block.mlp
            source.register_forward_pre_hook(adapter._capture)
            getattr(block, "ls2", block.mlp).register_forward_hook(adapter._add)

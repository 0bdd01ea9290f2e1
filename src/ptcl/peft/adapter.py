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

Other adapters are options of the same module: ``site="attn"`` puts it parallel to the
attention branch instead (captured at ``norm1`` / ``attn``, added at ``ls1``),
``activation="gelu"``, ``learn_scale`` (``s`` a learnable scalar starting at ``scale``)
and ``blocks`` (a subset of the blocks; ``adapters[j]`` tunes ``blocks[block_ids[j]]``).
LAE's adapter (Gao et al., ICCV 2023; github.com/gqk/LAE ``libml/model/pet/adapter.py``,
``config/vit_adapter.yaml``, ``main.py`` ``attach_pets_vit``: ``attach_adapter(attn=...)``
with ``mode="parallel"``) is ``site="attn", input="normed", activation="gelu",
bottleneck=5, scale=1.0, learn_scale=True, dropout=0.0, blocks=[0, 1, 2, 3, 4]``: the
same "lora" init, so it too starts at the pre-trained output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import PEFT_METHODS, TuningModule
from ptcl.peft.lora import tuned_blocks


class Adapter(TuningModule):
    """One bottleneck adapter ``s * up(dropout(act(down(x))))`` for one block (``act``: ReLU,
    or GELU with ``activation="gelu"``; ``s`` a learnable scalar with ``learn_scale``)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float, activation: str = "relu",
                 learn_scale: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.scale: float | nn.Parameter = nn.Parameter(torch.tensor(float(scale))) if learn_scale else scale
        self._x: torch.Tensor | None = None
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale

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
    """AdaptFormer adapters, one per tuned ViT block (``adapters[j]`` tunes
    ``blocks[block_ids[j]]``; by default every block, ``adapters[i]`` tunes ``blocks[i]``)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        bottleneck: int = 64,
        scale: float = 0.1,
        dropout: float = 0.1,
        input: Literal["residual", "normed"] = "residual",
        site: Literal["mlp", "attn"] = "mlp",
        activation: Literal["relu", "gelu"] = "relu",
        learn_scale: bool = False,
        blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        vit_blocks = getattr(model, "blocks", None)
        if (
            not hasattr(model, "embed_dim")
            or not isinstance(vit_blocks, nn.Sequential | nn.ModuleList)
            or not all(hasattr(b, "norm1") and hasattr(b, "attn") and hasattr(b, "norm2") and hasattr(b, "mlp")
                       for b in vit_blocks)
        ):
            raise ConfigError(
                f"adapter needs a timm ViT whose blocks have norm1, attn, norm2 and mlp; got {type(model).__name__}"
            )
        if bottleneck <= 0:
            raise ConfigError(f"adapter bottleneck must be > 0, got {bottleneck}")
        if input not in ("residual", "normed"):
            raise ConfigError(f"adapter input must be 'residual' or 'normed', got {input!r}")
        if site not in ("mlp", "attn"):
            raise ConfigError(f"adapter site must be 'mlp' or 'attn', got {site!r}")
        if activation not in ("relu", "gelu"):
            raise ConfigError(f"adapter activation must be 'relu' or 'gelu', got {activation!r}")
        self.input, self.site, self.activation = input, site, activation
        self.block_ids = tuned_blocks(blocks, len(vit_blocks), "adapter")
        dim = int(model.embed_dim)
        self.adapters = nn.ModuleList(Adapter(dim, bottleneck, scale, dropout, activation, learn_scale)
                                      for _ in self.block_ids)

    def install(self, model: nn.Module) -> None:
        for b, adapter in zip(self.block_ids, self.adapters):
            block = model.blocks[b]
            if self.site == "mlp":
                source = block.norm2 if self.input == "residual" else block.mlp
                sink = getattr(block, "ls2", block.mlp)
            else:
                source = block.norm1 if self.input == "residual" else block.attn
                sink = getattr(block, "ls1", block.attn)
            source.register_forward_pre_hook(adapter._capture)
            sink.register_forward_hook(adapter._add)


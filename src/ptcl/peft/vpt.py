"""Visual Prompt Tuning, shallow and deep, on an unmodified timm ViT.

Jia et al., "Visual Prompt Tuning", ECCV 2022. Used as the VPT variant of APER
(Zhou et al., IJCV 2024) in LAMDA-PILOT, with 5 prompt tokens.

Token layout inside the blocks (``P = model.num_prefix_tokens``: the CLS token and any
register tokens, e.g. DINOv2-reg)::

    [prefix tokens (P)] [prompts (n)] [patch tokens]

* ``vpt_shallow``: a forward pre-hook on ``blocks[0]`` inserts ``n`` prompt tokens after
  the prefix tokens; they then flow through all blocks.
* ``vpt_deep``: every block ``i`` gets its own prompts: block 0 inserts them, each later
  block replaces the previous block's prompt outputs with its own (VPT-Deep).

A forward hook on the last block removes the prompt tokens again, so the final norm,
every pooling mode (CLS ``token``, ``avg`` over patches) and ``forward_features`` see the
usual token layout; the prompts act only through attention, as in the paper.

Prompts are initialised ``U(-v, v)`` with ``v = sqrt(6 / (3 * patch_h * patch_w + dim))``
(the paper code's Xavier-uniform). Blocks called with an attention mask are not
supported while prompts are active. ``forward_intermediates`` of timm is not prompt-aware.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import PEFT_METHODS, TuningModule


class VisualPrompts(TuningModule):
    """Prompt tokens ``prompts`` of shape ``(depth or 1, num_prompts, dim)``."""

    deep: bool = False

    def __init__(self, model: nn.Module, *, num_prompts: int = 5, dropout: float = 0.0) -> None:
        super().__init__()
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(
            model, "num_prefix_tokens"
        ):
            raise ConfigError(
                f"VPT needs a timm ViT (blocks, num_prefix_tokens); got {type(model).__name__}"
            )
        if num_prompts <= 0:
            raise ConfigError(f"VPT num_prompts must be > 0, got {num_prompts}")
        for m in model.modules():
            if isinstance(m, VisualPrompts):
                raise ConfigError("a VPT module is already attached; detach it first")
        dim = int(model.embed_dim)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
        self.num_prompts = num_prompts
        self.start = int(model.num_prefix_tokens)
        self.prompts = nn.Parameter(torch.empty(len(blocks) if self.deep else 1, num_prompts, dim))
        v = math.sqrt(6.0 / (3 * math.prod(patch) + dim))
        nn.init.uniform_(self.prompts, -v, v)
        self.drop = nn.Dropout(dropout)

    def install(self, model: nn.Module) -> None:
        blocks = list(model.blocks)
        for i, block in enumerate(blocks[: len(self.prompts)]):
            block.register_forward_pre_hook(functools.partial(self._insert, i), with_kwargs=True)
        blocks[-1].register_forward_hook(self._strip)

    def _insert(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Pre-hook on block ``index``: insert (block 0) or replace (deep) the prompts."""
        if not self.enabled:
            return None
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise NotImplementedError("VPT does not support attention masks")
        x, s, n = args[0], self.start, self.num_prompts
        p = self.drop(self.prompts[index]).to(x.dtype).expand(x.shape[0], -1, -1)
        rest = x[:, s:] if index == 0 else x[:, s + n :]
        return (torch.cat([x[:, :s], p, rest], dim=1), *args[1:]), kwargs

    def _strip(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        """Hook on the last block: drop the prompt tokens before the final norm and pool."""
        if not self.enabled:
            return None
        s, n = self.start, self.num_prompts
        return torch.cat([output[:, :s], output[:, s + n :]], dim=1)


@PEFT_METHODS.register("vpt_shallow")
class VPTShallow(VisualPrompts):
    """VPT-Shallow: ``num_prompts`` tokens inserted at the input of block 0 only."""

    deep = False


@PEFT_METHODS.register("vpt_deep")
class VPTDeep(VisualPrompts):
    """VPT-Deep: fresh ``num_prompts`` tokens at the input of every block."""

    deep = True

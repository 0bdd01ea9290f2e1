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
usual token layout; the prompts act only through attention, as in the paper. Insertion,
replacement and stripping are the shared :class:`~ptcl.peft.tokens.TokenInserter`; this
module holds only VPT's prompts and which block gets which.

``init="xavier"`` (default) draws the prompts ``U(-v, v)`` with
``v = sqrt(6 / (3 * patch_h * patch_w + dim))`` (the VPT paper code's Xavier-uniform,
KMnP/vpt ``src/models/vit_prompt/vit.py``); ``init="zeros"`` starts them at 0, as APER's
code (zhoudw-zdw/RevisitingCIL ``convs/vpt.py`` and LAMDA-PILOT ``backbone/vpt.py``:
``Prompt_Tokens = nn.Parameter(torch.zeros(...))``, never re-initialised). Blocks called
with an attention mask are not supported while prompts are active.
``forward_intermediates`` of timm is not prompt-aware.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import PEFT_METHODS
from ptcl.peft.tokens import TokenInserter


class VisualPrompts(TokenInserter):
    """Prompt tokens ``prompts`` of shape ``(depth or 1, num_prompts, dim)``.

    ``init``: ``xavier`` (the VPT paper code's Xavier-uniform) or ``zeros`` (APER's code).
    Raises :class:`ConfigError` for ``num_prompts <= 0``, an unknown ``init`` or a second
    VPT module on the same model.
    """

    deep: bool = False

    def __init__(
        self, model: nn.Module, *, num_prompts: int = 5, dropout: float = 0.0,
        init: Literal["xavier", "zeros"] = "xavier",
    ) -> None:
        super().__init__(model, "VPT")
        if num_prompts <= 0:
            raise ConfigError(f"VPT num_prompts must be > 0, got {num_prompts}")
        if init not in ("xavier", "zeros"):
            raise ConfigError(f"VPT init must be 'xavier' or 'zeros', got {init!r}")
        for m in model.modules():
            if isinstance(m, VisualPrompts):
                raise ConfigError("a VPT module is already attached; detach it first")
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
        self.num_prompts = num_prompts
        self.prompts = nn.Parameter(torch.zeros(self.depth if self.deep else 1, num_prompts, self.dim))
        if init == "xavier":
            v = math.sqrt(6.0 / (3 * math.prod(patch) + self.dim))
            nn.init.uniform_(self.prompts, -v, v)
        self.drop = nn.Dropout(dropout)

    def block_tokens(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Block ``i``'s own prompts ``(num_prompts, dim)`` (dropout applied): at block 0,
        and at every block when deep (replacing the previous block's prompt outputs)."""
        return self.drop(self.prompts[i]) if i < len(self.prompts) else None


@PEFT_METHODS.register("vpt_shallow")
class VPTShallow(VisualPrompts):
    """VPT-Shallow: ``num_prompts`` tokens inserted at the input of block 0 only."""

    deep = False


@PEFT_METHODS.register("vpt_deep")
class VPTDeep(VisualPrompts):
    """VPT-Deep: fresh ``num_prompts`` tokens at the input of every block."""

    deep = True

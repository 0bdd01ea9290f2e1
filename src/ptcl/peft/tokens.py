"""One mechanism for prompt tokens in the token sequence of an unmodified timm ViT.

Layout at the input of a block (``P = model.num_prefix_tokens``: the CLS token and any
register tokens, e.g. DINOv2-reg)::

    [prefix tokens (P)] [prompt tokens (n)] [patch tokens]

:class:`TokenInserter` is the base of every tuning module that puts tokens there; a
subclass says only *which* tokens a block gets (:meth:`TokenInserter.block_tokens`):

* :class:`ptcl.peft.vpt.VisualPrompts` (VPT shallow / deep): its own learned prompts, at
  block 0 (shallow) or a fresh set at every block (deep);
* :class:`ptcl.peft.prompting.PromptInjector` (L2P, DAP, ...): the per-batch prompts a
  method hands to ``use(tokens=...)``: tensors, or callables of the block's input (DAP's
  prompts, generated from each block's tokens).

How it works: a forward pre-hook on every block asks ``block_tokens(i, x)`` for block
``i``'s input ``x`` ``(B, P + n + N, D)``. ``None`` leaves the sequence as it is (prompts
inserted earlier flow on through the block); a tensor ``(B, m, D)`` or ``(m, D)`` (shared
by the batch) replaces the ``n`` prompts inserted earlier, if any, right after the prefix
tokens; ``m = 0`` removes them. The number in the sequence is tracked (reset at block 0),
so a hook on the last block strips them again before the final norm (unless
:meth:`TokenInserter.keeps_tokens`), and every timm pooling (CLS ``token``, ``avg``) and
``forward_features`` see the usual layout: the prompts act only through attention, as in
the papers. Prompts get no position embedding (they enter after ``_pos_embed``), as in the
official L2P (JAX) and VPT code. ``enabled = False`` (:func:`ptcl.peft.disabled`) makes
every hook pass through. Blocks called with an attention mask are not supported while
prompts are inserted; timm's ``forward_intermediates`` is not prompt-aware.

Prefix-tuning (DualPrompt, CODA-Prompt: ``PromptInjector.use(prefixes=...)``) does not use
this mechanism, because a prefix is not a token of the sequence: it enters one block's
attention as extra keys/values only, written *after* the q/k/v projection (not projected,
not normalised by ``norm1``), it has no query row, no output row, no MLP pass and is not
carried to the next block. It therefore needs hooks on the attention and its ``qkv``
linear (see :mod:`ptcl.peft.prompting`), not on the block's token sequence; what the two
share is the ViT check (:func:`vit_blocks`) and :func:`batched`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import TuningModule


def vit_blocks(model: nn.Module, what: str) -> list[nn.Module]:
    """The blocks of ``model``, a timm ViT (``blocks`` and ``num_prefix_tokens``); raises
    :class:`ConfigError` naming ``what`` (the tuning method) for anything else."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(model, "num_prefix_tokens"):
        raise ConfigError(f"{what} needs a timm ViT (blocks, num_prefix_tokens); got {type(model).__name__}")
    return list(blocks)


def batched(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, L, D)`` or ``(L, D)`` (shared by the batch) as ``(B, L, D)`` in ``x``'s
    dtype, where ``B = x.shape[0]`` (a view where possible)."""
    t = t.to(x.dtype)
    return t.expand(x.shape[0], -1, -1) if t.ndim == 2 else t


class TokenInserter(TuningModule):
    """Base of tuning modules that insert prompt tokens after the prefix tokens (see the
    module docstring). Subclasses implement :meth:`block_tokens`; :meth:`install` registers
    the hooks (a subclass that needs more hooks calls it first)."""

    def __init__(self, model: nn.Module, what: str) -> None:
        super().__init__()
        blocks = vit_blocks(model, what)
        self.depth = len(blocks)
        self.start = int(model.num_prefix_tokens)
        self.dim = int(model.embed_dim)
        self._inserted = 0  # prompt tokens currently in the sequence (during a forward)

    # -- what subclasses decide -------------------------------------------------------------
    def block_tokens(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Block ``i``'s prompts ``(B, m, D)`` / ``(m, D)`` given its input ``x`` (with the
        earlier prompts, at :attr:`token_slice`); ``None``: leave the sequence as it is."""
        return None

    def keeps_tokens(self) -> bool:
        """Whether the prompts stay in the last block's output (default: stripped)."""
        return False

    # -- the sequence ----------------------------------------------------------------------
    @property
    def num_inserted(self) -> int:
        """Prompt tokens currently in the sequence (valid during and after a forward)."""
        return self._inserted

    @property
    def token_slice(self) -> slice:
        """Where the prompt tokens sit in the sequence (in the output with ``keeps_tokens``)."""
        return slice(self.start, self.start + self._inserted)

    def without_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, P + n + N, D)`` without the ``n`` prompt tokens now inserted."""
        if not self._inserted:
            return x
        s = self.start
        return torch.cat([x[:, :s], x[:, s + self._inserted :]], dim=1)

    # -- hooks -----------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        blocks = list(model.blocks)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(self._insert, i), with_kwargs=True)
        blocks[-1].register_forward_hook(self._strip)

    def _insert(self, i: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Pre-hook on block ``i``: replace the prompt tokens with :meth:`block_tokens`."""
        if not self.enabled:
            return None
        if i == 0:
            self._inserted = 0
        x = args[0]
        t = self.block_tokens(i, x)
        if t is None:
            return None
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise NotImplementedError(f"{type(self).__name__}: prompt tokens do not support attention masks")
        t, s = batched(t, x), self.start
        x = torch.cat([x[:, :s], t, x[:, s + self._inserted :]], dim=1)
        self._inserted = t.shape[1]
        return (x, *args[1:]), kwargs

    def _strip(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        """Hook on the last block: remove the prompt tokens (unless :meth:`keeps_tokens`)."""
        if not self.enabled or self.keeps_tokens() or not self._inserted:
            return None
        return self.without_tokens(output)

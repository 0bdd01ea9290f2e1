"""LoRA on the fused q/k/v projection of an unmodified timm ViT.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. The maths is
that of Hugging Face peft's ``LoraLayer`` (``tuners/lora/layer.py``): a tuned projection
``W`` computes ``x W^T + b + s * (x A^T) B^T`` with ``A`` of shape ``(r, in)`` drawn
kaiming-uniform (``a = sqrt 5``, the default of ``nn.Linear``), ``B`` of shape ``(out, r)``
zero, and ``s = alpha / r`` -- so the output at attach time is exactly the pre-trained one.

Which weights, as in LAE's ``KVLoRA`` (Gao et al., ICCV 2023; github.com/gqk/LAE
``libml/model/pet/lora.py``, ``config/vit_lora.yaml``): each tuned block's ``attn.qkv``
gets one ``(A, B)`` pair per *target* -- the key and the value projections
(``targets="kv"``; ``"qkv"`` also tunes the query), each of rank ``rank`` (LAE: 5), i.e.
``W_k + s_k B_k A_k`` and ``W_v + s_v B_v A_v``. LAE's ``Scaler(None)`` makes each ``s``
a learnable scalar starting at 1 (``learn_scale=True``; it starts at ``alpha / rank``);
HF peft keeps ``s`` fixed (``learn_scale=False``, the default here). LAE tunes blocks
0-4 (``adapt_blocks``), chosen by ``blocks`` (default: every block).

The official code merges the update into the weight (``F.linear(x, W + s B A, b)``); here a
forward hook on ``attn.qkv`` adds ``s (x A^T) B^T`` to the q/k/v output of the targets,
which is the same map (up to float rounding) without touching ``W``. Under
:func:`ptcl.peft.disabled` the hook passes through.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import PEFT_METHODS, TuningModule
from ptcl.peft.tokens import vit_blocks

_SLOTS = {"q": 0, "k": 1, "v": 2}


def tuned_blocks(blocks: Sequence[int] | None, depth: int, what: str) -> list[int]:
    """``blocks`` checked against a ViT of ``depth`` blocks (``None``: all), in the given
    order. Raises :class:`ConfigError` for an empty list, a repeated or out-of-range index."""
    if blocks is None:
        return list(range(depth))
    out = [int(b) for b in blocks]
    if not out:
        raise ConfigError(f"{what} blocks must name at least one block (or be null: all {depth})")
    bad = [b for b in out if not 0 <= b < depth]
    if bad:
        raise ConfigError(f"{what} blocks {bad} do not exist in a ViT of depth {depth}; use indices 0-{depth - 1}")
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} blocks {out} repeat a block")
    return out


def fused_qkv(block: nn.Module, i: int, what: str) -> nn.Linear:
    """Block ``i``'s ``attn.qkv``, a fused q/k/v ``nn.Linear``; else :class:`ConfigError`."""
    qkv = getattr(getattr(block, "attn", None), "qkv", None)
    if not isinstance(qkv, nn.Linear) or qkv.out_features % 3:
        raise ConfigError(f"{what} needs blocks[{i}].attn.qkv (a fused q/k/v nn.Linear)")
    return qkv


class LoRALayer(nn.Module):
    """The LoRA factors of one ``qkv`` projection: ``A`` ``(T, r, in)``, ``B`` ``(T, out, r)``
    and the scales ``(T,)`` of its ``T`` targets (a parameter when learnable)."""

    def __init__(self, in_features: int, out_features: int, targets: int, rank: int, scale: float,
                 learn_scale: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(targets, rank, in_features))
        self.B = nn.Parameter(torch.zeros(targets, out_features, rank))
        for t in range(targets):  # each (r, in) matrix as nn.Linear's weight (fan_in = in)
            nn.init.kaiming_uniform_(self.A.data[t], a=math.sqrt(5))
        s = torch.full((targets,), float(scale))
        if learn_scale:
            self.scale = nn.Parameter(s)
        else:
            self.register_buffer("scale", s, persistent=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s_t (x A_t^T) B_t^T`` for every target: ``(..., in) -> (..., T, out)``."""
        low = torch.einsum("...i,tri->...tr", x, self.A.to(x.dtype))
        return torch.einsum("...tr,tor->...to", low, self.B.to(x.dtype)) * self.scale.to(x.dtype)[:, None]


@PEFT_METHODS.register("lora")
class LoRA(TuningModule):
    """LoRA on ``attn.qkv`` of the ``blocks`` (default all) of a timm ViT: per target of
    ``targets`` (``"kv"``: key and value, LAE's ``KVLoRA``; ``"qkv"``: all three) the update
    ``(alpha / rank) B A`` of rank ``rank``; ``alpha`` defaults to ``rank`` (scale 1, LAE's
    initial ``Scaler``); ``learn_scale`` makes each scale a learnable scalar (LAE).

    Raises :class:`ConfigError` for a model without fused ``qkv`` projections, ``rank < 1``,
    ``alpha <= 0``, unknown ``targets`` or bad ``blocks``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        rank: int = 5,
        alpha: float | None = None,
        targets: Literal["kv", "qkv"] = "kv",
        learn_scale: bool = False,
        blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        all_blocks = vit_blocks(model, "lora")
        if int(rank) < 1:
            raise ConfigError(f"lora rank must be >= 1, got {rank}")
        if alpha is not None and not alpha > 0:
            raise ConfigError(f"lora alpha must be > 0 (or null: alpha = rank), got {alpha}")
        if targets not in ("kv", "qkv"):
            raise ConfigError(f"lora targets must be 'kv' or 'qkv', got {targets!r}")
        self.rank, self.targets = int(rank), targets
        self.slots = [_SLOTS[c] for c in targets]
        self.block_ids = tuned_blocks(blocks, len(all_blocks), "lora")
        scale = (self.rank if alpha is None else float(alpha)) / self.rank
        layers = []
        for b in self.block_ids:
            qkv = fused_qkv(all_blocks[b], b, "lora")
            layers.append(LoRALayer(qkv.in_features, qkv.out_features // 3, len(self.slots), self.rank, scale,
                                    learn_scale))
        self.layers = nn.ModuleList(layers)

    def install(self, model: nn.Module) -> None:
        for j, b in enumerate(self.block_ids):
            model.blocks[b].attn.qkv.register_forward_hook(functools.partial(self._add, j))

    def _add(self, j: int, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        """Forward hook on a tuned ``qkv``: add the low-rank update to the targets' outputs."""
        if not self.enabled:
            return None
        delta = self.layers[j].delta(args[0])  # (..., T, A)
        parts = list(out.unflatten(-1, (3, out.shape[-1] // 3)).unbind(-2))
        for t, slot in enumerate(self.slots):
            parts[slot] = parts[slot] + delta[..., t, :]
        return torch.stack(parts, dim=-2).flatten(-2)

"""Prefix tuning with LAE's attention compensation, on an unmodified timm ViT.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021, in the
form LAE uses (Gao et al., "A Unified Continual Learning Framework with General
Parameter-Efficient Tuning", ICCV 2023; github.com/gqk/LAE ``libml/model/pet/prefix.py``,
``libml/model/pet/prompt.py``, ``libml/model/backbone/vit.py`` ``Attention.forward``,
``config/vit_prefix.yaml``).

Each tuned block (LAE: blocks 0-4) owns ``length`` (LAE: 10) learnable key prefixes
``P_k`` and value prefixes ``P_v`` of the attention width ``A``, each drawn ``U(0, 0.01)``
and multiplied by a learnable scalar starting at 1 (LAE's ``Prompt`` with
``Scaler(None)``: ``key_scale`` / ``val_scale`` null; ``learn_scale=False`` fixes it at
1). They are appended to the keys and values *after* the q/k/v projection (split into the
heads like the keys; no query, no output row). No reparametrisation: the official prefix
has no MLP or low-rank compression of the prefixes (PILOT's ``down_sample_dim`` is the
adapter's bottleneck).

Per head, with ``q`` a query, ``K, V`` the block's own keys and values and ``lambda`` the
share of the softmax over ``[K; P_k]`` that falls on the prefixes::

    A_r = softmax(q K^T / sqrt d) V            # the attention without prefixes
    A_p = softmax(q P_k^T / sqrt d) P_v        # the attention over the prefixes alone
    lambda = sum_p e^{q P_k^T / sqrt d} / (sum e^{q K^T / sqrt d} + sum_p e^{q P_k^T / sqrt d})

* ``compensatory=True`` (LAE's default, ``Prefix.compensate``): after the softmax the
  weights of the prefix positions are divided by their sum ``lambda``, so the output is
  ``(1 - lambda) A_r + A_p``;
* ``compensatory=False``: plain prefix-tuning, ``(1 - lambda) A_r + lambda A_p``, which is
  the attention over ``[K; P_k]``, ``[V; P_v]`` (DualPrompt's Pre-T).

So the output at attach time is *not* the pre-trained one (neither in LAE: its prefixes
start non-zero, and even zero prefixes take ``lambda`` of the attention).

How (hooks only): forward hooks on ``attn.q_norm`` and ``attn.k_norm`` (``Identity``
outside qk-norm ViTs) record the block's ``q`` and ``K`` as its attention uses them (after
any hook on ``qkv``, e.g. LoRA); timm's own attention (fused SDPA or not) computes ``A_r``;
a forward pre-hook on ``attn.norm`` (the layer after the attention core, ``Identity``
unless ``scale_norm``) replaces ``A_r`` by the formula above, with ``lambda`` from the
logsumexp of ``q K^T`` (one extra ``N x N`` logit product per tuned block). The prefix keys
pass ``attn.k_norm`` as the keys do. Why not :class:`ptcl.peft.prompting.PromptInjector`'s
prefix rows (the mechanism of DualPrompt and CODA-Prompt): those become part of timm's
softmax, whose normaliser never leaves the fused kernel, and the compensation needs it;
``compensatory=False`` gives the injector's output (tested to float tolerance).

Not supported: attention masks, attention dropout (``attn_drop`` > 0: LAE's compensation
comes after the dropout), and two prefix modules active on one attention at once (their
hooks do not compose into one attention over both prefix sets; ``ptcl.experts.Experts``
activates one at a time).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import PEFT_METHODS, TuningModule
from ptcl.peft.lora import fused_qkv, tuned_blocks
from ptcl.peft.tokens import vit_blocks

_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "norm", "num_heads", "head_dim", "scale")


def mix_prefix_attention(
    a_r: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    scale: float,
    compensatory: bool,
) -> torch.Tensor:
    """The attention output with prefixes, from the one without (see the module docstring).

    ``a_r``: ``(B, H, N, d)`` attention output over the block's own keys; ``q``, ``k``:
    ``(B, H, N, d)`` its queries and keys (unscaled); ``pk``, ``pv``: ``(H, L, d)`` the
    prefixes; ``scale``: the logit scale (``d ** -0.5``). The logits are normalised in float32
    (as fused attention kernels accumulate). Returns ``(B, H, N, d)``:
    ``(1 - lambda) a_r + A_p`` (``compensatory``) or ``(1 - lambda) a_r + lambda A_p``."""
    lse_r = torch.logsumexp(torch.matmul(q, k.transpose(-2, -1)).float() * scale, dim=-1, keepdim=True)
    sp = torch.matmul(q, pk.transpose(-2, -1)).float() * scale  # (B, H, N, L), normalised in float32
    lse_p = torch.logsumexp(sp, dim=-1, keepdim=True)
    a_p = torch.matmul(torch.softmax(sp, dim=-1).to(pv.dtype), pv)
    keep = torch.sigmoid(lse_r - lse_p).to(a_r.dtype)  # 1 - lambda
    return keep * a_r + (a_p if compensatory else torch.sigmoid(lse_p - lse_r).to(a_p.dtype) * a_p)


@PEFT_METHODS.register("prefix")
class Prefix(TuningModule):
    """Key/value prefixes of ``length`` tokens in the attention of ``blocks`` (default all) of
    a timm ViT, LAE's compensated form by default (module docstring).

    ``keys`` / ``values``: ``(len(blocks), length, A)``, ``U(0, 0.01)``; ``key_scale`` /
    ``value_scale``: ``(len(blocks),)``, 1 (parameters with ``learn_scale``). Raises
    :class:`ConfigError` for a model whose attention lacks the parts used (fused ``qkv``,
    ``q_norm``, ``k_norm``, ``norm``: timm's ``Attention``), attention dropout, ``length <
    1`` or bad ``blocks``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        length: int = 10,
        compensatory: bool = True,
        learn_scale: bool = True,
        blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        all_blocks = vit_blocks(model, "prefix")
        if int(length) < 1:
            raise ConfigError(f"prefix length must be >= 1, got {length}")
        self.length, self.compensatory = int(length), bool(compensatory)
        self.block_ids = tuned_blocks(blocks, len(all_blocks), "prefix")
        widths = set()
        for b in self.block_ids:
            fused_qkv(all_blocks[b], b, "prefix")
            attn = all_blocks[b].attn
            missing = [p for p in _ATTN_PARTS if not hasattr(attn, p)]
            if missing:
                raise ConfigError(f"prefix needs timm's Attention in blocks[{b}] (missing {missing})")
            if getattr(getattr(attn, "attn_drop", None), "p", 0.0) > 0:
                raise ConfigError(f"prefix: blocks[{b}] has attention dropout {attn.attn_drop.p}; LAE's "
                                  "compensation is defined without it (build the ViT with attn_drop_rate=0)")
            widths.add(int(attn.num_heads) * int(attn.head_dim))
        if len(widths) != 1:
            raise ConfigError(f"prefix needs one attention width across the tuned blocks, got {sorted(widths)}")
        width, n = widths.pop(), len(self.block_ids)
        self.keys = nn.Parameter(torch.empty(n, self.length, width).uniform_(0.0, 0.01))
        self.values = nn.Parameter(torch.empty(n, self.length, width).uniform_(0.0, 0.01))
        if learn_scale:
            self.key_scale = nn.Parameter(torch.ones(n))
            self.value_scale = nn.Parameter(torch.ones(n))
        else:
            self.register_buffer("key_scale", torch.ones(n), persistent=False)
            self.register_buffer("value_scale", torch.ones(n), persistent=False)
        self._q: dict[int, torch.Tensor] = {}
        self._k: dict[int, torch.Tensor] = {}
        self._norming = False  # while the prefix keys pass k_norm

    def prefixes(self, j: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tuned block ``j``'s (scaled) key and value prefixes, ``(heads, length, A / heads)`` each."""
        k = (self.keys[j] * self.key_scale[j]).unflatten(-1, (heads, -1)).transpose(0, 1)
        v = (self.values[j] * self.value_scale[j]).unflatten(-1, (heads, -1)).transpose(0, 1)
        return k, v

    # -- hooks ------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        for j, b in enumerate(self.block_ids):
            attn = model.blocks[b].attn
            attn.register_forward_pre_hook(self._check_call, with_kwargs=True)
            attn.q_norm.register_forward_hook(functools.partial(self._record, self._q, j))
            attn.k_norm.register_forward_hook(functools.partial(self._record, self._k, j))
            attn.norm.register_forward_pre_hook(functools.partial(self._mix, j, attn))

    def _check_call(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.enabled and (kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or len(args) > 1):
            raise NotImplementedError("prefix tuning does not support attention masks")

    def _record(self, store: dict[int, torch.Tensor], j: int, module: nn.Module, args: tuple[Any, ...],
                out: torch.Tensor) -> None:
        """Forward hook on ``q_norm`` / ``k_norm``: keep the queries / keys of this forward."""
        if self.enabled and not self._norming:
            store[j] = out

    def _mix(self, j: int, attn: nn.Module, module: nn.Module, args: tuple[Any, ...]) -> Any:
        """Pre-hook on ``attn.norm``: the attention output with this block's prefixes."""
        if not self.enabled:
            return None
        q, k = self._q.pop(j, None), self._k.pop(j, None)
        if q is None or k is None:
            raise RuntimeError("prefix: the queries/keys of this attention were not recorded; is it timm's Attention?")
        x = args[0]
        b, n, _ = x.shape
        heads = int(attn.num_heads)
        pk, pv = self.prefixes(j, heads)
        self._norming = True
        try:
            pk = attn.k_norm(pk.to(k.dtype))
        finally:
            self._norming = False
        a_r = x.unflatten(-1, (heads, -1)).transpose(1, 2)
        out = mix_prefix_attention(a_r, q, k, pk, pv.to(x.dtype), float(attn.scale), self.compensatory)
        return (out.transpose(1, 2).reshape(b, n, -1).to(x.dtype), *args[1:])

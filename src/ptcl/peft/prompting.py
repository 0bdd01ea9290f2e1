"""Per-sample prompt tokens and attention prefixes on an unmodified timm ViT.

The shared machinery of the prompt-pool methods (L2P, DualPrompt, CODA-Prompt, DAP). It
follows DESIGN.md's "never copy the ViT": one :class:`PromptInjector` (a parameter-free
:class:`~ptcl.peft.base.TuningModule`) registers forward hooks on the timm model, and the
method hands it the prompts of the current batch::

    inj = attach_prompting(backbone.model)            # once, in the learner's __init__
    with inj.use(tokens=p):                           # p: (B, L, D), inserted at block 0
        feats = backbone(images)                      # CLS pooling, prompts stripped
    with inj.use(tokens=p, keep_tokens=True):
        toks = backbone.forward_tokens(images)        # prompts kept after the final norm
        pooled = toks[:, inj.token_slice].mean(1)     # L2P's "prompt" head
    with inj.use(prefixes={2: (k, v)}):               # k, v: (B, Lp, D), prefix-tuning
        feats = backbone(images)

The trainable prompts (pools, keys, generators) belong to the method, not to the
injector, so a method decides per batch which prompts each sample gets (key-query
matching, task identity, attention over components, ...). Outside ``use`` (and under
:func:`ptcl.peft.disabled`) every hook passes through: the model computes its plain
pre-trained output bit for bit.

**Prompt-tuning** (``tokens``): ``{block: (B, L, D)}`` or one tensor (= ``{0: t}``). At
the input of each listed block the prompts inserted earlier (if any) are replaced by the
new ones, right after the prefix tokens (CLS and any register tokens, ``P``)::

    [prefix tokens (P)] [prompts (L)] [patch tokens]

so ``{0: t}`` is L2P / VPT-shallow and ``{i: t_i for every block}`` is VPT-deep; in a
block not listed the earlier prompts flow on, and a ``None`` value removes them (that
block and the next unlisted ones see none). A value may also be a callable
``f(x) -> (B, L, D)`` of the block's input sequence ``x`` (with the earlier prompts still
in it, at ``x[:, inj.token_slice]``; ``inj.without_tokens(x)`` drops them), for prompts
generated from the current tokens (DAP's instance-level prompts). The insertion itself is
the shared :class:`~ptcl.peft.tokens.TokenInserter` (also VPT's): no position embedding
(as in the official L2P JAX code, where prompts are prepended at the first encoder
layer), stripped after the last block so every timm pooling works unchanged;
``keep_tokens=True`` keeps them for methods that pool the prompt outputs.

**Prefix-tuning** (``prefixes``): ``{block: (k, v)}`` with ``k, v`` of shape
``(B, Lp, A)`` or ``(Lp, A)`` (``A`` = the attention width, ``num_heads * head_dim`` =
``D`` for ViTs; head ``h`` uses channels ``h*head_dim:(h+1)*head_dim``). The block's
attention then attends over ``[k; K]`` and ``[v; V]`` (DualPrompt / CODA-Prompt's
Pre-T; the official code concatenates the prefix after the q/k/v projections). It is
done with three hooks and timm's own ``Attention.forward`` (fused SDPA or not): a
pre-hook appends ``Lp`` zero rows to the attention input, a hook on ``attn.qkv``
overwrites the key/value of those rows with ``k``/``v``, and a hook on the attention
output drops the ``Lp`` extra rows. The real queries thus attend over ``N + Lp`` keys;
the extra query rows cost ``Lp / N`` more attention work and are discarded. Any attention
with a fused ``qkv`` linear reshaped by the input length works (timm ``Attention`` of
ViT-B/16, DINOv2, ...). ``k_norm`` (qk-norm models only) is also applied to the prefix
keys. Blocks called with an attention mask are not supported while prompts are active.

Both kinds can be used together. Shapes are checked on entry to ``use``. Why prefixes
are hooks on the attention and not tokens of the sequence: see :mod:`ptcl.peft.tokens`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ptcl.errors import ConfigError
from ptcl.peft.base import PREFIX
from ptcl.peft.tokens import TokenInserter, batched

log = logging.getLogger(__name__)

NAME = "prompting"
Prefix = tuple[torch.Tensor, torch.Tensor]
TokenFn = Callable[[torch.Tensor], torch.Tensor]


class PromptInjector(TokenInserter):
    """Hooks that insert per-batch prompt tokens and attention prefixes (no parameters)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, "prompting")
        for i, b in enumerate(model.blocks):
            qkv = getattr(getattr(b, "attn", None), "qkv", None)
            if not isinstance(qkv, nn.Linear) or qkv.out_features % 3:
                raise ConfigError(f"prompting needs blocks[{i}].attn.qkv (a fused q/k/v nn.Linear)")
        self.attn_dim = model.blocks[0].attn.qkv.out_features // 3
        self._tokens: dict[int, torch.Tensor | TokenFn | None] = {}
        self._prefixes: dict[int, Prefix] = {}
        self._keep = False
        self._real: dict[int, int] = {}  # block -> sequence length before prefix padding

    # -- the method-facing API -----------------------------------------------------------
    @contextmanager
    def use(
        self,
        tokens: torch.Tensor | Mapping[int, torch.Tensor | TokenFn | None] | None = None,
        prefixes: Mapping[int, Prefix] | None = None,
        keep_tokens: bool = False,
    ) -> Iterator[PromptInjector]:
        """Within the block, forwards of the model use these prompts (see module doc).

        ``tokens``: ``(B, L, D)`` / ``(L, D)`` for block 0, or ``{block: tensor, callable
        of the block input, or None (remove the earlier prompts)}``.
        ``prefixes``: ``{block: (k, v)}``, each ``(B, Lp, A)`` or ``(Lp, A)``.
        ``keep_tokens``: leave the prompt tokens in the output sequence (at
        :attr:`token_slice`) instead of stripping them after the last block.
        Nested uses restore the outer prompts on exit.
        """
        if tokens is not None and not isinstance(tokens, Mapping):
            tokens = {0: tokens}
        new_tokens = {
            int(b): t if t is None or callable(t) else self._check(t, self.dim, f"tokens[{b}]")
            for b, t in (tokens or {}).items()
        }
        new_prefixes = {}
        for b, kv in (prefixes or {}).items():
            if len(kv) != 2:
                raise ValueError(f"prefixes[{b}] must be a (key, value) pair")
            k, v = (self._check(t, self.attn_dim, f"prefixes[{b}]") for t in kv)
            if k.shape[-2] != v.shape[-2]:
                raise ValueError(f"prefixes[{b}]: key length {k.shape[-2]} != value length {v.shape[-2]}")
            new_prefixes[int(b)] = (k, v)
        for b in (*new_tokens, *new_prefixes):
            if not 0 <= b < self.depth:
                raise ValueError(f"block index {b} out of range for a {self.depth}-block ViT")
        saved = (self._tokens, self._prefixes, self._keep)
        self._tokens, self._prefixes, self._keep = new_tokens, new_prefixes, keep_tokens
        try:
            yield self
        finally:
            self._tokens, self._prefixes, self._keep = saved

    @staticmethod
    def _check(t: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if t.ndim not in (2, 3) or t.shape[-1] != width:
            raise ValueError(f"{what} must have shape (B, L, {width}) or (L, {width}); got {tuple(t.shape)}")
        return t

    # -- prompt tokens (inserted by TokenInserter's hooks) ---------------------------------
    def block_tokens(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """The ``use(tokens=...)`` entry of block ``i`` (called with the block's input)."""
        if i not in self._tokens:
            return None
        t = self._tokens[i]
        if t is None:
            return x.new_zeros(x.shape[0], 0, self.dim)
        return self._check(t(x), self.dim, f"tokens[{i}](x)") if callable(t) else t

    def keeps_tokens(self) -> bool:
        return self._keep

    # -- attention prefixes ----------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        super().install(model)
        for i, block in enumerate(model.blocks):
            block.attn.register_forward_pre_hook(functools.partial(self._pad, i), with_kwargs=True)
            block.attn.qkv.register_forward_hook(functools.partial(self._write_prefix, i))
            block.attn.register_forward_hook(functools.partial(self._unpad, i))

    def _pad(self, i: int, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Pre-hook on block ``i``'s attention: append one zero row per prefix position."""
        if not self.enabled or i not in self._prefixes:
            return None
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or len(args) > 1:
            raise NotImplementedError("attention prefixes do not support attention masks")
        x = args[0]
        n = self._prefixes[i][0].shape[-2]
        self._real[i] = x.shape[1]
        return (torch.cat([x, x.new_zeros(x.shape[0], n, x.shape[2])], dim=1),), kwargs

    def _write_prefix(self, i: int, qkv: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        """Hook on ``attn.qkv``: the padded rows' keys/values become the prefix."""
        if not self.enabled or i not in self._prefixes:
            return None
        n, a = self._real[i], out.shape[-1] // 3
        k, v = (batched(t, out) for t in self._prefixes[i])
        tail = torch.cat([out[:, n:, :a], k, v], dim=-1)
        return torch.cat([out[:, :n], tail], dim=1)

    def _unpad(self, i: int, attn: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        """Hook on the attention output: drop the padded rows."""
        if not self.enabled or i not in self._prefixes:
            return None
        return out[:, : self._real.pop(i)]


def attach_prompting(model: nn.Module) -> PromptInjector:
    """The model's :class:`PromptInjector`, attached (as ``tuning_prompting``) if needed.

    ``model`` is a timm ViT or a ptcl ``Backbone``. :func:`ptcl.peft.detach` with
    ``name="prompting"`` removes it; :func:`ptcl.peft.disabled` bypasses it.
    """
    host = getattr(model, "model", model) if not hasattr(model, "blocks") else model
    existing = getattr(host, PREFIX + NAME, None)
    if isinstance(existing, PromptInjector):
        return existing
    inj = PromptInjector(host)
    host.add_module(PREFIX + NAME, inj)
    inj.install(host)
    log.debug("attached the prompt injector to %s", type(host).__name__)
    return inj


# ------------------------------------------------------------------------------ key-query


class PromptPool(nn.Module):
    """``size`` prompts of shape ``prompt_shape`` with one learnable key each (L2P-style).

    ``prompts``: ``(size, *prompt_shape)``; ``keys``: ``(size, key_dim)``, both drawn
    ``U(low, high)`` (L2P's PyTorch port since its commit 173a6af, PILOT and DualPrompt:
    ``U(-1, 1)``; L2P's JAX code: flax's default ``U(0, 0.01)``).
    Queries are matched to keys by cosine similarity.
    """

    def __init__(self, size: int, prompt_shape: tuple[int, ...], key_dim: int, low: float = 0.0, high: float = 1.0) -> None:
        super().__init__()
        self.size = size
        self.prompts = nn.Parameter(torch.empty(size, *prompt_shape).uniform_(low, high))
        self.keys = nn.Parameter(torch.empty(size, key_dim).uniform_(low, high))

    def similarity(self, query: torch.Tensor, limit: int | None = None) -> torch.Tensor:
        """``(B, size)`` cosine similarities of queries to the keys (first ``limit`` keys)."""
        keys = self.keys if limit is None else self.keys[:limit]
        return cosine_similarity(query, keys)

    def select(self, query: torch.Tensor, k: int, batchwise: bool = False, limit: int | None = None) -> torch.Tensor:
        """``(B, k)`` indices of the best-matching keys (see :func:`select_topk`)."""
        return select_topk(self.similarity(query, limit), k, batchwise)

    def pull(self, query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """L2P's surrogate term: sum of ``cos(query, key)`` over the selected keys, averaged
        over the batch (the loss subtracts ``coeff * pull``). Only the selected keys get
        gradient (the query is the frozen, detached feature)."""
        return surrogate_pull(query, self.keys, idx)


def cosine_similarity(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(B, M)`` cosine similarities of ``query`` ``(B, D)`` to ``keys`` ``(M, D)``."""
    return nn.functional.normalize(query, dim=-1) @ nn.functional.normalize(keys, dim=-1).t()


def select_topk(sim: torch.Tensor, k: int, batchwise: bool = False) -> torch.Tensor:
    """``(B, k)`` indices of the ``k`` largest similarities per row.

    ``batchwise``: every sample gets the ``k`` indices chosen most often in the batch
    (ties: the smaller index), as the official L2P/DualPrompt code does with
    ``batchwise_prompt`` (it makes a test prediction depend on the rest of the batch).
    """
    idx = sim.topk(k, dim=1).indices
    if batchwise:
        counts = torch.bincount(idx.flatten(), minlength=sim.shape[1])
        top = torch.sort(counts, descending=True, stable=True).indices[:k]
        idx = top.unsqueeze(0).expand(sim.shape[0], -1)
    return idx


def surrogate_pull(query: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``sum_{i, j} cos(query_i, keys[idx_ij]) / B`` (L2P's ``reduce_sim``)."""
    q = nn.functional.normalize(query.detach(), dim=-1)
    kn = nn.functional.normalize(keys, dim=-1)[idx]  # (B, k, D)
    return (kn * q.unsqueeze(1)).sum() / query.shape[0]

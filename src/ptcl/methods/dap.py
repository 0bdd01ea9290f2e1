"""DAP: instance-level prompts generated from each block's tokens, modulated per task.

Jung, Han, Bang, Song. "Generating Instance-level Prompts for Rehearsal-free Continual
Learning." ICCV 2023. (DAP: the official code's "domain-adaptive prompts".)

Implemented as in the official code (naver-ai/dap-cl, ``src/models/vit_dap/vit.py``,
``src/engine/trainer.py``, ``configs/base-dap.yaml`` and ``configs/dap/*.yaml``):

* a pool of ``pool_size = 10`` task keys (``U(-v, v)``, ``v = sqrt(6 / (3 p^2 + D))``)
  and task embeddings (``nn.Embedding(10, task_emb_dim)``); training on task ``t`` uses
  key/embedding ``t`` for every image and pulls key ``t`` toward the queries; at test the
  task is the one whose key is most cosine-similar to the query (the frozen CLS feature
  after the final norm, from the feature cache);
* in every prompted block (all blocks; ImageNet-R: all but the last) a prompt generator
  *shared by all tasks*: LayerNorm of the block input (prefix + patch tokens, prompts of
  the previous block removed), a linear map over the token axis (``N tokens ->
  num_tokens`` prompts, zero-initialised, trained in the first task only), then FiLM
  ``gamma * x + beta`` per channel with ``(gamma, beta) = Linear(task embedding)``, each
  divided by its (detached) L2 norm. The prompts are inserted right after the prefix
  (CLS) tokens (prompt-tuning), replacing the previous block's; blocks not prompted see
  none;
* loss: cross-entropy over the current task's classes minus ``pull_coeff *`` (sum of
  ``cos(q, k_t)``)/B (``SIM_LAMBDA``), gradient-norm clipping 1.0;
* CIFAR-100: 10 prompts, task embedding 16, Adam (amsgrad, betas 0.9/0.9) lr 0.01,
  constant lr, batch 128, 5 epochs, ``pull_coeff = 0.1``. ImageNet-R: 30 prompts,
  embedding 64, SGD lr 0.25 (momentum 0.9), 20 epochs, ``pull_coeff = 2.0``, and at test
  the logits outside the predicted task's classes are masked (``task_logit_mask``).

Deviations: the prompts depend on the current block's tokens, which the shared
:class:`~ptcl.peft.prompting.PromptInjector` cannot take (it needs the prompts before the
forward), so DAP inserts its own tokens with two forward hooks (:class:`GeneratedPrompts`)
that pass through outside :meth:`DAP.prompted_features`. The official test-time task
choice is batch-wise (the batch's most frequent key, also used for the logit mask) and
searches all 10 keys; here it is per image among the seen tasks' keys
(``batchwise_prompt: true`` restores the batch majority). The official optimiser and its
state live across all tasks; the engine re-creates it per task. The classifier is the
toolbox's growing linear head (official: one 100-way head with kaiming-normal fan-out
weights and a constant bias). The query is the cached feature of the un-augmented image
(see :mod:`ptcl.methods.l2p`). No dropout, as in the official model: its configs set
``MODEL.DAP.DROPOUT`` and ``MODEL.LINEAR.DROPOUT``, but ``vit_dap/vit.py`` never reads the
first, the head ``MLP`` with ``MLP_NUM = 0`` has no hidden layer for the second to apply
to, and the encoder is kept in eval mode.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.config import _positive
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.l2p import PromptPoolConfig, PromptPoolLearner
from ptcl.peft.prompting import cosine_similarity, select_topk, surrogate_pull
from ptcl.registry import METHODS

log = logging.getLogger(__name__)


@dataclass
class DAPConfig(PromptPoolConfig):
    name: str = "dap"
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.9])  # official BETA1 / BETA2
    amsgrad: bool = True
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant"] = "constant"
    clip_grad: float | None = 1.0
    pull_coeff: float = 0.1  # SIM_LAMBDA
    num_tokens: int = 10  # NUM_DAP_TOKENS
    task_emb_dim: int = 16  # TASK_EMB
    pool_size: int = 10  # keys / task embeddings: at most this many tasks
    layers: list[int] | None = None  # prompted blocks; None: all
    freeze_generator: bool = True  # the token map is trained in the first task only
    task_logit_mask: bool = False  # test: only the predicted task's logits (ImageNet-R)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "num_tokens", "task_emb_dim", "pool_size")
        if self.layers is not None and (
            not self.layers or len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers)
        ):
            raise ConfigError(f"method.layers must be distinct block indices >= 0 (or null: all), got {self.layers}")


class PromptGenerator(nn.Module):
    """One block's generator: ``(B, N, D)`` tokens and ``(B, E)`` task embeddings ->
    ``(B, num_tokens, D)`` prompts."""

    def __init__(self, seq_len: int, dim: int, num_tokens: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.down = nn.Linear(seq_len, num_tokens)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.film = nn.Linear(emb_dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, train_down: bool = True) -> torch.Tensor:
        w, b = self.down.weight, self.down.bias
        if not train_down:  # frozen token map (no gradient)
            w, b = w.detach(), b.detach()
        down = F.linear(self.norm(x).transpose(1, 2), w, b)  # (B, D, num_tokens)
        gamma, beta = self.film(emb).chunk(2, dim=-1)
        gamma = gamma / gamma.norm(dim=1, keepdim=True).detach()
        beta = beta / beta.norm(dim=1, keepdim=True).detach()
        return (gamma[:, :, None] * down + beta[:, :, None]).transpose(1, 2)


class GeneratedPrompts:
    """Forward hooks that insert each prompted block's generated prompts (no parameters).

    Active only inside :meth:`use` (the task embeddings of the batch); elsewhere every
    hook passes through and the model computes its plain output.
    """

    def __init__(self, model: nn.Module, generators: nn.ModuleDict) -> None:
        self.generators = generators
        self.start = int(model.num_prefix_tokens)
        self.seq_len = self.start + int(model.patch_embed.num_patches)
        self.emb: torch.Tensor | None = None
        self.train_down = False
        self.inserted = 0
        blocks = list(model.blocks)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(self._insert, i))
        blocks[-1].register_forward_hook(self._strip)

    @contextmanager
    def use(self, emb: torch.Tensor, train_down: bool = False) -> Iterator[None]:
        """Within the block, forwards insert prompts modulated by ``emb`` ``(B, E)``;
        ``train_down``: the token maps get gradients."""
        self.emb, self.train_down, self.inserted = emb, train_down, 0
        try:
            yield
        finally:
            self.emb, self.inserted = None, 0

    def _insert(self, i: int, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if self.emb is None:
            return None
        x, s = args[0], self.start
        if i == 0:
            self.inserted = 0
        x = torch.cat([x[:, :s], x[:, s + self.inserted :]], dim=1)
        self.inserted = 0
        gen = self.generators[str(i)] if str(i) in self.generators else None
        if gen is not None:
            if x.shape[1] != self.seq_len:
                raise ValueError(f"DAP's generators take {self.seq_len} tokens, block {i} got {x.shape[1]}")
            p = gen(x, self.emb, self.train_down).to(x.dtype)
            x = torch.cat([x[:, :s], p, x[:, s:]], dim=1)
            self.inserted = p.shape[1]
        return (x, *args[1:])

    def _strip(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        if self.emb is None or not self.inserted:
            return None
        s, n = self.start, self.inserted
        self.inserted = 0
        return torch.cat([out[:, :s], out[:, s + n :]], dim=1)


@METHODS.register("dap")
class DAP(PromptPoolLearner):
    config_cls = DAPConfig
    test_options = {"num_tokens": 2, "task_emb_dim": 4}

    def __init__(self, cfg: DAPConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        model = backbone.model
        depth, dim = len(model.blocks), int(model.embed_dim)
        layers = list(range(depth)) if cfg.layers is None else cfg.layers
        if max(layers) >= depth:
            raise ConfigError(f"method.layers {layers} exceed the backbone's {depth} blocks")
        seq = int(model.num_prefix_tokens) + int(model.patch_embed.num_patches)
        self.generators = nn.ModuleDict(
            {str(i): PromptGenerator(seq, dim, cfg.num_tokens, cfg.task_emb_dim) for i in layers}
        )
        patch = model.patch_embed.patch_size
        v = math.sqrt(6.0 / (3 * patch[0] * patch[1] + dim))
        self.keys = nn.Parameter(torch.empty(cfg.pool_size, backbone.feature_dim).uniform_(-v, v))
        self.task_emb = nn.Embedding(cfg.pool_size, cfg.task_emb_dim)
        self.register_buffer("task_ends", torch.zeros(0, dtype=torch.long))
        self.generated = GeneratedPrompts(model, self.generators)
        scenario = getattr(ctx, "scenario", None)  # None in unit tests with a fake context
        if scenario is not None:
            self.check_pool_size(scenario.num_tasks)

    def check_pool_size(self, num_tasks: int) -> None:
        """Raise :class:`ConfigError` unless there is a task key and embedding for each of ``num_tasks``."""
        if num_tasks > self.cfg.pool_size:
            raise ConfigError(
                f"method.pool_size={self.cfg.pool_size} is smaller than the scenario's {num_tasks} tasks: "
                f"dap keeps one task key and task embedding per task; set method.pool_size={num_tasks} (or more)"
            )

    def before_task(self, task: Task) -> None:
        self.check_pool_size(max(task.num_tasks, task.index + 1))
        super().before_task(task)
        self.task_ends = torch.cat([self.task_ends, self.task_ends.new_tensor([task.end])])

    def trains_down(self, task: Task | None) -> bool:
        """Whether the generators' token maps are trained in ``task`` (None: test)."""
        return task is not None and (task.index == 0 or not self.cfg.freeze_generator)

    def trainable(self) -> list:  # type: ignore[override]
        """The optimiser's parameters (the token maps only in the first task)."""
        frozen = self.cfg.freeze_generator and int(self.seen_tasks) > 1
        return [p for n, p in self.named_parameters()
                if not n.startswith("backbone.") and not (frozen and n.startswith("generators.") and ".down." in n)]

    def task_index(self, query: torch.Tensor) -> torch.Tensor:
        """``(B,)`` task of each query: the most cosine-similar key of a seen task."""
        sim = cosine_similarity(query, self.keys[: int(self.seen_tasks)])
        return select_topk(sim, 1, self.cfg.batchwise_prompt)[:, 0]

    def features_for(self, images: torch.Tensor, idx: torch.Tensor, train_down: bool = False) -> torch.Tensor:
        """Features of the ViT prompted with the generators modulated by tasks ``idx``."""
        with self.generated.use(self.task_emb(idx), train_down):
            return self.backbone(images)

    def prompted_features(
        self, images: torch.Tensor, query: torch.Tensor, task: Task | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.tasks_of(query, task)
        feats = self.features_for(images, idx, self.trains_down(task))
        return feats, surrogate_pull(query, self.keys, idx[:, None])

    def predict(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        idx = self.task_index(x[1])
        logits = self.head(self.features_for(x[0], idx))
        if self.cfg.task_logit_mask:
            ends = self.task_ends.to(idx.device)
            starts = torch.cat([ends.new_zeros(1), ends[:-1]])
            cls = torch.arange(logits.shape[1], device=logits.device)
            outside = (cls[None] < starts[idx, None]) | (cls[None] >= ends[idx, None])
            logits = logits.masked_fill(outside, -1e11)
        return logits

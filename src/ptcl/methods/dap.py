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

The prompts enter through the shared :class:`~ptcl.peft.prompting.PromptInjector`: DAP
hands it one callable per block (:meth:`DAP.block_prompts`) that generates the prompts
from the block's input; insertion, replacement and stripping are
:class:`~ptcl.peft.tokens.TokenInserter`'s.

Deviations: the official test-time task choice is batch-wise (the batch's most frequent
key, also used for the logit mask) and searches all 10 keys; here it is per image among
the seen tasks' keys (``batchwise_prompt: true`` restores the batch majority). The official optimiser and its
state live across all tasks; the engine re-creates it per task. The classifier is the
toolbox's growing linear head (official: one 100-way head with kaiming-normal fan-out
weights and a constant bias). The query is the cached feature of the un-augmented image
(see :mod:`ptcl.methods.prompt_pool`). No dropout, as in the official model: its configs set
``MODEL.DAP.DROPOUT`` and ``MODEL.LINEAR.DROPOUT``, but ``vit_dap/vit.py`` never reads the
first, the head ``MLP`` with ``MLP_NUM = 0`` has no hidden layer for the second to apply
to, and the encoder is kept in eval mode.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.prompt_pool import PromptPoolConfig, PromptPoolLearner
from ptcl.options import option
from ptcl.peft.prompting import TokenFn
from ptcl.registry import METHODS

_OFFICIAL = "official DAP configs/base-dap.yaml + configs/dap/cifar.yaml (naver-ai/dap-cl)"


@dataclass
class DAPConfig(PromptPoolConfig):
    name: str = option("dap")
    epochs: int = option(5, source=_OFFICIAL)
    lr: float = option(0.01, source=_OFFICIAL)
    batch_size: int = option(128, source=_OFFICIAL)
    optimizer: Literal["sgd", "adam", "adamw"] = option("adam", source=_OFFICIAL)
    betas: list[float] = option(factory=lambda: [0.9, 0.9], source=f"{_OFFICIAL} (BETA1, BETA2)")
    amsgrad: bool = option(True, source=_OFFICIAL)
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant"] = option("constant", source=_OFFICIAL)
    clip_grad: float | None = option(1.0, source=_OFFICIAL)
    pull_coeff: float = option(0.1, source=f"{_OFFICIAL} (SIM_LAMBDA; ImageNet-R: 2.0)")
    num_tokens: int = option(10, "prompts generated per prompted block", gt=0,
                             source=f"{_OFFICIAL} (NUM_DAP_TOKENS; ImageNet-R: 30)")
    task_emb_dim: int = option(16, "width of each task's embedding (the FiLM input)", gt=0,
                               source=f"{_OFFICIAL} (TASK_EMB; ImageNet-R: 64)")
    pool_size: int = option(10, "task keys and task embeddings: at least the scenario's number of tasks", gt=0,
                            source="official DAP src/models/vit_dap/vit.py (10 keys, nn.Embedding(10, ...))")
    layers: list[int] | None = option(None, "prompted blocks, distinct; null: all", ge=0,
                                      source=f"{_OFFICIAL} (all blocks; ImageNet-R: all but the last)")
    freeze_generator: bool = option(True, "train the generators' token maps in the first task only",
                                    source="official DAP code (naver-ai/dap-cl)")
    task_logit_mask: bool = option(False, "at test, keep only the logits of the predicted task's classes",
                                   source=f"{_OFFICIAL} (off; ImageNet-R: on)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
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


@METHODS.register("dap")
class DAP(PromptPoolLearner):
    """DAP: instance-level prompts generated from each block's tokens, modulated per task (Jung et al., ICCV 2023)."""

    config_cls = DAPConfig
    test_options = {"num_tokens": 2, "task_emb_dim": 4}
    per_task = "task key and task embedding"

    def __init__(self, cfg: DAPConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        model = backbone.model
        depth, dim = len(model.blocks), int(model.embed_dim)
        layers = list(range(depth)) if cfg.layers is None else cfg.layers
        if max(layers) >= depth:
            raise ConfigError(f"method.layers {layers} exceed the backbone's {depth} blocks")
        self.seq_len = int(model.num_prefix_tokens) + int(model.patch_embed.num_patches)
        self.generators = nn.ModuleDict(
            {str(i): PromptGenerator(self.seq_len, dim, cfg.num_tokens, cfg.task_emb_dim) for i in layers}
        )
        patch = model.patch_embed.patch_size
        v = math.sqrt(6.0 / (3 * patch[0] * patch[1] + dim))
        self.keys = nn.Parameter(torch.empty(cfg.pool_size, backbone.feature_dim).uniform_(-v, v))
        self.task_emb = nn.Embedding(cfg.pool_size, cfg.task_emb_dim)
        self.register_buffer("task_ends", torch.zeros(0, dtype=torch.long))

    def before_task(self, task: Task) -> None:
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

    def task_keys(self) -> torch.Tensor:
        """``(pool_size, D)``: the task keys (the test-time task is the best match)."""
        return self.keys

    def block_prompts(self, emb: torch.Tensor, train_down: bool = False) -> dict[int, TokenFn | None]:
        """The injector's ``tokens`` for task embeddings ``emb`` ``(B, E)``: in a prompted
        block, its generator's ``(B, num_tokens, D)`` prompts made from the block's input
        without the previous block's prompts; ``None`` (no prompts) in the other blocks.
        ``train_down``: the token maps get gradients."""
        return {i: functools.partial(self._generate, i, emb, train_down) if str(i) in self.generators else None
                for i in range(self.prompting.depth)}

    def _generate(self, i: int, emb: torch.Tensor, train_down: bool, x: torch.Tensor) -> torch.Tensor:
        x = self.prompting.without_tokens(x)
        if x.shape[1] != self.seq_len:
            raise ValueError(f"DAP's generators take {self.seq_len} tokens, block {i} got {x.shape[1]}")
        return self.generators[str(i)](x, emb, train_down)

    def features_for(self, images: torch.Tensor, idx: torch.Tensor, train_down: bool = False) -> torch.Tensor:
        """``(B, D)`` features of the ViT prompted with the generators modulated by tasks ``idx``."""
        return self.prompted_backbone(images, tokens=self.block_prompts(self.task_emb(idx), train_down))

    def prompted_features(
        self, images: torch.Tensor, query: torch.Tensor, task: Task | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.tasks_of(query, task)
        feats = self.features_for(images, idx, self.trains_down(task))
        return feats, self.task_pull(query, idx)

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

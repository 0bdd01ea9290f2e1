"""L2P: a pool of prompts chosen per image by key-query matching, on a frozen ViT.

Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy, Pfister. "Learning to Prompt for
Continual Learning." CVPR 2022 (arXiv:2112.08654).

Implemented as in the official code (google-research/l2p) and its PyTorch port
(JH-LEE-KR/l2p-pytorch, whose CIFAR-100 defaults LAMDA-PILOT's ``exps/l2p.json`` copies):

* a pool of ``M = 10`` prompts of length ``L = 5`` with learnable keys, all ``U(0, 1)``;
* the query is the frozen pre-trained ViT's CLS feature (after the final norm), read from
  the feature cache for the un-augmented image (the official code queries the augmented
  view; see :mod:`ptcl.methods.prompt_pool`);
* the ``N = 5`` keys of highest cosine similarity select ``N`` prompts, inserted as
  ``N * L`` tokens at the input of block 0 (prompt-tuning, no position embedding, as in
  the JAX code); the classifier reads the mean of the prompt tokens' outputs after the
  final norm (``head_type="prompt"``, ``pool: prompt``; ``pool: token`` reads the CLS);
* loss: cross-entropy over the current task's classes only (``train_mask``: the logits
  of old classes are masked, as in the official code) minus ``0.1 * sum cos(q, k_sel)``
  (the surrogate loss pulling the selected keys toward the query; coefficient 0.1 of the
  PyTorch port and PILOT, 1.0 in the JAX config);
* Adam, lr ``0.03 * 16 / 256 = 0.001875``, batch 16, 5 epochs per task, constant lr,
  gradient-norm clipping 1.0, optimiser re-created every task.

Deviation: the official code selects prompts *batch-wise* (every image of a batch gets
the batch's most frequent ``N`` prompts), also at test time, which makes a prediction
depend on the other test images. Here selection is per image; ``batchwise_prompt: true``
restores the official behaviour (training and test). The JAX CIFAR config uses
``L = 10, N = 4``; the paper and the PyTorch port ``L = 5, N = 5``.

What L2P shares with DualPrompt / CODA-Prompt / DAP (cached query, growing head, masked
cross-entropy, pull term, options) is :mod:`ptcl.methods.prompt_pool`; this file holds the
prompt pool with top-``N`` selection and the prompt-token pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.prompt_pool import PromptPoolConfig, PromptPoolLearner
from ptcl.options import option
from ptcl.peft.prompting import PromptPool
from ptcl.registry import METHODS

_PAPER_PORT = "L2P paper and PyTorch port JH-LEE-KR/l2p-pytorch"


@dataclass
class L2PConfig(PromptPoolConfig):
    name: str = option("l2p")
    pool_size: int = option(10, "number M of prompts (and keys) in the pool", gt=0, source=f"{_PAPER_PORT} (M = 10)")
    prompt_length: int = option(5, "tokens L per prompt", gt=0,
                                source=f"{_PAPER_PORT} (L = 5; the JAX CIFAR config: 10)")
    top_k: int = option(5, "prompts N selected per image (<= pool_size); N * L tokens enter block 0", gt=0,
                        source=f"{_PAPER_PORT} (N = 5; the JAX CIFAR config: 4)")
    pool: Literal["prompt", "token"] = option(
        "prompt", "classifier input: prompt = mean of the prompt tokens' outputs, token = the CLS token",
        source="official L2P code (head_type='prompt')")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k > self.pool_size:
            raise ConfigError(f"method.top_k ({self.top_k}) must be <= method.pool_size ({self.pool_size})")


@METHODS.register("l2p")
class L2P(PromptPoolLearner):
    """L2P: a key-query prompt pool selects prompts per image (Wang et al., CVPR 2022)."""

    config_cls = L2PConfig

    def __init__(self, cfg: L2PConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        d = backbone.model.embed_dim
        self.pool = PromptPool(cfg.pool_size, (cfg.prompt_length, d), d, 0.0, 1.0)

    def select(self, query: torch.Tensor) -> torch.Tensor:
        """``(B, top_k)`` indices of the prompts for each query."""
        return self.pool.select(query, self.cfg.top_k, self.cfg.batchwise_prompt)

    def prompted_features(
        self, images: torch.Tensor, query: torch.Tensor, task: Task | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.select(query)
        tokens = self.pool.prompts[idx].flatten(1, 2)  # (B, top_k * length, D)
        inj = self.prompting
        if self.cfg.pool == "token":
            feats = self.prompted_backbone(images, tokens=tokens)
        else:
            with inj.use(tokens=tokens, keep_tokens=True):
                out = self.backbone.forward_tokens(images)
                feats = self.backbone.model.fc_norm(out[:, inj.token_slice].mean(1))
        return feats, self.pool.pull(query, idx)

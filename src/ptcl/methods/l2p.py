"""L2P: a pool of prompts chosen per image by key-query matching, on a frozen ViT.

Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy, Pfister. "Learning to Prompt for
Continual Learning." CVPR 2022 (arXiv:2112.08654).

Implemented as in the official code (google-research/l2p) and its PyTorch port
(JH-LEE-KR/l2p-pytorch, whose CIFAR-100 defaults LAMDA-PILOT's ``exps/l2p.json`` copies):

* a pool of ``M = 10`` prompts of length ``L = 5`` with learnable keys, all drawn
  ``U(-1, 1)`` (``prompt_init: uniform``: the PyTorch port's ``prompt.py``, which moved
  from ``U(0, 1)`` to ``U(-1, 1)`` in commit 173a6af, and PILOT's ``backbone/prompt.py``;
  the JAX code's flax ``uniform()`` draws ``U(0, 0.01)``, ``prompt_init: jax``);
* the query is the frozen pre-trained ViT's CLS feature (after the final norm), read from
  the feature cache for the un-augmented image (the official code queries the augmented
  view; see :mod:`ptcl.methods.prompt_pool`);
* the ``N = 5`` keys of highest cosine similarity select ``N`` prompts, inserted as
  ``N * L`` tokens at the input of block 0 (prompt-tuning, no position embedding, as in
  the JAX code); the classifier reads the mean of the prompt tokens' outputs after the
  final norm (``head_type="prompt"``, ``pool: prompt``; ``pool: token`` reads the CLS);
* while training, selection is *batch-wise* (``batchwise_train: true``, every official
  config's ``batchwise_prompt``): every image of a batch gets the ``N`` prompts chosen most
  often over the batch's per-image top-``N`` lists (ties: the smaller prompt id, as JAX's
  ``lax.top_k``; :func:`~ptcl.peft.prompting.select_topk`), so only those ``N`` prompts
  and keys are trained on the batch;
* loss: cross-entropy over the current task's classes only (``train_mask``: the logits
  of old classes are masked, as in the official code) minus ``0.1 * sum cos(q, k_sel)``
  (the surrogate loss pulling the selected keys toward the query; coefficient 0.1 of the
  PyTorch port and PILOT, 1.0 in the JAX config);
* Adam, lr ``0.03 * 16 / 256 = 0.001875``, batch 16, 5 epochs per task, constant lr,
  gradient-norm clipping 1.0, optimiser re-created every task.

Deviation: the official code selects batch-wise also at test time, which makes a
prediction depend on the other test images. Here test-time selection is per image unless
``batchwise_prompt: true`` (see :mod:`ptcl.methods.prompt_pool`). The JAX CIFAR config
uses ``L = 10, N = 4``; the paper and the PyTorch port ``L = 5, N = 5``.

What L2P shares with DualPrompt / CODA-Prompt / DAP (cached query, growing head, masked
cross-entropy, pull term, options) is :mod:`ptcl.methods.prompt_pool`; this file holds the
prompt pool with top-``N`` selection and the prompt-token pooling.

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/l2p_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
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
_PORT_PILOT = "PyTorch port JH-LEE-KR/l2p-pytorch and LAMDA-PILOT"

#: ``prompt_init`` -> ``(low, high)`` of the uniform draw of the prompts and keys.
PROMPT_INIT: dict[str, tuple[float, float]] = {"uniform": (-1.0, 1.0), "uniform01": (0.0, 1.0), "jax": (0.0, 0.01)}


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
    prompt_init: Literal["uniform", "uniform01", "jax"] = option(
        "uniform", "initial prompts and keys: uniform = U(-1, 1), uniform01 = U(0, 1) (the PyTorch port before "
        "its commit 173a6af), jax = U(0, 0.01) (the JAX code's flax uniform())",
        source=f"{_PORT_PILOT}: prompt.py nn.init.uniform_(p, -1, 1) for initializer/prompt_key_init 'uniform'")
    batchwise_train: bool = option(
        True, "while training, every image of a batch gets the batch's most frequent top_k prompts; false: "
        "chosen per image (test-time selection: batchwise_prompt)",
        source=f"official L2P JAX configs, {_PORT_PILOT} configs (batchwise_prompt: true)")

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
        d = backbone.model.embed_dim  # prompts: token width; keys: the query's (CLIP: its projection)
        self.pool = PromptPool(cfg.pool_size, (cfg.prompt_length, d), backbone.feature_dim,
                               *PROMPT_INIT[cfg.prompt_init])

    def select(self, query: torch.Tensor, training: bool = False) -> torch.Tensor:
        """``(B, top_k)`` indices of the prompts for each query ``(B, D)``: batch-wise
        (the batch's most frequent ``top_k``) with ``batchwise_train`` while ``training``,
        with ``batchwise_prompt`` at test time; otherwise per image."""
        batchwise = self.cfg.batchwise_train if training else self.cfg.batchwise_prompt
        return self.pool.select(query, self.cfg.top_k, batchwise)

    def prompted_features(
        self, images: torch.Tensor, query: torch.Tensor, task: Task | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.select(query, training=task is not None)
        tokens = self.pool.prompts[idx].flatten(1, 2)  # (B, top_k * length, D)
        inj = self.prompting
        if self.cfg.pool == "token":
            feats = self.prompted_backbone(images, tokens=tokens)
        else:
            with inj.use(tokens=tokens, keep_tokens=True):
                out = self.backbone.forward_tokens(images)
                model = self.backbone.model  # the head is Identity, or CLIP's projection
                feats = model.head(model.fc_norm(out[:, inj.token_slice].mean(1)))
        return feats, self.pool.pull(query, idx)

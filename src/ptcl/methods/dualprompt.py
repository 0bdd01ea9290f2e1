"""DualPrompt: a shared G-prompt and task-specific E-prompts as attention prefixes.

Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, Perot, Dy, Pfister. "DualPrompt:
Complementary Prompting for Rehearsal-free Continual Learning." ECCV 2022
(arXiv:2204.04799).

Implemented as in the official code (google-research/l2p, ``configs/cifar100_dualprompt``)
and its PyTorch port (JH-LEE-KR/dualprompt-pytorch):

* G-prompt (task-invariant): prefix-tuning in blocks ``g_layers = [0, 1]``, length 5 (5
  key and 5 value vectors per block), trained in every task;
* E-prompts (one per task, pool of 10): prefix-tuning in blocks ``e_layers = [2, 3, 4]``,
  length 5, each with a learnable key; in a block with both, the prefix is ``[G; E]``;
* prompts and keys drawn ``U(-1, 1)`` (PyTorch port);
* training on task ``t`` uses E-prompt ``t`` for every image (``use_prompt_mask``) and
  pulls key ``t`` toward the queries (loss ``CE - 1.0 * sum cos(q, k_t)``); E-prompt ``t``
  starts as a copy of E-prompt ``t-1`` (``shared_prompt_pool``), the key does not;
* test: the E-prompt whose key is most cosine-similar to the query, among the keys of
  the tasks seen so far (the official code searches the whole pool, including keys of
  tasks not trained yet -- a deviation that can only avoid errors);
* the query is the frozen CLS feature from the feature cache (see :mod:`ptcl.methods.prompt_pool`),
  the classifier reads the prompted CLS token; cross-entropy over the current task's
  classes (``train_mask``);
* Adam, lr ``0.03 * 24 / 256``, batch 24, 5 epochs (CIFAR-100), constant lr, gradient
  clipping 1.0. (LAMDA-PILOT uses lr 0.001 and pull coefficient 0.1.)

Deviation: batch-wise E-prompt selection at test (official CIFAR config) is off by
default; ``batchwise_prompt: true`` enables it.

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/dualprompt_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.prompt_pool import PromptPoolConfig, PromptPoolLearner
from ptcl.options import option
from ptcl.peft.prompting import PromptPool
from ptcl.registry import METHODS

_OFFICIAL = "official DualPrompt config google-research/l2p configs/cifar100_dualprompt.py"
_PORT = "DualPrompt PyTorch port JH-LEE-KR/dualprompt-pytorch"


@dataclass
class DualPromptConfig(PromptPoolConfig):
    name: str = option("dualprompt")
    epochs: int = option(5, source=f"{_OFFICIAL} (CIFAR-100)")
    lr: float = option(0.0028125, source=f"{_OFFICIAL}: 0.03 * batch 24 / 256")
    batch_size: int = option(24, source=_OFFICIAL)
    scheduler: Literal["cosine", "constant"] = option("constant", source=_OFFICIAL)
    clip_grad: float | None = option(1.0, source=_OFFICIAL)
    pull_coeff: float = option(1.0, source=f"{_OFFICIAL} (PILOT: 0.1)")
    g_length: int = option(5, "G-prompt length: prefix key and value vectors per block (> 0 when g_layers is set)",
                           ge=0, source=_OFFICIAL)
    g_layers: list[int] = option(help="blocks with the shared G-prompt (prefix-tuning), distinct; [] for none",
                                 ge=0, factory=lambda: [0, 1], source=_OFFICIAL)
    e_length: int = option(5, "E-prompt length: prefix key and value vectors per block", gt=0, source=_OFFICIAL)
    e_layers: list[int] = option(help="blocks with the task's E-prompt (prefix-tuning), distinct, at least one",
                                 ge=0, factory=lambda: [2, 3, 4], source=_OFFICIAL)
    pool_size: int = option(10, "E-prompts (one per task, with a key): at least the scenario's number of tasks",
                            gt=0, source=_OFFICIAL)
    shared_prompt_pool: bool = option(True, "E-prompt t starts as a copy of E-prompt t-1 (its key does not)",
                                      source=f"{_PORT} (shared_prompt_pool)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.g_layers and self.g_length <= 0:
            raise ConfigError(f"method.g_length must be > 0, got {self.g_length}")
        for key in ("g_layers", "e_layers"):
            layers = getattr(self, key)
            if len(set(layers)) != len(layers):
                raise ConfigError(f"method.{key} must be distinct block indices >= 0, got {layers}")
        if not self.e_layers:
            raise ConfigError("method.e_layers must name at least one block")


@METHODS.register("dualprompt")
class DualPrompt(PromptPoolLearner):
    """DualPrompt: a shared G-prompt and per-task E-prompts as attention prefixes (Wang et al., ECCV 2022)."""

    config_cls = DualPromptConfig
    test_options = {"g_layers": [0], "e_layers": [1]}
    per_task = "E-prompt"

    def __init__(self, cfg: DualPromptConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        depth = len(backbone.model.blocks)
        bad = [i for i in (*cfg.g_layers, *cfg.e_layers) if i >= depth]
        if bad:
            raise ConfigError(f"method.g_layers/e_layers {bad} exceed the backbone's {depth} blocks")
        d = self.prompting.attn_dim
        self.g_prompt = nn.Parameter(torch.empty(len(cfg.g_layers), 2, cfg.g_length, d).uniform_(-1, 1))
        self.pool = PromptPool(cfg.pool_size, (len(cfg.e_layers), 2, cfg.e_length, d), backbone.feature_dim, -1.0, 1.0)

    def prepare_task(self, task: Task) -> None:
        if self.cfg.shared_prompt_pool and task.index > 0:
            with torch.no_grad():
                self.pool.prompts[task.index] = self.pool.prompts[task.index - 1]

    def task_keys(self) -> torch.Tensor:
        """``(pool_size, D)``: the E-prompts' keys (the test-time E-prompt is the best match)."""
        return self.pool.keys

    def prefixes(self, e_idx: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{block: (k, v)}``: G-prompts and the E-prompts ``e_idx`` ``(B,)``."""
        b = e_idx.shape[0]
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, blk in enumerate(self.cfg.g_layers):
            out[blk] = (self.g_prompt[j, 0].expand(b, -1, -1), self.g_prompt[j, 1].expand(b, -1, -1))
        e = self.pool.prompts[e_idx]  # (B, n_e_layers, 2, length, D)
        for j, blk in enumerate(self.cfg.e_layers):
            k, v = e[:, j, 0], e[:, j, 1]
            if blk in out:
                k, v = torch.cat([out[blk][0], k], 1), torch.cat([out[blk][1], v], 1)
            out[blk] = (k, v)
        return out

    def prompted_features(
        self, images: torch.Tensor, query: torch.Tensor, task: Task | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.tasks_of(query, task)
        return self.prompted_backbone(images, prefixes=self.prefixes(idx)), self.task_pull(query, idx)

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
  embedding 64, SGD lr 0.25 (momentum 0.9), 20 epochs, ``pull_coeff = 2.0``;
* logit masking (every dataset, training): the cross-entropy sees only the current task's
  classes, the logits of old *and* unseen classes are ``-inf`` (``trainer.py``
  ``forward_one_batch``: ``outputs[:, not_mask] = -np.inf`` for every class outside
  ``_class_ids_mask``) -- ``train_mask: true``. At test, ImageNet-R keeps only the logits
  of the predicted task's classes (``vit_models.py`` ``ViT.forward``, ``cfg.DATA.NAME ==
  'imagenet_r'``: the others are filled with ``-10e10``, in training too, where it changes
  nothing) -- ``task_logit_mask: true``; CIFAR-100 (every other dataset) masks nothing at
  test: the argmax runs over all 100 classes, the unseen ones included (see the
  deviations);
* the optimiser (and its state) is built once for all tasks (``trainer.py``
  ``Trainer.__init__``: ``make_optimizer([self.model], ...)``, then reused by
  ``train_classifier`` for every task) -- ``keep_optimizer: true``, which also keeps its
  state through ``--resume`` (the checkpoint stores it). The official lr scheduler runs
  across the tasks too, but its configs keep the lr constant (``SCHEDULER: linear`` with
  no warmup), so ptcl's schedule restarting every task changes nothing there;
* the head is one ``NUMBER_CLASSES``-way linear layer (``mlp.py`` ``MLP`` with
  ``MLP_NUM = 0``, ``special_bias=True``): weights ``kaiming_normal_(a=0,
  mode='fan_out')``, i.e. N(0, 2 / number of classes), bias ``-log(99)`` (prior 0.01) --
  ``head_init: kaiming_fan_out`` (the fan-out is the scenario's number of classes).

The prompts enter through the shared :class:`~ptcl.peft.prompting.PromptInjector`: DAP
hands it one callable per block (:meth:`DAP.block_prompts`) that generates the prompts
from the block's input; insertion, replacement and stripping are
:class:`~ptcl.peft.tokens.TokenInserter`'s.

Deviations: the official test-time task choice is batch-wise (the batch's most frequent
key, also used for the logit mask) and searches all 10 keys; here it is per image among
the seen tasks' keys (``batchwise_prompt: true`` restores the batch majority). By default
the optimiser is re-created every task (``keep_optimizer: false``) and the head rows take
``nn.Linear``'s init (``head_init: default``): ptcl's results predating these options
stay as they were; the two official values are one option each. The classifier is the
toolbox's growing linear head with the seen classes' rows only, so by default the unseen
classes' (never trained) logits cannot win the argmax at test as they can in the official
CIFAR-100 evaluation; ``unseen_logits: true`` (with ``head_init: kaiming_fan_out``) appends
the unseen classes' initial rows at test, which restores it (such a prediction is wrong). The query is
the cached feature of the un-augmented image (see :mod:`ptcl.methods.prompt_pool`). No
dropout, as in the official model: its configs set
``MODEL.DAP.DROPOUT`` and ``MODEL.LINEAR.DROPOUT``, but ``vit_dap/vit.py`` never reads the
first, the head ``MLP`` with ``MLP_NUM = 0`` has no hidden layer for the second to apply
to, and the encoder is kept in eval mode.

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/dap_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.prompt_pool import PromptPoolConfig, PromptPoolLearner
from ptcl.options import option
from ptcl.peft.prompting import TokenFn
from ptcl.registry import METHODS
from ptcl.seeding import generator
from ptcl.train.optim import OptimizerMemory

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
    keep_optimizer: bool = option(
        False, "one optimiser state (momentum, Adam moments) for all tasks, kept through checkpoints; "
        "false: a new optimiser every task",
        source="ptcl's earlier behaviour; official DAP src/engine/trainer.py builds it once: true")
    head_init: Literal["default", "kaiming_fan_out"] = option(
        "default", "init of each task's head rows: nn.Linear's default, or the official N(0, 2 / number of "
        "classes) weights and bias -log(99)",
        source="ptcl's earlier behaviour; official DAP src/models/mlp.py (last_layer): kaiming_fan_out")
    unseen_logits: bool = option(
        False, "at test, also score the classes of the tasks not seen yet with their untrained (initial) head "
        "rows, so they can take the argmax (a wrong prediction), as the official one full-size head does on "
        "CIFAR-100; needs head_init=kaiming_fan_out",
        source="ptcl (only the seen classes); official DAP trainer.py eval on CIFAR (no mask over 100 classes): true")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unseen_logits and self.head_init != "kaiming_fan_out":
            raise ConfigError("method.unseen_logits scores the official head's initial rows of the unseen classes; "
                              "set method.head_init=kaiming_fan_out too")
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
        #: the optimiser state carried across tasks (``keep_optimizer``), in the checkpoint
        self.optimizer_state = OptimizerMemory() if cfg.keep_optimizer else None

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.task_ends = torch.cat([self.task_ends, self.task_ends.new_tensor([task.end])])
        if self.cfg.head_init == "kaiming_fan_out":
            self.init_head_rows(task)

    @torch.no_grad()
    def init_head_rows(self, task: Task) -> None:
        """The official head init of ``task``'s new rows: ``kaiming_normal_(mode='fan_out')``
        of the full head (std ``sqrt(2 / number of classes)``, the scenario's) and the bias
        ``-log((1 - 0.01) / 0.01)``; drawn from a generator of the run seed and the task."""
        w, b = self.head.weight, self.head.bias
        rows, bias = self.initial_head_rows(task)
        w[-task.num_new:] = rows.to(w)
        b[-task.num_new:] = bias

    def initial_head_rows(self, task: Task) -> tuple[torch.Tensor, float]:
        """``(num_new, D)`` initial weights of ``task``'s head rows and their bias (see
        :meth:`init_head_rows`); the same numbers whenever they are drawn."""
        scenario = getattr(self.ctx, "scenario", None)
        n_classes = scenario.num_classes if scenario is not None else task.end
        g = generator(self.ctx.seed, "dap-head", task.index)
        rows = torch.randn(task.num_new, self.head.weight.shape[1], generator=g) * math.sqrt(2.0 / n_classes)
        return rows, -math.log((1 - 0.01) / 0.01)

    def unseen_head(self, seen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, D)`` weights and ``(U,)`` biases of the classes after the first ``seen``: the
        rows their tasks will start from (``unseen_logits``). Drawn once per ``seen``, device
        and dtype (not per test batch); never part of the state."""
        ref = self.head.weight
        key = (seen, ref.device, ref.dtype)
        cached = getattr(self, "_unseen_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        future = [t for t in self.ctx.scenario.tasks if t.start >= seen]
        if future:
            drawn = [self.initial_head_rows(t) for t in future]
            w = torch.cat([r for r, _ in drawn]).to(ref)
            b = torch.cat([torch.full((len(r),), bias) for r, bias in drawn]).to(w)
        else:
            w, b = ref.new_zeros(0, ref.shape[1]), ref.new_zeros(0)
        self._unseen_cache = (key, w.detach(), b.detach())
        return w, b

    def fit(self, dataset: Dataset, step: Callable, params: Iterable, cfg: TrainConfig | None = None,
            *args: Any, **kwargs: Any) -> list[float]:
        """The learner's :meth:`~ptcl.methods.base.Learner.fit`; with ``keep_optimizer`` the
        optimiser starts from the state the previous task left
        (:class:`~ptcl.train.optim.OptimizerMemory`) and leaves its own for the next."""
        if self.optimizer_state is None:
            return super().fit(dataset, step, params, cfg, *args, **kwargs)
        names = {id(p): n for n, p in self.named_parameters()}
        opt = self.optimizer_state.optimizer([(names[id(p)], p) for p in params], cfg or self.cfg)
        losses = super().fit(dataset, step, opt, cfg, *args, **kwargs)
        self.optimizer_state.remember(opt)
        return losses

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

    @property
    def scores_unseen_classes(self) -> bool:  # type: ignore[override]
        return bool(self.cfg.unseen_logits)

    def predict(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        idx = self.task_index(x[1])
        feats = self.features_for(x[0], idx)
        logits = self.head(feats)
        if self.cfg.unseen_logits:
            w, b = self.unseen_head(logits.shape[1])
            logits = torch.cat([logits, feats @ w.T + b], dim=1)
        if self.cfg.task_logit_mask:
            ends = self.task_ends.to(idx.device)
            starts = torch.cat([ends.new_zeros(1), ends[:-1]])
            cls = torch.arange(logits.shape[1], device=logits.device)
            outside = (cls[None] < starts[idx, None]) | (cls[None] >= ends[idx, None])
            logits = logits.masked_fill(outside, -1e11)
        return logits

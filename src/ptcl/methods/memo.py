"""MEMO: shared generalized blocks, one set of specialized deep blocks per task, rehearsal.

Zhou, Wang, Ye, Zhan. "A Model or 603 Exemplars: Towards Memory-Efficient Class-Incremental
Learning." ICLR 2023. Official code: https://github.com/wangkiw/ICLR23-MEMO (ResNets); the
reference for pre-trained backbones is LAMDA-PILOT ``models/memo.py``, ``utils/inc_net.py``
``AdaptiveNet``, ``backbone/vit_memo.py`` (``vit_base_patch16_224_memo``) and ``exps/memo.json``.

The backbone is split in two (Sec. 4 of the paper: shallow layers are shared, deep layers
are task-specific):

* **generalized blocks** (the trunk), shared by every task: one object, run once per image.
  They train with the first task and are frozen (and kept in eval mode) after it
  (PILOT ``train_base: false``; ``train_base: true`` keeps training them);
* **specialized blocks**, one copy per task (``specialized[t]``). The copy of a new task is
  initialised from the previous task's (PILOT ``AdaptiveNet.update_fc`` ``load_state_dict``);
  the old copies are frozen and kept in eval mode (PILOT ``train_adaptive: false``).

The feature of an image is the concatenation ``[specialized[0](z), ..., specialized[T-1](z)]``
of the branches' outputs on the one trunk output ``z`` (``(B, T * D)``). The linear head over
it grows in width and in classes with the old weights copied into the top-left block; the
new entries get PILOT's ``SimpleLinear`` init (Kaiming-uniform with gain 1, zero bias). From
the second task on an auxiliary head over the newest branch's ``D`` features classifies the
task's new classes plus one "old" class (index 0), and the loss is
``CE(head(f), y) + alpha_aux * CE(aux_head(f[:, -D:]), y_aux)`` with
``y_aux = y - known + 1`` for new classes and 0 for exemplars (PILOT
``_update_representation``); the first task trains with the plain cross-entropy.
The exemplar memory, the NME classifier and the CNN/NME report are
:mod:`ptcl.methods.rehearsal`'s (herding on the concatenated features).

The split (``specialized_blocks``: the last entries of the timm model's ``blocks``; null: the
architecture's default):

* **timm ViTs** (``VisionTransformer``): trunk = patch embedding, class/position embeddings,
  ``norm_pre`` and ``blocks[:-k]``; a branch = ``blocks[-k:]``, the final ``norm``, the
  pooling (class token for ViT-B/16) and ``fc_norm``. Default ``k = 1``: PILOT's
  ``Generalized_Vit`` runs blocks 0-10 of ViT-B/16 and ``Specialized_Vit`` one last block + norm;
* **timm EfficientNets** (``efficientnet_lite0``): trunk = ``conv_stem``, ``bn1``,
  ``blocks[:-k]``; a branch = ``blocks[-k:]``, ``conv_head``, ``bn2`` and the global average
  pool. Default ``k = 2``: the two stages at stride 32 (``blocks[5:]``, 192 and 320 channels),
  as MEMO specializes the last (lowest-resolution) stage of its ResNets (official code and PILOT's
  ``memo_resnet*``: stage 3 of ResNet-32, ``layer4`` of ResNet-18);
* anything else raises a :class:`~ptcl.errors.ConfigError` naming the backbone.

Where ptcl differs from PILOT:

* **the first branch starts from the pre-trained deep blocks** (``specialized_init:
  pretrained``). PILOT's ``Specialized_Vit`` holds its block as a new attribute
  (``last_block``) that timm 0.6's npz loader never fills, so its first specialized block
  starts from PyTorch's default init (only the final norm is pre-trained);
  ``specialized_init: random`` re-initialises the branch's blocks that way (not the norm) to
  reproduce it;
* the timm model inside ``self.backbone`` keeps its own (pre-trained, frozen, never run) copy
  of the deep blocks, the source of the first branch: it is in the state dict but not counted
  in :meth:`MEMO.inference_cost`'s ``parameters``;
* PILOT's ``skip`` (load a fine-tuned first-task checkpoint) and ``t_max`` (cosine) are not options;
* the NME means of every new class are computed (PILOT ``models/memo.py`` sets
  ``_class_means[class_idx]`` after its loop over the new classes, so only the task's last new
  class gets a mean until the next task recomputes them: PILOT's logged NME accuracy of MEMO
  is lower than its exemplars give, and ptcl's NME variant does not reproduce it).

Defaults: LAMDA-PILOT ``exps/memo.json`` (ViT-B/16, CIFAR-100 B0 Inc10): SGD (momentum 0.9)
batch 32; first task 10 epochs at lr 1e-3, weight decay 5e-4, milestones [60, 120, 170];
later tasks 20 epochs at lr 1e-3, weight decay 2e-4, milestones [80, 120, 150] (all beyond
the epochs: a constant lr), decay 0.1; ``alpha_aux`` 1; memory 2000 shared (herding).

Inference cost: one trunk pass plus one branch per task (``experts_run`` = tasks seen). With
the default split a branch is one of ViT-B/16's 12 blocks, so the whole costs ``(11 + T) / 12``
backbone passes; :meth:`MEMO.inference_cost` reports ``backbone_passes`` 1 (the integer field:
one trunk, the deep part once per branch).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import global_pool_nlc
from timm.models.efficientnet import EfficientNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ptcl.backbones.base import Backbone
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.linear import IncrementalLinear, expand_linear, simple_linear
from ptcl.methods.rehearsal import RehearsalConfig, RehearsalLearner
from ptcl.options import option
from ptcl.registry import METHODS

log = logging.getLogger(__name__)

_PILOT = "LAMDA-PILOT exps/memo.json"

#: ``specialized_blocks`` when null, per architecture (see the module docstring)
DEFAULT_SPECIALIZED = {"vit": 1, "efficientnet": 2}


@dataclass
class MEMOConfig(RehearsalConfig):
    name: str = option("memo")
    epochs: int = option(20, "training epochs per task after the first", gt=0, source=f"{_PILOT} (epochs)")
    lr: float = option(1e-3, "learning rate after the first task", gt=0, source=f"{_PILOT} (lrate)")
    batch_size: int = option(32, "training batch size", gt=0, source=f"{_PILOT} (batch_size)")
    weight_decay: float = option(2e-4, "weight decay after the first task", ge=0,
                                 source=f"{_PILOT} (weight_decay)")
    milestones: list[int] = option(help="multistep milestones after the first task (beyond the epochs: constant)",
                                   gt=0, factory=lambda: [80, 120, 150], source=f"{_PILOT} (milestones)")
    lr_decay: float = option(0.1, "multistep lr factor", gt=0, source=f"{_PILOT} (lrate_decay)")
    init_epochs: int | None = option(10, "epochs of the first task", gt=0, source=f"{_PILOT} (init_epoch)")
    init_lr: float | None = option(1e-3, "learning rate of the first task", gt=0, source=f"{_PILOT} (init_lr)")
    init_weight_decay: float | None = option(5e-4, "weight decay of the first task", ge=0,
                                             source=f"{_PILOT} (init_weight_decay)")
    init_milestones: list[int] | None = option(help="multistep milestones of the first task", gt=0,
                                               factory=lambda: [60, 120, 170], source=f"{_PILOT} (init_milestones)")
    init_lr_decay: float | None = option(0.1, "multistep lr factor of the first task", gt=0,
                                         source=f"{_PILOT} (init_lr_decay)")
    alpha_aux: float = option(1.0, "weight of the auxiliary loss (new classes + one 'old' class on the newest "
                              "branch's features) from the second task on", ge=0, source=f"{_PILOT} (alpha_aux)")
    train_base: bool = option(False, "keep training the shared generalized blocks after the first task",
                              source=f"{_PILOT} (train_base)")
    train_adaptive: bool = option(False, "keep training the old tasks' specialized blocks",
                                  source=f"{_PILOT} (train_adaptive)")
    specialized_blocks: int | None = option(
        None, "how many of the last entries of the timm model's blocks are specialized (one copy per task); "
        "null: 1 transformer block for a ViT, 2 stages (the stride-32 ones) for an EfficientNet", gt=0,
        source="LAMDA-PILOT backbone/vit_memo.py (ViT: the last block); MEMO's ResNets (last stage)")
    specialized_init: Literal["pretrained", "random"] = option(
        "pretrained", "the first task's specialized blocks: the pre-trained ones, or PyTorch's default init "
        "(what PILOT's vit_memo effectively does under timm 0.6; the final norm stays pre-trained)",
        source="Zhou et al., ICLR 2023, Sec. 4 (PILOT: random, see ptcl.methods.memo)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.specialized_init not in ("pretrained", "random"):
            raise ConfigError(f"method.specialized_init must be pretrained or random, got {self.specialized_init!r}")


# -- the split --------------------------------------------------------------------------------
class ViTBranch(nn.Module):
    """A ViT's specialized blocks: ``blocks[-k:]`` + final ``norm`` + pooling + ``fc_norm``
    (copies), mapping the trunk's tokens ``(B, N, D)`` to pooled features ``(B, D)``."""

    def __init__(self, model: VisionTransformer, k: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[copy.deepcopy(b) for b in list(model.blocks)[-k:]])
        self.norm = copy.deepcopy(model.norm)
        self.attn_pool = copy.deepcopy(model.attn_pool) if model.attn_pool is not None else None
        self.fc_norm = copy.deepcopy(model.fc_norm)
        self.head_drop = copy.deepcopy(model.head_drop)
        self.global_pool = model.global_pool
        self.num_prefix_tokens = model.num_prefix_tokens
        self.pool_include_prefix = getattr(model, "pool_include_prefix", False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(tokens))
        if self.attn_pool is not None:  # timm VisionTransformer.pool
            x = self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens:])
        else:
            x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens,
                                reduce_include_prefix=self.pool_include_prefix)
        return self.head_drop(self.fc_norm(x))


class EfficientNetBranch(nn.Module):
    """An EfficientNet's specialized blocks: ``blocks[-k:]`` + ``conv_head`` + ``bn2`` + global
    pool (copies), mapping the trunk's feature map ``(B, C, H, W)`` to ``(B, num_features)``."""

    def __init__(self, model: EfficientNet, k: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[copy.deepcopy(b) for b in list(model.blocks)[-k:]])
        self.conv_head = copy.deepcopy(model.conv_head)
        self.bn2 = copy.deepcopy(model.bn2)
        self.global_pool = copy.deepcopy(model.global_pool)
        self.drop_rate = float(model.drop_rate)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(self.bn2(self.conv_head(self.blocks(fmap))))
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x


class MemoSplit:
    """Where MEMO cuts a timm model (see the module docstring): ``arch`` (``vit`` or
    ``efficientnet``), ``k`` specialized entries of ``model.blocks``, the first
    ``shared_blocks`` shared. Plain object: it registers no module."""

    #: top-level children of the timm model that belong to the deep (specialized) part
    TAIL = {"vit": ("norm", "fc_norm", "attn_pool", "head_drop", "head"),
            "efficientnet": ("conv_head", "bn2", "global_pool", "classifier")}

    def __init__(self, backbone: Backbone, specialized_blocks: int | None) -> None:
        model = backbone.model
        if isinstance(model, VisionTransformer) and backbone.kind == "vit":
            self.arch = "vit"
        elif isinstance(model, EfficientNet):
            self.arch = "efficientnet"
        else:
            raise ConfigError(
                f"memo splits timm ViTs (VisionTransformer) and EfficientNets (e.g. efficientnet_lite0) into "
                f"shared and per-task blocks; backbone {backbone.name} ({type(model).__name__}) is neither")
        n = len(model.blocks)
        self.k = DEFAULT_SPECIALIZED[self.arch] if specialized_blocks is None else specialized_blocks
        if not 1 <= self.k <= n:
            raise ConfigError(f"method.specialized_blocks must be in [1, {n}] for backbone {backbone.name} "
                              f"({n} blocks), got {self.k}")
        self.shared_blocks = n - self.k

    def trunk(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The shared generalized blocks of ``model`` on normalised images ``x`` ``(B, 3, H, W)``:
        tokens ``(B, N, D)`` (ViT) or a feature map ``(B, C, h, w)`` (EfficientNet)."""
        blocks = list(model.blocks)[: self.shared_blocks]
        if self.arch == "vit":  # timm VisionTransformer.forward_features up to the cut
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        else:  # timm EfficientNet.forward_features up to the cut
            x = model.bn1(model.conv_stem(x))
        for b in blocks:
            x = b(x)
        return x

    def branch(self, model: nn.Module) -> nn.Module:
        """A new specialized branch: copies of ``model``'s deep blocks."""
        return ViTBranch(model, self.k) if self.arch == "vit" else EfficientNetBranch(model, self.k)

    def is_shared(self, name: str) -> bool:
        """Whether the parameter/buffer ``name`` of the timm model is in the trunk."""
        parts = name.split(".")
        if parts[0] in self.TAIL[self.arch]:
            return False
        return not (parts[0] == "blocks" and int(parts[1]) >= self.shared_blocks)


# -- the learner -------------------------------------------------------------------------------
@METHODS.register("memo")
class MEMO(RehearsalLearner):
    """MEMO (Zhou et al., ICLR 2023): shared trunk, per-task specialized blocks, rehearsal."""

    config_cls = MEMOConfig

    def __init__(self, cfg: MEMOConfig, backbone: Backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        self.split = MemoSplit(backbone, cfg.specialized_blocks)
        self.out_dim = int(backbone.model.num_features)
        self.specialized = nn.ModuleList()
        self.head: IncrementalLinear | None = None
        self.aux_head: IncrementalLinear | None = None
        self._trunk_trains = True

    # -- structure ------------------------------------------------------------------------
    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk's parameters (those of ``backbone.model`` before the cut)."""
        return [p for n, p in self.backbone.model.named_parameters() if self.split.is_shared(n)]

    @property
    def feature_dim(self) -> int:
        """``out_dim`` per branch: ``(tasks seen) * D``."""
        return self.out_dim * len(self.specialized)

    def before_task(self, task: Task) -> None:
        """Add the task's branch (a copy of the previous one, or of the pre-trained deep
        blocks), widen and grow the head, build the auxiliary head, and freeze the trunk
        (after the first task) and the old branches."""
        cfg: MEMOConfig = self.cfg  # type: ignore[assignment]
        if len(self.specialized) == 0:
            branch = self.split.branch(self.backbone.model)
            if cfg.specialized_init == "random":
                for m in branch.blocks.modules():
                    if m is not branch.blocks and hasattr(m, "reset_parameters"):
                        m.reset_parameters()
        else:
            branch = copy.deepcopy(self.specialized[-1])
        branch.requires_grad_(True)
        self.specialized.append(branch)
        for old in list(self.specialized)[:-1]:
            old.requires_grad_(cfg.train_adaptive)
        self._trunk_trains = len(self.specialized) == 1 or cfg.train_base
        for p in self.shared_parameters():
            p.requires_grad_(self._trunk_trains)
        device = next(self.backbone.parameters()).device
        self.head = expand_linear(self.head, self.feature_dim, task.end, device)
        self.aux_head = simple_linear(self.out_dim, task.num_new + 1, device)

    def train(self, mode: bool = True) -> MEMO:
        """As ``nn.Module.train``, but a frozen trunk and frozen old branches stay in eval
        mode (PILOT ``set_network``), so their batch-norm statistics never move."""
        super().train(mode)
        if mode:
            if not self._trunk_trains:
                self.backbone.eval()
            if not self.cfg.train_adaptive:  # type: ignore[attr-defined]
                for old in list(self.specialized)[:-1]:
                    old.eval()
        return self

    # -- features and logits -----------------------------------------------------------------
    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The shared generalized blocks' output for images ``x`` (uint8 or normalised)."""
        if x.dtype == torch.uint8:
            x = self.backbone.normalize(x)
        if self.backbone.kind == "cnn":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.split.trunk(self.backbone.model, x)

    def branch_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each task's branch on the one trunk output: ``T`` tensors ``(B, D)``."""
        z = self.trunk(x)
        return [branch(z) for branch in self.specialized]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated branch features ``(B, T * D)``."""
        return torch.cat(self.branch_features(x), dim=1)

    # -- training -----------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """Cross-entropy over the seen classes, plus from the second task on ``alpha_aux``
        times the auxiliary cross-entropy (module docstring)."""
        feats = self.embed(x)
        loss = F.cross_entropy(self.head(feats), y)
        if task.index > 0:
            aux_y = torch.where(y >= task.start, y - task.start + 1, torch.zeros_like(y))
            aux_logits = self.aux_head(feats[:, -self.out_dim:])  # type: ignore[misc]
            loss = loss + self.cfg.alpha_aux * F.cross_entropy(aux_logits, aux_y)  # type: ignore[attr-defined]
        return loss

    def train_task(self, task: Task) -> None:
        self.to(self.device)
        skip = set() if task.index > 0 else {id(p) for p in self.aux_head.parameters()}  # type: ignore[union-attr]
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in skip]
        log.info("memo task %d: %d branches, %d trainable parameters", task.index, len(self.specialized),
                 sum(p.numel() for p in params))
        self.fit_task(task, lambda x, y: self.loss(x, y, task), params)

    def after_task(self, task: Task) -> None:
        self.update_memory(task)

    def inference_cost(self) -> dict[str, int]:
        """One trunk pass (``backbone_passes`` 1) and one specialized branch per task
        (``experts_run``); ``parameters``: trunk + branches + head (not the backbone's own
        unused copy of the deep blocks, nor the training-only auxiliary head)."""
        used = [*self.shared_parameters(), *self.specialized.parameters(), *self.head.parameters()]
        return {"backbone_passes": 1, "experts_run": len(self.specialized),
                "parameters": sum(p.numel() for p in used)}

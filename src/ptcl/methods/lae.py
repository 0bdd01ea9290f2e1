"""LAE: Learning-Accumulation-Ensemble with an online and an offline PET module.

Gao, Zhao, Sun, Xi, Zhang, Ghanem, Zhang. "A Unified Continual Learning Framework with
General Parameter-Efficient Tuning." ICCV 2023 (arXiv:2303.10070). Official code:
github.com/gqk/LAE (``main.py``, ``config/vit_{adapter,lora,prefix}.yaml``,
``config/base/{cifar100,imagenet-r}_order1.yaml``, ``libml/model/pet/*``,
``libml/core/module.py``); also LAMDA-PILOT ``models/lae.py``, ``backbone/vit_lae.py``,
``exps/lae.json``.

Implemented as the official code does it:

* **Learning**: one *online* PET module (``pet``: ``prefix`` -- :mod:`ptcl.peft.prefix`,
  length 10 with LAE's attention compensation; ``lora`` -- :mod:`ptcl.peft.lora`, rank 5
  on the keys and values; ``adapter`` -- :mod:`ptcl.peft.adapter` with LAE's options:
  bottleneck 5, GELU, parallel to the attention, on its normed input) in blocks
  ``pet_blocks`` (0-4), each with a learnable output scale starting at 1 (``Scaler(None)``),
  and a classifier that grows by one linear layer per task (``DynamicSimpleHead``: weights
  ``N(0, 0.001^2)``, bias 0), trained with cross-entropy on the current task's classes only
  (the old classes' logits are cut off: ``output[:, num_old_classes:]``), Adam, constant
  lr, a new optimiser per task over the online PET and the whole head (the old rows get zero
  gradients). From the second task on, the PET is frozen for the first
  ``num_freeze_epochs`` epochs of each task, so the new head is calibrated first
  (``pre_train_epoch``).
* **Accumulation**: the *offline* PET module is a copy of the online one made when the
  second task starts (``ModelEmaV2`` created in ``setup_model`` of task 1), then after
  every optimiser step ``theta_off <- alpha theta_off + (1 - alpha) theta_on`` with
  ``alpha = ema_decay`` (0.9999; ``post_train_step``, also during the frozen epochs).
* **Ensemble**: prediction is the class-wise maximum of the two modules' softmax
  probabilities over one shared head (:func:`ptcl.experts.ensemble.max_softmax`); after
  the first task, before any offline module exists, the online one alone (``eval_epoch``).
  ``inference=online`` / ``offline`` use one of them (the paper's ablation; the official
  ``eval_only_emas``).

The two modules are :class:`ptcl.experts.Experts` with the role keys ``"online"`` and
``"offline"`` (one active at a time, both in the learner's checkpoint); the EMA is
:func:`ptcl.experts.merge.ema_` in a per-step callback (:mod:`ptcl.train.callbacks`).

LAMDA-PILOT's port differs, available as options: its offline module is a copy of the
*initial* online one, updated from the first step of the first task (``offline_start:
first_task``; then the first task also predicts with both), and it freezes the PET for the
first ``num_freeze_epochs`` epochs of the first task too (``freeze_first_task: true``). Its
other differences are settings (``exps/lae.json``: batch 128, no ``drop_last``, the IN1K
fine-tuned ViT-B with PILOT's input pipeline) or not reproduced: its head is
kaiming-uniform (``SimpleLinear``) where the official one is ``N(0, 0.001^2)``; its
``pet_cls=LoRA`` branch does not run (``attach_pets_vit`` reads ``self.cfg``).

LAE's adapter is not ptcl's AdaptFormer adapter (``adapter`` defaults, used by APER, EASE,
MOS): it sits parallel to the *attention* branch on its normed input (``norm1(x)``; the
AdaptFormer one parallel to the MLP branch on the residual stream), uses GELU (not ReLU),
no dropout (0.1), bottleneck 5 (64), a learnable output scale starting at 1 (fixed 0.1),
and only blocks 0-4 (every block); the init is the same (down kaiming-uniform, up and
biases zero). ``pet=adapter`` therefore needs :class:`ptcl.peft.AdapterSet` with the
options ``site``, ``activation``, ``learn_scale`` and ``blocks``; a config naming it is
refused with a ``ConfigError`` while they are missing.

Other differences from the official code: the prefix keys and values are appended after
the block's own instead of after its first key (the same attention, see
:mod:`ptcl.peft.prefix`); LoRA adds ``s (x A^T) B^T`` to the projection's output instead of
merging ``s B A`` into the weight (the same map); the scenario's class order and data
splits are ptcl's (``configs/lae_*.yaml`` select the official unshuffled order). The
official ``drop_last`` is ``method.drop_last`` (kept off when a task has fewer images than
one batch).

Input pipeline: ptcl's defaults unless a config says otherwise; ``configs/lae_*.yaml``
select the official one (no normalisation, bilinear ``RandomResizedCrop(224)`` + flip,
eval ``Resize(256)`` + ``CenterCrop(224)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.backbones.base import Backbone
from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.experts import Experts, ema_
from ptcl.experts.ensemble import max_softmax
from ptcl.heads.linear import IncrementalLinear
from ptcl.methods.base import IMAGES, Learner, require_vit
from ptcl.options import option
from ptcl.peft.base import check_options
from ptcl.peft.lora import tuned_blocks
from ptcl.registry import METHODS
from ptcl.train import AfterStep, Callback, LoopState

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
HEAD_STD = 0.001
"""Std of the new head rows (official ``SimpleHead.weights_init``: ``normal_(std=0.001)``, bias 0)."""

_BASE = "official LAE config/base/cifar100_order1.yaml"
_MAIN = "official LAE main.py"
_PET = "official LAE config/vit_{prefix,lora,adapter}.yaml"

Pet = Literal["prefix", "lora", "adapter"]


@dataclass
class LAEConfig(TrainConfig):
    """Official defaults (CIFAR-100, ``config/base/cifar100_order1.yaml``): 5 epochs per task,
    Adam lr 0.0028125 (= 0.03 x 24 / 256), batch 24, weight decay 0, constant lr; 3 epochs
    with the PET frozen in every task after the first; EMA decay 0.9999; PET in blocks 0-4."""

    name: str = option("lae")
    epochs: int = option(5, source=f"{_BASE} (num_epochs; imagenet-r: 50)")
    lr: float = option(0.0028125, source=f"{_BASE} (imagenet-r: 0.00046875)")
    batch_size: int = option(24, source=f"{_BASE} (PILOT exps/lae.json: 128)")
    optimizer: Literal["sgd", "adam", "adamw"] = option("adam", source=_BASE)
    weight_decay: float = option(0.0, source=_BASE)
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant", "coda_cosine"] = option(
        "constant", source=f"{_BASE} (schedule_unit none: the LambdaLR is never stepped)")
    pet: Pet = option("prefix", "the PET module: prefix (prefix tuning with LAE's compensation), lora (LoRA on "
                      "the keys and values) or adapter (LAE's adapter, parallel to the attention)",
                      source="LAMDA-PILOT exps/lae.json (pet_cls Prefix); official main.py default: Adapter")
    pet_blocks: list[int] = option(help="ViT blocks that get the PET", ge=0, factory=lambda: [0, 1, 2, 3, 4],
                                   source=f"{_MAIN} (adapt_blocks)")
    prefix_length: int = option(10, "pet=prefix: key/value prefix tokens per block", gt=0,
                                source="official LAE config/vit_prefix.yaml (length)")
    prefix_compensatory: bool = option(
        True, "pet=prefix: divide the prefix attention weights by their sum (LAE's compensation); false: "
        "plain prefix-tuning", source="official LAE config/vit_prefix.yaml (compensatory)")
    lora_rank: int = option(5, "pet=lora: rank of the key and value updates", gt=0,
                            source="official LAE config/vit_lora.yaml (rank)")
    adapter_bottleneck: int = option(5, "pet=adapter: bottleneck width", gt=0,
                                     source="official LAE config/vit_adapter.yaml (down_sample)")
    pet_learn_scale: bool = option(
        True, "the PET's output scale (prefix keys/values, LoRA update, adapter output) is a learnable "
        "scalar starting at 1; false: fixed at 1", source=f"{_PET} (scale: null = Scaler(None))")
    ema_decay: float = option(0.9999, "alpha: offline <- alpha offline + (1 - alpha) online after every step",
                              ge=0, le=1, source=f"{_BASE} (ema_decay)")
    num_freeze_epochs: int = option(
        3, "epochs at the start of each task after the first in which the PET is frozen (only the head "
        "trains)", ge=0, source=f"{_BASE} (imagenet-r: 30)")
    freeze_first_task: bool = option(False, "freeze the PET for num_freeze_epochs in the first task too "
                                     "(LAMDA-PILOT)", source=f"{_MAIN} (pre_train_epoch: not in task 0)")
    offline_start: Literal["second_task", "first_task"] = option(
        "second_task", "second_task: the offline module is a copy of the online one when the second task "
        "starts (official); first_task: a copy of the initial online one, updated from the first step "
        "(LAMDA-PILOT)", source=f"{_MAIN} (setup_model: ModelEmaV2 in task 1)")
    inference: Literal["ensemble", "online", "offline"] = option(
        "ensemble", "predict with the max of both modules' softmax, or one module (the paper's ablation)",
        source=f"{_MAIN} (eval_epoch; eval_only_emas false)")
    drop_last: bool = option(True, "drop the last incomplete training batch of each epoch",
                             source="official LAE config/base/*.yaml (dataloader.drop_last)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.pet_blocks)) != len(self.pet_blocks) or not self.pet_blocks:
            raise ConfigError(f"method.pet_blocks must be distinct block indices, got {self.pet_blocks}")
        try:
            check_options(self.pet, pet_options(self))
        except ConfigError as e:
            raise ConfigError(f"method.pet={self.pet} needs ptcl.peft's {self.pet} with LAE's options "
                              f"({e}); choose method.pet=prefix or lora") from None


def pet_options(cfg: LAEConfig) -> dict[str, Any]:
    """The :data:`ptcl.peft.PEFT_METHODS` options of ``cfg.pet`` in LAE's form."""
    common = {"learn_scale": cfg.pet_learn_scale, "blocks": list(cfg.pet_blocks)}
    if cfg.pet == "prefix":
        return {"length": cfg.prefix_length, "compensatory": cfg.prefix_compensatory, **common}
    if cfg.pet == "lora":
        return {"rank": cfg.lora_rank, "targets": "kv", **common}
    return {"bottleneck": cfg.adapter_bottleneck, "scale": 1.0, "dropout": 0.0, "activation": "gelu",
            "site": "attn", "input": "normed", **common}


class FreezeFirstEpochs(Callback):
    """``params`` do not train in the first ``epochs`` epochs of a fit (``requires_grad``
    False, so the optimiser skips them), and train from epoch ``epochs`` on."""

    def __init__(self, params: list[nn.Parameter], epochs: int) -> None:
        self.params, self.epochs = params, epochs

    def on_epoch_start(self, state: LoopState) -> None:
        for p in self.params:
            p.requires_grad_(state.epoch >= self.epochs)


@METHODS.register("lae")
class LAE(Learner):
    """LAE: an online PET, its per-step EMA (offline) and a max-softmax ensemble of the two (Gao et al., ICCV 2023)."""

    config_cls = LAEConfig
    inputs = IMAGES
    test_options = {"pet_blocks": [0, 1], "epochs": 2, "num_freeze_epochs": 1}

    def __init__(self, cfg: LAEConfig, backbone: Backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        require_vit(backbone, "LAE")  # at set-up, before the run folder exists
        depth = len(getattr(backbone.model, "blocks", []))
        try:
            tuned_blocks(cfg.pet_blocks, depth, "LAE's PET")
        except ConfigError as e:
            raise ConfigError(f"method.pet_blocks: {e}") from None
        self.experts = Experts(backbone, ctx.data)
        self.head = IncrementalLinear(backbone.feature_dim)
        self.tasks_seen = 0  # before_task calls (replayed on resume)

    # -- structure ---------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        cfg: LAEConfig = self.cfg  # type: ignore[assignment]
        if ONLINE not in self.experts:
            opts = pet_options(cfg)
            self.experts.add(ONLINE, cfg.pet, **opts)
            self.experts.add(OFFLINE, cfg.pet, **opts)
            self.experts[OFFLINE].load_state_dict(self.experts[ONLINE].state_dict())
        self.head.grow(task.num_new)
        with torch.no_grad():  # official DynamicSimpleHead.append: N(0, 0.001^2), bias 0
            self.head.weight[task.start :].normal_(0.0, HEAD_STD)
            self.head.bias[task.start :].zero_()
        self.tasks_seen += 1

    def offline_ready(self, task_index: int | None = None) -> bool:
        """Whether the offline module exists at task ``task_index`` (default: the latest)."""
        t = self.tasks_seen - 1 if task_index is None else task_index
        return self.cfg.offline_start == "first_task" or t >= 1

    # -- training ----------------------------------------------------------------------
    def train_task(self, task: Task) -> None:
        cfg: LAEConfig = self.cfg  # type: ignore[assignment]
        t = task.index
        self.to(self.device)
        if t == 1 and cfg.offline_start == "second_task":  # the official ModelEmaV2(pets): a copy
            self.experts[OFFLINE].load_state_dict(self.experts[ONLINE].state_dict())
        online, offline = self.experts.parameters_of(ONLINE), self.experts.parameters_of(OFFLINE)
        callbacks: list[Callback] = []
        if (t > 0 or cfg.freeze_first_task) and cfg.num_freeze_epochs > 0:
            callbacks.append(FreezeFirstEpochs(list(online.values()), cfg.num_freeze_epochs))
        if self.offline_ready(t):
            callbacks.append(AfterStep(lambda _: ema_(offline, online, cfg.ema_decay)))
        data = self.ctx.data.images("train", task.classes, train_transform=True)
        drop_last = cfg.drop_last and len(data) >= cfg.batch_size

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.head(self.backbone(x))[:, task.start :], y - task.start)

        with self.experts.training(ONLINE) as h:
            params = [*h.parameters(), *self.head.parameters()]
            losses = self.fit(data, step, params, desc=f"task {t}", seed=t, callbacks=callbacks, drop_last=drop_last)
        if losses:
            log.info("LAE task %d: loss %.4f -> %.4f", t, losses[0], losses[-1])

    # -- inference ---------------------------------------------------------------------
    def inference_keys(self) -> list[str]:
        """The modules ``predict`` runs: both (``ensemble``) or one; the online one alone
        while no offline module exists."""
        if not self.offline_ready():
            return [ONLINE]
        return {"ensemble": [ONLINE, OFFLINE], "online": [ONLINE], "offline": [OFFLINE]}[self.cfg.inference]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class-wise max of the modules' softmax probabilities, ``(B, seen classes)``."""
        logits = []
        for key in self.inference_keys():
            with self.experts.only(key):
                logits.append(self.head(self.backbone(x)))
        return max_softmax(logits)

    def inference_cost(self) -> dict[str, int]:
        n = len(self.inference_keys())
        return {"backbone_passes": n, "experts_run": n, "parameters": sum(p.numel() for p in self.parameters())}

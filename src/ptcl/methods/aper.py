"""APER (a.k.a. ADAM): adapt the pre-trained model once, then prototypes of both models.

Zhou, Cai, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need." IJCV 2024 (arXiv:2303.07338).

Implemented as in the paper and LAMDA-PILOT's ``models/aper_*.py``:

* first task: the backbone is tuned with ``method.tuning`` (``adapter`` = AdaptFormer,
  ``ssf``, ``vpt_shallow``, ``vpt_deep``, or ``finetune`` = all weights) and a temporary
  head with cross-entropy (:func:`ptcl.methods.adapt.tune_first_session`), then frozen;
* the feature of an image is ``[pre-trained feature, adapted feature]`` (2 x D, in this
  order, as PILOT's ``construct_dual_branch_network``);
* after every task the prototype (class mean of the concatenated training features, eval
  transform) of each new class becomes its row of a cosine classifier -- SimpleCIL on the
  concatenated features.

The pre-trained half comes from the frozen-feature cache (computed with every tuning
module bypassed, before tuning), the adapted half from a cache keyed by the adapted
weights' hash, so no second copy of the backbone exists and later tasks run no backbone
pass. For ``finetune`` the checkpoint stores the tuned backbone; its pre-trained features
must then come from the cache (a miss after tuning raises instead of caching wrong ones).

Per-variant defaults (``method.epochs/lr/batch_size/weight_decay`` left unset = ``None``)
are PILOT's ``exps/aper_*.json`` for CIFAR-100 B0 Inc10 (:data:`VARIANT_DEFAULTS`); the
ImageNet-R settings (``exps/aper_*_inr.json``) are set explicitly in ``configs/``.
The temporary training head is a cosine classifier with a learnable scale, as PILOT's
``CosineLinear`` (initial scale ``method.head_scale``, PILOT's 1 by default; a backbone
with large feature norms such as the DINOv2 ViT-S/14 needs about 16, see
:func:`ptcl.methods.adapt.temporary_head`); cosine annealing ends at lr 0 (PILOT
``min_lr`` 0 in these exps).

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/aper_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.heads.class_statistics import class_means
from ptcl.heads.linear import CosineHead
from ptcl.methods import adapt
from ptcl.methods.adapt import FirstSessionConfig, Tuning
from ptcl.methods.base import FEATURES, Learner
from ptcl.options import option
from ptcl.peft import TuningHandle, disabled
from ptcl.registry import METHODS

log = logging.getLogger(__name__)

_PEFT_COMMON: dict[str, Any] = {"epochs": 20, "lr": 0.01, "batch_size": 48, "weight_decay": 5e-4}

#: LAMDA-PILOT exps/aper_{adapter,finetune,ssf,vpt_shallow,vpt_deep}.json (CIFAR-100 B0 Inc10):
#: tuned_epoch, init_lr, batch_size, weight_decay, ffn_num 64, prompt_token_num 5. SSF
#: starts from PILOT's random init (scale ~ N(1, .02), shift ~ N(0, .02)); VPT's prompts
#: start at zero (APER's code: RevisitingCIL convs/vpt.py and PILOT backbone/vpt.py create
#: ``Prompt_Tokens`` with ``torch.zeros``; ptcl's VPT module defaults to the VPT paper's
#: Xavier-uniform).
_VPT: dict[str, Any] = {"num_prompts": 5, "init": "zeros"}
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "adapter": {**_PEFT_COMMON, "tuning_options": {"bottleneck": 64}},
    "ssf": {**_PEFT_COMMON, "tuning_options": {"init": "paper"}},
    "vpt_shallow": {**_PEFT_COMMON, "tuning_options": dict(_VPT)},
    "vpt_deep": {**_PEFT_COMMON, "tuning_options": dict(_VPT)},
    "finetune": {"epochs": 6, "lr": 0.01, "batch_size": 128, "weight_decay": 0.05, "tuning_options": {}},
}


_VARIANTS = "LAMDA-PILOT exps/aper_*.json, CIFAR-100 B0 Inc10 (VARIANT_DEFAULTS)"


@dataclass
class AperConfig(FirstSessionConfig):
    """APER options. ``epochs``, ``lr``, ``batch_size`` and ``weight_decay`` left at ``None``
    take the variant's paper default (:data:`VARIANT_DEFAULTS`); ``tuning_options`` are
    merged over the variant's (bottleneck 64 / 5 prompt tokens initialised to zero / SSF
    paper init)."""

    name: str = option("aper")
    tuning: Tuning = option(
        "adapter", "first-session tuning module: finetune (all weights), adapter (AdaptFormer), ssf, "
        "vpt_shallow or vpt_deep (none: use simplecil)", source="APER paper and PILOT exps/aper_*.json (main variant)")
    epochs: int | None = option(  # type: ignore[assignment]
        None, "first-session training epochs; null: the variant's (20; finetune 6)", source=_VARIANTS)
    lr: float | None = option(  # type: ignore[assignment]
        None, "first-session learning rate; null: the variant's (0.01)", source=_VARIANTS)
    batch_size: int | None = option(  # type: ignore[assignment]
        None, "first-session batch size; null: the variant's (48; finetune 128)", source=_VARIANTS)
    weight_decay: float | None = option(  # type: ignore[assignment]
        None, "weight decay; null: the variant's (5e-4; finetune 0.05)", source=_VARIANTS)
    tuning_options: dict[str, Any] = option(
        help="options of the tuning module (ptcl.peft), merged over the variant's: adapter bottleneck 64, "
        "vpt_* 5 prompt tokens with init 'zeros' (APER's code; 'xavier': the VPT paper's), ssf init 'paper'",
        factory=dict, source=_VARIANTS)

    def __post_init__(self) -> None:
        if self.tuning == "none":
            raise ConfigError(
                "method.tuning=none is APER without adaptation, i.e. SimpleCIL: "
                "use method.name=simplecil"
            )
        if self.tuning not in VARIANT_DEFAULTS:
            raise ConfigError(f"bad value {self.tuning!r} for method.tuning; valid: {', '.join(VARIANT_DEFAULTS)}")
        defaults = VARIANT_DEFAULTS[self.tuning]
        for key in ("epochs", "lr", "batch_size", "weight_decay"):
            if getattr(self, key) is None:
                setattr(self, key, defaults[key])
        self.tuning_options = {**defaults["tuning_options"], **self.tuning_options}
        super().__post_init__()


@METHODS.register("aper")
class Aper(Learner):
    """APER: first-session tuning, then a cosine classifier of concatenated prototypes (Zhou et al., IJCV 2024)."""

    config_cls = AperConfig
    inputs = FEATURES

    def __init__(self, cfg: AperConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        adapt.check_tuning(backbone, cfg)  # a bad tuning/backbone pair fails at set-up
        self.handle: TuningHandle | None = None  # attached by the first before_task
        self.updates_backbone = cfg.tuning == "finetune"
        self.head = CosineHead(2 * backbone.feature_dim)
        self._features: dict[str, torch.Tensor] = {}  # split -> [pre-trained, adapted]

    # -- lifecycle ---------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        if task.is_first:  # the tuning module is structure: replayed on resume
            self.handle = adapt.attach_tuning(self.backbone, self.cfg)
        self.head.grow(task.num_new)

    def train_task(self, task: Task) -> None:
        if not task.is_first:
            return  # the backbone stays frozen after the first task
        for split in ("train", "test"):  # pre-trained features, before any weight changes
            self._pretrained(split)
        self.to(self.device)
        adapt.tune_first_session(self, self.backbone, self.handle, task, self.cfg)
        self._features.clear()

    def after_task(self, task: Task) -> None:
        feats, labels = self.features("train", task.classes)
        self.head.weight.data[task.start : task.end] = class_means(feats, labels, task.classes).to(
            self.head.weight.device
        )

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    # -- features ------------------------------------------------------------------------
    def features(self, split: str, classes: Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
        """``[pre-trained, adapted]`` features (2 x D) and labels of ``classes`` in ``split``."""
        if split not in self._features:
            adapted = adapt.adapted_features(self, self.backbone, split)
            self._features[split] = torch.cat([self._pretrained(split), adapted], dim=1)
        pos = torch.from_numpy(self.ctx.data.positions(split, classes))
        return self._features[split][pos], self.ctx.data.labels(split, classes)

    def _pretrained(self, split: str) -> torch.Tensor:
        """Pre-trained features of ``split`` (the shared frozen-feature cache)."""
        with self._pretrained_forward():
            return self.ctx.data.frozen_features(split)

    @contextmanager
    def _pretrained_forward(self) -> Iterator[None]:
        """Make a cache miss compute pre-trained features: tuning modules are bypassed;
        full fine-tuning cannot be undone, so a miss after it raises instead."""
        if not self.updates_backbone:
            with disabled(self.backbone.model):
                yield
            return
        bb = self.backbone

        def check(module: torch.nn.Module, args: Any) -> None:
            hook.remove()
            if bb.state_fingerprint() != bb.fingerprint():
                raise RuntimeError(
                    "aper tuning=finetune: the pre-trained features are not in the feature "
                    "cache and the backbone is already fine-tuned; rerun with the feature "
                    "cache enabled (the run computes them before tuning)"
                )

        hook = bb.register_forward_pre_hook(check)
        try:
            yield
        finally:
            hook.remove()

    # -- checkpointing ---------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._features.clear()  # the adapted weights may change: recompute features lazily
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

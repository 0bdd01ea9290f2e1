"""PromptFusion: a prompted CLIP (stabiliser) and a prompted ViT (booster), logits mixed.

Chen, Wu, Han, Jia, Jiang. "PromptFusion: Decoupling Stability and Plasticity for Continual
Learning." ECCV 2024 (arXiv:2303.07223). Official code: github.com/HaoranChen/PromptFusion
(``model.py`` Clip_PF / VisionEncoder / TextEncoder, ``prompt.py``, ``train_pf.py``,
``main.py``, ``vision_transformer.py``, ``dataset.py``, ``config/pf_*.json``), partly built on
LAMDA-PILOT. Defaults are ``config/pf_cifar.json``'s.

Two frozen pre-trained models, both fed the same image:

* **Stabiliser**: the run's backbone, a frozen CLIP (``backbone.name: clip``; the official
  loads OpenAI's ViT-B/16). Text side: CoOp with **class-specific** contexts, ``n_ctx``
  (M = 30) learned vectors per class, ``N(0, 0.01^2)``, a new set per task; older sets are
  frozen (the official keeps their prompt embeddings and drops their parameters). As the
  official ``prompt.py`` ``clip_text_prompt_genarator``, class ``c``'s text is
  ``"X " * 2M + name + "."`` (``_`` in the name as spaces); after the start token the first
  M placeholder embeddings are replaced by the contexts and the other M "X" tokens stay in
  the sequence (``keep_placeholders: false``: M placeholders, CoOp's own layout). The text
  transformer runs on these embeddings (:meth:`TextTower.encode_embeddings`). Image side:
  one shared image prompt (``clip_prompt_length`` tokens of the tower's width, init
  ``N(0, 1)``, trained in every task) inserted after ``ln_pre`` without a position
  embedding (``[cls, prompts, patches]``); the image feature is ``ln_post`` of the **mean of
  the prompt tokens' outputs**, then ``proj`` (``model.py`` ``VisionEncoder``).
  ``clip = logit_scale.exp() * cos(image, text)`` with CLIP's frozen ``logit_scale``.
* **Booster**: a second frozen ViT (``vit_backbone``, built with
  :func:`ptcl.backbones.build_backbone`; the official ``vit_base_patch16_224`` with the
  ``imagenet21k/ViT-B_16.npz`` weights, i.e. timm's ``vit_base_patch16_224.orig_in21k``)
  with VPT-shallow prompts (``vpt_prompt_length``, init ``U(-1, 1)``) inserted after the CLS
  token, ``[cls, prompts, patches]``, each prompt given the CLS token's position embedding
  (the official ``resize_pos_embed`` copies it to the prompt positions); feature = the mean
  of the prompt tokens after the final norm; one trainable linear head over **all** classes
  of the scenario (timm init: truncated normal std 0.02, bias 0), sliced to the seen ones.

Logits over the seen classes: ``(1 - sigmoid(lambda)) * clip + sigmoid(lambda) * vpt``,
``lambda`` one learned scalar (init 1), never reset.

Loss (``train_pf.py``): ``nll_loss(log_softmax(logits) * W, y)``; from the second task on
``W`` is the official weight mask, indexed by batch slot: old classes ``theta /
sigmoid(beta)`` with ``theta = task / 2`` and ``beta`` a fresh ``(batch_size, old classes)``
parameter of ones each task, new classes ``sigmoid(alpha)`` with ``alpha`` one
``(batch_size, increment)`` parameter of ones trained from the second task on. Since the mask
has one row per batch slot the official loader drops the last incomplete batch
(``drop_last``); without it a smaller last batch uses the first rows.

Rehearsal: a total of ``memory_size`` (5000) exemplars (``memory_size // seen classes`` per
class), chosen by herding on the frozen CLIP image embeddings (the feature cache), stored
as positions (:class:`ptcl.data.memory.ExemplarMemory`) and served with the task's images
(``ConcatDataset``) from the second task on.

Optimiser: AdamW over the new contexts, the CLIP image prompt, lambda, the VPT prompts, the
head (and alpha, beta from the second task on), rebuilt every task, cosine annealing per
epoch, gradient norm clipped at 1.0 (``train_pf.py``).

Input pipeline (``dataset.py``): the official trains and tests on one transform, ``Resize(224,
bicubic) + CenterCrop(224) + CLIP mean/std``, and feeds the same CLIP-normalised tensor to
the ViT (whose weights were trained on mean/std 0.5). ptcl does the same: both branches get
the run backbone's (CLIP's) evaluation transform for training and testing
(``train_transform: eval``; ``augment`` serves ``method.augment``'s recipe instead).

Differences from the official code:

* Herding is ptcl's (PILOT's: each step the sample bringing the mean of the chosen closest to
  the class mean of the L2-normalised features); the official continuum
  ``herd_closest_to_barycenter`` is iCaRL's running-target form (capped at 1000 steps).
  Both keep a class's first exemplars when it shrinks.
* The old classes' text features (frozen contexts) are encoded once per task and at
  evaluation once per task, instead of with the new classes at every step and every test
  batch: the same values up to floating-point rounding.
* ``alpha`` is sized by the largest task after the first and sliced to each task's new
  classes (the official assumes equal tasks); the image prompt and contexts take the towers'
  widths (the official hard-codes ViT-B/16's 768 and 512).
* The prompts enter through :class:`ptcl.peft.prompting.PromptInjector` (block-0 tokens,
  kept in the output), not ``vpt_shallow``, which strips the prompt outputs and gives them
  no position embedding.
* The official reports the mean of the per-task accuracies (test batch 1); ptcl the accuracy
  over all seen test images (equal on CIFAR-100's equal task test sets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ptcl.backbones import build_backbone
from ptcl.backbones.base import Backbone
from ptcl.backbones.clip import TextTower, text_tower
from ptcl.config import BackboneConfig, TrainConfig
from ptcl.data.memory import ExemplarMemory
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.base import IMAGES, Learner, LearnerContext, require_vit
from ptcl.options import option
from ptcl.peft.prompting import PromptInjector, attach_prompting
from ptcl.registry import METHODS
from ptcl.seeding import generator

log = logging.getLogger(__name__)

_CFG = "official PromptFusion config/pf_cifar.json"
_MODEL = "official PromptFusion model.py"
_TRAIN = "official PromptFusion train_pf.py"


@dataclass
class PromptFusionConfig(TrainConfig):
    """Defaults of the official ``config/pf_cifar.json`` (ImageNet-R: ``pf_imagenetr.json``,
    ``configs/promptfusion_imagenetr_b0inc20.yaml``)."""

    name: str = option("promptfusion")
    epochs: int = option(3, source=_CFG)
    lr: float = option(0.002, source=_CFG)
    batch_size: int = option(32, source=_CFG)
    optimizer: Literal["sgd", "adam", "adamw"] = option("adamw", source=_TRAIN)
    weight_decay: float = option(1e-4, source=_CFG)
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant", "coda_cosine"] = option(
        "cosine", source=f"{_TRAIN} (CosineAnnealingLR(T_max=epoch), stepped per epoch)")
    clip_grad: float | None = option(1.0, source=f"{_TRAIN} (clip_grad_norm_ 1.0)")
    n_ctx: int = option(30, "M: learned text context vectors per class (CoOp, class-specific)", gt=0,
                        source=f"{_CFG} (M)")
    keep_placeholders: bool = option(
        True, "the text is 'X ' * 2M + name and only the first M placeholders are replaced (the official "
        "prompt string); false: M placeholders (CoOp's layout)", source="official PromptFusion prompt.py")
    ctx_init_std: float = option(0.01, "std of the normal init of the text contexts", gt=0,
                                 source=f"{_MODEL} (update_parameters)")
    clip_prompt_length: int = option(30, "tokens of the shared prompt of the CLIP image tower", gt=0,
                                     source=f"{_CFG} (clip_image_prompt_length)")
    vpt_prompt_length: int = option(30, "VPT-shallow prompt tokens of the booster ViT", gt=0,
                                    source=f"{_CFG} (vpt_prompt_length)")
    vit_backbone: str = option(
        "vit_base_patch16_224.orig_in21k", "the booster ViT: a registered backbone or timm name",
        source="official PromptFusion main.py / vision_transformer.py (vit_base_patch16_224, "
        "imagenet21k/ViT-B_16.npz)")
    vit_weights: str | None = option(None, "a local checkpoint of vit_backbone (offline)", path=True,
                                      source="ptcl (the official loads imagenet21k/ViT-B_16.npz)")
    lambda_init: float = option(1.0, "initial lambda; sigmoid(lambda) weighs the ViT branch's logits",
                                source=f"{_MODEL} (lambda_ = ones(1))")
    memory_size: int = option(5000, "exemplars in total over the seen classes (0: no rehearsal)", ge=0,
                              source="official PromptFusion config/pf_*.json (memory_size)")
    memory_selection: Literal["herding", "closest_to_mean", "random"] = option(
        "herding", "how exemplars are chosen on the frozen CLIP image embeddings: herding (official barycenter), "
        "closest_to_mean (continuum's herd_closest_to_cluster; the official 'closest' branch of train_pf.py adds "
        "nothing to the memory) or random",
        source="official PromptFusion config/pf_*.json (herding_method barycenter)")
    drop_last: bool = option(True, "drop the last incomplete training batch (the weight mask has one row "
                             "per batch slot)", source=f"{_TRAIN} (DataLoader drop_last=True)")
    train_transform: Literal["eval", "augment"] = option(
        "eval", "training images: the evaluation transform (no augmentation, the official dataset.py) or "
        "method.augment's recipe", source="official PromptFusion dataset.py (one transform for train and test)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.vit_backbone.strip():
            raise ConfigError("method.vit_backbone must name the booster ViT, e.g. vit_base_patch16_224.orig_in21k")


def mix_logits(clip: torch.Tensor, vpt: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``(1 - sigmoid(lam)) * clip + sigmoid(lam) * vpt`` (official ``train_pf.py``)."""
    w = torch.sigmoid(lam)
    return (1 - w) * clip + w * vpt


def weight_mask(theta: float, beta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The official loss weights ``(B, old + new)``: ``theta / sigmoid(beta)`` for the old
    classes (``beta`` ``(B, old)``), ``sigmoid(alpha)`` for the new ones (``alpha`` ``(B, new)``)
    (``model.py`` ``generate_weight_mask``)."""
    return torch.cat([theta / torch.sigmoid(beta), torch.sigmoid(alpha)], dim=1)


def _cls_position(model: nn.Module) -> torch.Tensor:
    """The CLS token's position embedding ``(D,)`` of a timm ViT (zeros where the CLS token
    has none): the official gives it to every VPT prompt."""
    pos = getattr(model, "pos_embed", None)
    if pos is None or getattr(model, "no_embed_class", False) or getattr(model, "cls_token", None) is None:
        return torch.zeros(model.embed_dim, device=next(model.parameters()).device)
    return pos[0, 0]


@METHODS.register("promptfusion")
class PromptFusion(Learner):
    """PromptFusion: CoOp-prompted CLIP + VPT-prompted ViT, logits mixed by a learned weight (Chen et al., ECCV 2024)."""

    config_cls = PromptFusionConfig
    inputs = IMAGES
    #: the backbone of the registry-generated tests (tests/helpers.py ``tiny_overrides``)
    test_backbone = "clip_tiny_test"
    test_options = {"vit_backbone": "vit_tiny_test", "memory_size": 12, "n_ctx": 2, "clip_prompt_length": 2,
                    "vpt_prompt_length": 2}

    def __init__(self, cfg: PromptFusionConfig, backbone: Backbone, ctx: LearnerContext) -> None:
        super().__init__(cfg, backbone, ctx)
        text = text_tower(backbone, "promptfusion")  # a ConfigError without one
        require_vit(backbone, "promptfusion")
        sc = ctx.scenario
        if sc is not None and len(ctx.class_names) != sc.num_classes:
            raise ConfigError(f"promptfusion needs the name of every class; the context has "
                              f"{len(ctx.class_names)} names for {sc.num_classes} classes")
        placeholders = cfg.n_ctx * (2 if cfg.keep_placeholders else 1)
        if placeholders + 3 > text.context_length:
            raise ConfigError(f"method.n_ctx={cfg.n_ctx} leaves no room for the class name in CLIP's "
                              f"{text.context_length} text tokens ({placeholders} placeholders); lower it")
        # the booster: a second frozen backbone at the run's input size (both see the same image)
        self.vit = build_backbone(BackboneConfig(name=cfg.vit_backbone, image_size=backbone.preprocess.image_size,
                                                 weights=cfg.vit_weights))
        require_vit(self.vit, "promptfusion's method.vit_backbone")
        self.vit.requires_grad_(False)
        self._pretrained_keys |= {f"vit.{k}" for k in self.vit.state_dict()}  # frozen: not checkpointed
        self.clip_prompting: PromptInjector = attach_prompting(backbone)
        self.vit_prompting: PromptInjector = attach_prompting(self.vit)
        seed = ctx.seed
        width = backbone.model.embed_dim
        self.image_prompt = nn.Parameter(
            torch.randn(cfg.clip_prompt_length, width, generator=generator(seed, "promptfusion-image-prompt")))
        dim = self.vit.model.embed_dim
        self.vpt_prompt = nn.Parameter(torch.empty(cfg.vpt_prompt_length, dim).uniform_(
            -1, 1, generator=generator(seed, "promptfusion-vpt-prompt")))
        num_classes = sc.num_classes if sc is not None else 0
        self.head = nn.Linear(self.vit.feature_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02, generator=generator(seed, "promptfusion-head"))
        nn.init.zeros_(self.head.bias)
        self.lambda_ = nn.Parameter(torch.full((1,), float(cfg.lambda_init)))
        later = max(sc.sizes[1:], default=0) if sc is not None else 0
        self.alpha = nn.Parameter(torch.ones(cfg.batch_size, later))
        self.contexts = nn.ParameterDict()  # task index -> (new classes, M, text width)
        self.register_buffer("tokens", torch.zeros(0, text.context_length, dtype=torch.long), persistent=False)
        self.memory = (ExemplarMemory(total=cfg.memory_size, selection=cfg.memory_selection)
                       if cfg.memory_size > 0 else None)
        self._text_cache: torch.Tensor | None = None  # normalised text features of the seen classes

    @property
    def text(self) -> TextTower:
        """The backbone's text tower (a property: a second registration would put its
        weights into the learner's checkpoints)."""
        return self.backbone.text

    def inference_cost(self) -> dict[str, int]:
        """Two backbone passes per image: the CLIP image tower and the booster ViT (the text
        features are computed once per task)."""
        return {**super().inference_cost(), "backbone_passes": 2}

    # -- structure ------------------------------------------------------------------------
    def prompt_texts(self, classes: range | list[int]) -> list[str]:
        """The official prompt strings of ``classes``: ``"X " * placeholders + name + "."``."""
        n = self.cfg.n_ctx * (2 if self.cfg.keep_placeholders else 1)
        prefix = " ".join(["X"] * n)
        return [f"{prefix} {self.ctx.class_names[c].replace('_', ' ')}." for c in classes]

    def before_task(self, task: Task) -> None:
        self._text_cache = None
        dev = self.lambda_.device
        for p in self.contexts.values():
            p.requires_grad_(False)  # old classes' contexts are frozen
        g = generator(self.ctx.seed, "promptfusion-contexts", task.index)
        init = torch.empty(task.num_new, self.cfg.n_ctx, self.text.width).normal_(0, self.cfg.ctx_init_std,
                                                                                   generator=g)
        self.contexts[str(task.index)] = nn.Parameter(init.to(dev))
        tokens = self.text.tokenize(self.prompt_texts(task.classes)).to(dev)
        self.tokens = torch.cat([self.tokens[: task.start], tokens])

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(state)
        self._text_cache = None

    # -- the two branches -----------------------------------------------------------------
    def class_text(self, start: int, contexts: torch.Tensor) -> torch.Tensor:
        """Normalised text features ``(n, E)`` of classes ``start .. start + n`` with their
        contexts ``(n, M, width)`` spliced in after the start token."""
        tokens = self.tokens[start : start + len(contexts)]
        emb = self.text.token_embedding(tokens)
        m = contexts.shape[1]
        emb = torch.cat([emb[:, :1], contexts.to(emb.dtype), emb[:, 1 + m :]], dim=1)
        return self.text.encode_embeddings(emb, tokens, normalize=True)

    def tasks_text(self, num_tasks: int) -> torch.Tensor:
        """Normalised text features of the classes of tasks ``0 .. num_tasks - 1``."""
        parts, start = [], 0
        for i in range(num_tasks):
            contexts = self.contexts[str(i)]
            parts.append(self.class_text(start, contexts))
            start += len(contexts)
        return torch.cat(parts)

    def clip_image_features(self, x: torch.Tensor) -> torch.Tensor:
        """The prompted CLIP image embedding ``(B, E)``: ``proj(ln_post(mean of the prompt
        tokens' outputs))`` (official ``VisionEncoder``)."""
        model, inj = self.backbone.model, self.clip_prompting

        def pool_prompts(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
            return (args[0][:, inj.token_slice].mean(1, keepdim=True),)  # ln_post sees the mean only

        hook = model.norm.register_forward_pre_hook(pool_prompts)
        try:
            with inj.use(tokens=self.image_prompt, keep_tokens=True):
                return model.forward_head(model.forward_features(x))
        finally:
            hook.remove()

    def vit_features(self, x: torch.Tensor) -> torch.Tensor:
        """The booster's feature ``(B, D)``: the mean of the prompt tokens after the final norm."""
        model, inj = self.vit.model, self.vit_prompting
        with inj.use(tokens=self.vpt_prompt + _cls_position(model), keep_tokens=True):
            tokens = self.vit.forward_tokens(x)
        return model.fc_norm(tokens[:, inj.token_slice].mean(1))

    def branch_logits(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(clip, vpt)`` logits ``(B, C)`` over the ``C = len(text)`` first classes."""
        img = F.normalize(self.clip_image_features(x), dim=-1)
        clip = self.text.logit_scale.exp() * img @ text.T
        vpt = self.head(self.vit_features(x))[:, : len(text)]
        return clip, vpt

    def logits(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The mixed logits over the first ``len(text)`` classes."""
        return mix_logits(*self.branch_logits(x, text), self.lambda_)

    # -- training ------------------------------------------------------------------------
    def task_loss(self, x: torch.Tensor, y: torch.Tensor, task: Task, old_text: torch.Tensor | None,
                  beta: torch.Tensor | None) -> torch.Tensor:
        """The official loss of one batch: ``nll(log_softmax(logits) * mask, y)`` over the seen
        classes, the weight mask from the second task on (``beta`` given)."""
        text = self.class_text(task.start, self.contexts[str(task.index)])
        if old_text is not None:
            text = torch.cat([old_text, text])
        logp = F.log_softmax(self.logits(x, text), dim=1)
        if beta is not None:
            alpha = self.alpha[:, : task.num_new]
            logp = logp * weight_mask(task.index / 2, beta, alpha)[: len(y)]
        return F.nll_loss(logp, y)

    def train_dataset(self, task: Task) -> Dataset:
        """The task's training images and, from the second task on, the exemplars."""
        data, augment = self.ctx.data, self.cfg.train_transform == "augment"
        ds: Dataset = data.images("train", task.classes, train_transform=augment)
        if self.memory is not None and len(self.memory):
            ds = ConcatDataset([ds, self.memory.dataset(data, train_transform=augment)])
            ds.augmented = augment and data.augment.random  # per-sample seeds in the loader
        return ds

    def train_task(self, task: Task) -> None:
        cfg: PromptFusionConfig = self.cfg  # type: ignore[assignment]
        self._text_cache = None
        dev = self.lambda_.device
        ds = self.train_dataset(task)
        if cfg.drop_last and len(ds) < cfg.batch_size:
            log.warning("promptfusion task %d: %d training samples make no full batch of %d (method.drop_last); "
                        "nothing is trained", task.index, len(ds), cfg.batch_size)
        old_text = None
        if task.index:
            with torch.no_grad():  # frozen contexts: encoded once per task
                old_text = self.tasks_text(task.index)
        beta = nn.Parameter(torch.ones(cfg.batch_size, task.start, device=dev)) if task.index else None
        params = [self.contexts[str(task.index)], self.image_prompt, self.lambda_, self.vpt_prompt,
                  *self.head.parameters()]
        if beta is not None:
            params += [self.alpha, beta]

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.task_loss(x, y, task, old_text, beta)

        self.fit(ds, step, params, desc=f"task {task.index}", seed=100 * task.index, drop_last=cfg.drop_last)

    def after_task(self, task: Task) -> None:
        self._text_cache = None
        if self.memory is None:
            return
        data = self.ctx.data
        feats, labels = data.features("train", task.classes)  # frozen CLIP image embeddings
        self.memory.update(data.positions("train", task.classes), labels, feats,
                           generator(self.ctx.seed, "promptfusion-memory", task.index))

    # -- prediction ---------------------------------------------------------------------
    @torch.no_grad()
    def seen_text(self) -> torch.Tensor:
        """Normalised text features ``(seen, E)`` of every seen class (cached until the
        contexts change)."""
        if self._text_cache is None:
            self._text_cache = self.tasks_text(len(self.contexts))
        return self._text_cache

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x, self.seen_text())

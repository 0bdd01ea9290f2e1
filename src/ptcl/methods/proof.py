"""PROOF: projection fusion on a frozen CLIP.

Zhou, Zhang, Wang, Ning, Ye, Zhan, Liu. "Learning without Forgetting for Vision-Language
Models." TPAMI 2025 (arXiv:2305.19270). Official code: https://github.com/zhoudw-zdw/PROOF
(``models/proof.py``, ``utils/inc_net.py`` ``Proof_Net``, ``convs/projections.py``,
``models/base.py``, ``utils/toolkit.py`` ``ClipLoss``, ``exps/*.json``). Defaults follow the
official code and ``exps/cifar.json``.

Both CLIP towers are frozen. Per task ``t`` the learner adds

* an image projection ``P^I_t`` and a text projection ``P^T_t`` (each one ``Linear(E, E)``
  with bias, PyTorch's default initialisation: the official ``Proj_Pure_MLP``); an image
  feature ``f`` is projected as ``sum_t P^I_t(f)`` (all tasks' outputs summed), a text
  feature likewise with the ``P^T_t``;
* ``context_prompts`` (3) context prompts ``(3, E)``, standard normal.

A single cross-modal fusion module (``FusionAttention``: the official ``MultiHeadAttention``
with one head: q/k/v ``Linear(E, E, bias=False)`` with normal init of std
``sqrt(2 / (2E))``, scores divided by ``sqrt(E)``, softmax, attention dropout 0.1, output
``Linear(E, E)`` with Xavier-normal weight, dropout 0.1, residual and ``LayerNorm``; no FFN,
no positions) runs per image over the tokens ``[image, text of every seen class, visual
prototype of every seen class, every task's context prompts]``. The fused image is the
image token's output; the fused text and prototypes are the text / prototype tokens'
outputs *averaged over the batch* (one vector per class shared by the batch, as official).

Prototypes: per class, the mean of the L2-normalised frozen CLIP image features of its
training split (eval transform), computed before the task's training, fixed afterwards;
they pass the image projections (summed, normalised) before the fusion.

Training (per batch ``(f, y)``, all seen classes ``0..C-1``, the first template of
``templates`` only): ``i = norm(sum P^I(f))``, ``T = norm(sum P^T(text))`` ``(C, E)``,
``(i~, T~, Pr~) = fusion(i, T, prototypes, context)``;
``loss = CE(i~ T~^T, y) + ClipLoss(i, T[y], exp(s)) + CE(i~ Pr~^T, y)`` (no temperature in
the cross-entropies; ``ClipLoss`` is open_clip's symmetric InfoNCE over the batch with the
label texts, so same-class pairs are negatives; ``s``: ``logit_scale``, a parameter of this
learner initialised from the text tower's, trained as the official code trains CLIP's).
SGD (momentum 0.9, weight decay 0.05 on every trained tensor, lr 0.001), cosine per epoch
to 0, rebuilt each task, 5 epochs, batch 64. Trained: the newest image projection, the
text projections, the newest context prompts, the fusion module and ``logit_scale``.

Evaluation: the text of a class is the normalised mean over every template of
``norm(sum P^T(text))``; logits ``= f' T^T + i~ T~^T + i~ Pr~^T`` with ``f' = sum P^I(f)``
*not normalised* (official quirk: it is normalised in training), fed to the fusion as is.

Rehearsal: after each task, exemplars of the new classes are chosen by herding on the
frozen CLIP image features (:class:`ptcl.data.memory.ExemplarMemory`) and added to the next
tasks' training data: 20 per class (``memory_per_class``, official ``fixed_memory: true``),
or ``memory_size // seen classes`` with ``memory_size`` (``fixed_memory: false``).

Official behaviour kept as the default, the paper's where it differs as an option:

* ``freeze_old_text_projections: false`` -- the official ``freeze_projection_weight_new``
  freezes the old *image* projections only; it sets ``requires_grad=True`` on every text
  projection, so old text projections keep training. ``true``: old text projections are
  frozen too, as the paper says ("former projections are fixed").
* ``eval_normalize_image: false`` -- the unnormalised projected image feature at test time.
* ``eval_batch_mean: true`` -- at test time too the fused text and prototypes are averaged
  over the test batch, so a prediction depends on the other images of its batch; the test
  set is then served sorted by class in batches of ``eval_batch_size`` (null:
  ``batch_size``), as the official test loader does (``eval_protocol``
  ``batch_mean_fusion_class_order``). ``false``: each image's own fused tokens (a batch of
  one), a per-image prediction.

Differs from the official code:

* Training reads the cached frozen CLIP features (``inputs = FEATURES``): the official code
  trains on the eval transform too (``utils/data.py`` ``build_transform`` ignores
  ``is_train``), so this is the same data without a backbone pass per step. The text
  embeddings of the frozen tower are computed once per class and prompt, not every step.
* The fusion runs on the shared tokens once per batch and mixes in each image's token
  (``FusionAttention.forward_shared``): the same function as running the layer on the
  expanded ``(B, 1 + 2C + 3T, E)`` token tensor (``FusionAttention.forward``; same
  dropout draws) up to float rounding, several times cheaper; with no attention dropout
  (evaluation) the shared tokens' outputs are a closed-form mix of two vectors per image.
* Initialisation draws come from generators derived from the run seed and the task
  (ptcl's seeding), not ``torch.manual_seed(1)``; same distributions.
* Not reported: the official log's extra zero-shot and NME accuracies.

Input pipeline: ``configs/proof_*.yaml`` select the official one (CLIP mean/std, resize to
224 and centre crop: ``backbone.input_norm: backbone``, ``eval_crop_ratio: 1.0``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ptcl.backbones.clip import TextTower, text_tower
from ptcl.config import TrainConfig
from ptcl.data.memory import ExemplarMemory
from ptcl.data.scenario import Task
from ptcl.data.templates import TEMPLATE_SETS, resolve_templates
from ptcl.errors import ConfigError, DataError
from ptcl.methods.base import FEATURES, Learner
from ptcl.methods.prompt_pool import ordered_batches
from ptcl.options import option
from ptcl.registry import METHODS
from ptcl.report.results import PER_IMAGE
from ptcl.seeding import generator

log = logging.getLogger(__name__)

_CODE = "official PROOF models/proof.py"
_NET = "official PROOF utils/inc_net.py Proof_Net"
_EXP = "official PROOF exps/cifar.json"

BATCH_MEAN_PROTOCOL = "batch_mean_fusion_class_order"
"""``eval_protocol`` with ``eval_batch_mean``: the fused text and prototype tokens are
averaged over each test batch, the test set served sorted by class (the official loader)."""


@dataclass
class PROOFConfig(TrainConfig):
    name: str = option("proof")
    epochs: int = option(5, source=f"{_EXP} (tuned_epoch; exps/img.json: 10)")
    lr: float = option(0.001, source=f"{_EXP} (init_lr)")
    batch_size: int = option(64, source=f"{_EXP} (exps/img.json: 48)")
    optimizer: Literal["sgd", "adam", "adamw"] = option("sgd", source=f"{_EXP} (optimizer; adam = AdamW)")
    weight_decay: float = option(0.05, source=_EXP)
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant", "coda_cosine"] = option(
        "cosine", source=f"{_CODE} (CosineAnnealingLR(T_max=tuned_epoch, eta_min=min_lr=0) per epoch)")
    templates: str | list[str] = option(
        "simple", f"prompt templates: a set name ({', '.join(TEMPLATE_SETS)}; ptcl.data.templates) or a list of "
        "strings with one {} for the class name; training uses the first, evaluation averages over all",
        source=f"{_CODE} (templates = _data_to_prompt[0] in training, all in _compute_accuracy; "
        "utils/templates.json per dataset)")
    context_prompts: int = option(3, "context prompts added per task (E-dim tokens of the fusion)", ge=0,
                                  source=f"{_NET} (context_prompt_length_per_task)")
    fusion_dropout: float = option(0.1, "dropout of the fusion's attention weights and output", ge=0, lt=1,
                                   source=f"{_NET} (MultiHeadAttention(..., dropout=0.1))")
    freeze_old_text_projections: bool = option(
        False, "freeze the text projections of earlier tasks (the paper); false: they keep training, as in "
        "the official code (only old image projections are frozen)",
        source=f"{_NET} freeze_projection_weight_new")
    eval_normalize_image: bool = option(
        False, "L2-normalise the projected image feature at test time as in training; false: the official "
        "code's unnormalised test feature", source=f"{_CODE} _eval_cnn")
    eval_batch_mean: bool = option(
        True, "average the fused text/prototype tokens over each test batch (official: predictions depend on "
        "the batch; the test set is served sorted by class in batches of eval_batch_size); false: per image",
        source=f"{_CODE} _eval_cnn / {_NET} forward_transformer (mean over dim 0)")
    eval_batch_size: int | None = option(
        None, "eval_batch_mean: test batch size (null: batch_size, the official test loader's)", gt=0,
        source=f"{_CODE} (test_loader batch_size=self.batch_size)")
    memory_per_class: int = option(
        20, "exemplars kept per class (herding on frozen CLIP features), when memory_size is null; 0: none",
        ge=0, source="official PROOF exps/*.json memory_per_class (fixed_memory: true)")
    memory_size: int | None = option(
        None, "total exemplars shared by the seen classes (memory_size // seen per class), replacing "
        "memory_per_class (official fixed_memory: false); null: memory_per_class", gt=0,
        source="official PROOF models/base.py samples_per_class")
    memory_selection: Literal["herding", "closest_to_mean", "random"] = option(
        "herding", "how exemplars are chosen: herding, closest_to_mean (nearest the class mean) or random "
        "(ptcl.data.memory)", source="official PROOF models/base.py _construct_exemplar (herding)")

    def __post_init__(self) -> None:
        super().__post_init__()
        resolve_templates(self.templates)  # raises a ConfigError naming method.templates


def _linear(dim: int, g: torch.Generator) -> nn.Linear:
    """``nn.Linear(dim, dim)`` with PyTorch's default initialisation drawn from ``g``."""
    lin = nn.Linear(dim, dim)
    with torch.no_grad():
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
        bound = 1 / math.sqrt(dim)
        nn.init.uniform_(lin.bias, -bound, bound, generator=g)
    return lin


class FusionAttention(nn.Module):
    """PROOF's fusion layer (official ``convs/projections.py`` ``MultiHeadAttention`` with one
    head): ``LN(drop(softmax(q k^T / sqrt(E)) v W_fc^T + b_fc) + x)`` over tokens ``x``, the
    softmax weights dropped out too. ``g`` draws the initialisation."""

    def __init__(self, dim: int, dropout: float, g: torch.Generator) -> None:
        super().__init__()
        self.dim = dim
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            for w in (self.w_q, self.w_k, self.w_v):
                nn.init.normal_(w.weight, 0.0, math.sqrt(2.0 / (dim + dim)), generator=g)
            nn.init.xavier_normal_(self.fc.weight, generator=g)
            bound = 1 / math.sqrt(dim)
            nn.init.uniform_(self.fc.bias, -bound, bound, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on tokens ``x`` ``(B, L, E)`` -> ``(B, L, E)`` (the reference form)."""
        scores = self.w_q(x) @ self.w_k(x).transpose(1, 2) / math.sqrt(self.dim)
        attn = self.attn_drop(scores.softmax(-1))
        return self.norm(self.drop(self.fc(attn @ self.w_v(x))) + x)

    def forward_shared(self, first: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` on the tokens ``[first[b], *shared]`` of every sample ``b``
        (``first`` ``(B, E)``, ``shared`` ``(S, E)``), computing the projections of the
        shared tokens once. Returns the first token's output ``(B, E)`` and the shared
        tokens' ``(B, S, E)``. With attention dropout active the ``(B, 1+S, 1+S)`` weights
        are formed (same draws as :meth:`forward`); otherwise a shared token's output mixes
        two vectors per sample (its weight on the sample's token and the fixed mix of the
        shared ones) and nothing of size ``B x S x S`` is formed."""
        b, s = first.shape[0], shared.shape[0]
        scale = 1 / math.sqrt(self.dim)
        q1, k1 = self.w_q(first), self.w_k(first)
        qs, ks = self.w_q(shared), self.w_k(shared)
        # fc is linear: W_fc (sum_k a_k v_k) = sum_k a_k (W_fc v_k); its bias is added after
        vf1 = F.linear(self.w_v(first), self.fc.weight)  # (B, E)
        vfs = F.linear(self.w_v(shared), self.fc.weight)  # (S, E)
        s11 = (q1 * k1).sum(-1, keepdim=True) * scale  # (B, 1)  first -> first
        s1s = q1 @ ks.T * scale  # (B, S)  first -> shared
        ss1 = k1 @ qs.T * scale  # (B, S)  shared j -> first of sample b
        sss = qs @ ks.T * scale  # (S, S)  shared -> shared
        if self.training and self.attn_drop.p > 0:
            top = torch.cat([s11, s1s], 1).unsqueeze(1)  # (B, 1, 1+S)
            rest = torch.cat([ss1.unsqueeze(2), sss.expand(b, s, s)], 2)  # (B, S, 1+S)
            attn = self.attn_drop(torch.cat([top, rest], 1).softmax(-1))  # (B, 1+S, 1+S)
            values = torch.cat([vf1.unsqueeze(1), vfs.expand(b, s, -1)], 1)  # (B, 1+S, E)
            mixed = attn @ values
        else:
            a1 = torch.cat([s11, s1s], 1).softmax(-1)  # (B, 1+S): the first token's weights
            out1 = a1[:, :1] * vf1 + a1[:, 1:] @ vfs
            w = torch.sigmoid(ss1 - torch.logsumexp(sss, 1))  # (B, S): shared j's weight on the sample's token
            base = sss.softmax(-1) @ vfs  # (S, E): shared j's mix of the shared tokens alone
            outs = w.unsqueeze(2) * vf1.unsqueeze(1) + (1 - w).unsqueeze(2) * base
            mixed = torch.cat([out1.unsqueeze(1), outs], 1)
        tokens = torch.cat([first.unsqueeze(1), shared.expand(b, s, -1)], 1)
        out = self.norm(self.drop(mixed + self.fc.bias) + tokens)
        return out[:, 0], out[:, 1:]


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """open_clip's (official ``utils/toolkit.py`` ``ClipLoss``) symmetric InfoNCE of paired
    ``image`` and ``text`` features ``(B, E)``: the mean of the image->text and text->image
    cross-entropies of ``scale * image @ text.T`` with targets ``arange(B)``."""
    logits = scale * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@METHODS.register("proof")
class PROOF(Learner):
    """PROOF (Zhou et al., TPAMI 2025): per-task projections and a cross-modal fusion on a frozen CLIP."""

    config_cls = PROOFConfig
    inputs = FEATURES
    #: the backbone of the registry-generated tests (tests/helpers.py ``tiny_overrides``)
    test_backbone = "clip_tiny_test"
    test_options = {"memory_per_class": 2}

    def __init__(self, cfg: PROOFConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        text = text_tower(backbone, "proof")  # a ConfigError without one
        self.templates = resolve_templates(cfg.templates)
        names = ctx.class_names
        if ctx.scenario is not None and len(names) != ctx.scenario.num_classes:
            raise ConfigError(f"proof needs the name of every class; the context has {len(names)} "
                              f"names for {ctx.scenario.num_classes} classes")
        dim = text.embed_dim
        if backbone.feature_dim != dim:
            raise ConfigError(f"proof needs CLIP's image and text embeddings in one space; the backbone's "
                              f"features have {backbone.feature_dim} dims, its text {dim}")
        self.dim = dim
        self.image_projs = nn.ModuleList()  # P^I_t, task t at index t
        self.text_projs = nn.ModuleList()  # P^T_t
        self.context = nn.ParameterList()  # (context_prompts, E) per task
        self.fusion = FusionAttention(dim, cfg.fusion_dropout, generator(ctx.seed, "proof-fusion"))
        self.logit_scale = nn.Parameter(text.logit_scale.detach().clone().float())
        #: (seen classes, E) mean of the normalised frozen image features of each class
        self.register_buffer("prototypes", torch.zeros(0, dim))
        self.memory = None
        if cfg.memory_size is not None or cfg.memory_per_class > 0:
            self.memory = ExemplarMemory(per_class=None if cfg.memory_size else cfg.memory_per_class,
                                         total=cfg.memory_size, selection=cfg.memory_selection)
        self._raw_text: dict[int, torch.Tensor] = {}  # class -> (templates, E): frozen tower, not state
        self._eval_text_memo: tuple[tuple, torch.Tensor] | None = None

    @property
    def text(self) -> TextTower:
        """The backbone's text tower (a property: a second registration would put its
        weights into the learner's checkpoints)."""
        return self.backbone.text

    # -- structure ------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        g = generator(self.ctx.seed, "proof-task", task.index)
        dev = self.prototypes.device
        self.image_projs.append(_linear(self.dim, g).to(dev))
        self.text_projs.append(_linear(self.dim, g).to(dev))
        self.context.append(nn.Parameter(torch.randn(self.cfg.context_prompts, self.dim, generator=g).to(dev)))
        grown = torch.zeros(task.end, self.dim, device=dev)
        grown[: task.start] = self.prototypes[: task.start]
        self.prototypes = grown

    def trainable(self) -> list[nn.Parameter]:
        """What the current task trains (official ``freeze_projection_weight_new`` and
        ``update_context_prompt``): the newest image projection, every text projection (the
        newest only with ``freeze_old_text_projections``), the newest context prompts, the
        fusion and ``logit_scale``. Sets ``requires_grad`` accordingly on the learner's own
        parameters."""
        self.requires_grad_(False)  # the backbone stays frozen
        texts = self.text_projs[-1:] if self.cfg.freeze_old_text_projections else self.text_projs
        params = [*self.image_projs[-1].parameters(), *texts.parameters(), self.context[-1],
                  *self.fusion.parameters(), self.logit_scale]
        for p in params:
            p.requires_grad_(True)
        return params

    # -- features -------------------------------------------------------------------------
    @staticmethod
    def project(projs: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """``sum_t P_t(x)`` over the per-task projections (official ``encode_image`` /
        ``encode_text``: stacked and summed), not normalised."""
        return torch.stack([p(x) for p in projs], 1).sum(1)

    @torch.no_grad()
    def raw_text(self, classes: Sequence[int] | range) -> torch.Tensor:
        """``(len(classes), K, E)`` frozen CLIP text embeddings (unnormalised) of every
        template for each class (names from ``ctx.class_names``); each class's prompts are
        encoded in one call, once per run."""
        missing = [c for c in classes if c not in self._raw_text]
        if missing:
            was = self.text.training
            self.text.eval()
            dev = self.text.token_embedding.weight.device
            for c in missing:
                prompts = [t.format(self.ctx.class_names[c]) for t in self.templates]
                self._raw_text[c] = self.text.encode(self.text.tokenize(prompts).to(dev)).float()
            self.text.train(was)
        return torch.stack([self._raw_text[c] for c in classes])

    def eval_text(self, num_classes: int) -> torch.Tensor:
        """``(C, E)`` test-time text features: per class, the normalised mean over templates of
        the normalised projected text (official ``_eval_cnn``); recomputed only when the text
        projections changed."""
        params = list(self.text_projs.parameters())
        key = (num_classes, self.cfg.templates if isinstance(self.cfg.templates, str) else tuple(self.cfg.templates),
               tuple((id(p), p._version, p.device) for p in params))
        if self._eval_text_memo is not None and self._eval_text_memo[0] == key:
            return self._eval_text_memo[1]
        with torch.no_grad():
            raw = self.raw_text(range(num_classes))  # (C, K, E)
            per = F.normalize(self.project(self.text_projs, raw.to(params[0].device)), dim=-1)
            text = F.normalize(per.mean(1), dim=-1)
        self._eval_text_memo = (key, text)
        return text

    def fuse(self, image: torch.Tensor, text: torch.Tensor, batch_mean: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official ``forward_transformer``: the fusion over ``[image, text (C), prototypes (C),
        context prompts]`` per image, ``image`` ``(B, E)`` and ``text`` ``(C, E)`` as given
        (the prototypes are projected and normalised here). Returns the fused image ``(B, E)``
        and the fused text and prototypes, ``(C, E)`` each averaged over the batch
        (``batch_mean``) or ``(B, C, E)`` per image."""
        c = text.shape[0]
        protos = F.normalize(self.project(self.image_projs, self.prototypes[:c]), dim=-1)
        shared = torch.cat([text, protos, *self.context], 0)
        out1, outs = self.fusion.forward_shared(image, shared)
        fused_text, fused_protos = outs[:, :c], outs[:, c : 2 * c]
        if batch_mean:
            return out1, fused_text.mean(0), fused_protos.mean(0)
        return out1, fused_text, fused_protos

    # -- training -------------------------------------------------------------------------
    def loss(self, f: torch.Tensor, y: torch.Tensor, raw_text: torch.Tensor) -> torch.Tensor:
        """The official training loss of frozen image features ``f`` ``(B, E)`` with labels
        ``y`` over the classes of ``raw_text`` ``(C, E)`` (first template):
        ``CE(i~ T~^T, y) + ClipLoss(i, T[y], exp(s)) + CE(i~ Pr~^T, y)``."""
        image = F.normalize(self.project(self.image_projs, f), dim=-1)
        text = F.normalize(self.project(self.text_projs, raw_text), dim=-1)
        fused_image, fused_text, fused_protos = self.fuse(image, text)
        return (F.cross_entropy(fused_image @ fused_text.T, y)
                + clip_loss(image, text[y], self.logit_scale.exp())
                + F.cross_entropy(fused_image @ fused_protos.T, y))

    @torch.no_grad()
    def store_prototypes(self, task: Task) -> None:
        """Prototypes of the task's classes: means of the normalised frozen features of each
        class's training samples (official ``cal_prototype``)."""
        feats, labels = self.ctx.data.features("train", task.classes)
        feats = F.normalize(feats.float(), dim=-1)
        for c in task.classes:
            rows = labels == c
            if not rows.any():
                raise DataError(f"class {c} ({self.ctx.class_names[c]!r}) has no training sample")
            self.prototypes[c] = feats[rows].mean(0).to(self.prototypes)

    def train_dataset(self, task: Task) -> TensorDataset:
        """The task's frozen training features and the exemplars of earlier classes."""
        data = self.ctx.data
        feats, labels = data.features("train", task.classes)
        if self.memory is not None and len(self.memory):
            pos = self.memory.positions.cpu()
            feats = torch.cat([feats, data.frozen_features("train")[pos]])
            labels = torch.cat([labels, self.memory.labels.cpu()])
        return TensorDataset(feats.float(), labels.long())

    def train_task(self, task: Task) -> None:
        self.to(self.device)
        self.store_prototypes(task)
        raw = self.raw_text(range(task.end))[:, 0].to(self.device)  # the first template
        params = self.trainable()

        def step(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.loss(f, y, raw)

        self.fit(self.train_dataset(task), step, params, desc=f"task {task.index}", seed=100 * task.index)
        self.requires_grad_(False)

    def after_task(self, task: Task) -> None:
        if self.memory is None:
            return
        data = self.ctx.data
        feats, labels = data.features("train", task.classes)
        pos = torch.from_numpy(data.positions("train", task.classes))
        g = generator(self.ctx.seed, "proof-memory", task.index)
        self.memory.update(pos, labels, feats, g)

    # -- inference ------------------------------------------------------------------------
    def logit_terms(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three test-time logits ``(B, C)`` of frozen image features ``f`` ``(B, E)``:
        image-text ``f' T^T``, fused ``i~ T~^T`` and image-prototype ``i~ Pr~^T`` (official
        ``_eval_cnn``; ``f' = sum P^I(f)``, normalised only with ``eval_normalize_image``)."""
        cfg: PROOFConfig = self.cfg  # type: ignore[assignment]
        text = self.eval_text(self.prototypes.shape[0])
        image = self.project(self.image_projs, f.float())
        if cfg.eval_normalize_image:
            image = F.normalize(image, dim=-1)
        fused_image, fused_text, fused_protos = self.fuse(image, text, cfg.eval_batch_mean)
        if cfg.eval_batch_mean:
            return image @ text.T, fused_image @ fused_text.T, fused_image @ fused_protos.T
        return (image @ text.T, torch.einsum("be,bce->bc", fused_image, fused_text),
                torch.einsum("be,bce->bc", fused_image, fused_protos))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        original, fused, proto = self.logit_terms(x)
        return original + fused + proto

    @property
    def eval_protocol(self) -> str:  # type: ignore[override]
        return BATCH_MEAN_PROTOCOL if self.cfg.eval_batch_mean else PER_IMAGE

    def eval_batches(self, classes: Sequence[int] | range, batch_size: int) -> list[list[int]] | None:
        """With ``eval_batch_mean``: the test set sorted by class (stored order within a
        class), in batches of ``eval_batch_size`` (null: ``batch_size``), as the official
        test loader serves it; otherwise ``None`` (per-image predictions)."""
        cfg: PROOFConfig = self.cfg  # type: ignore[assignment]
        if not cfg.eval_batch_mean:
            return None
        labels = self.ctx.data.labels("test", classes).numpy()
        return ordered_batches(labels, "class", cfg.eval_batch_size or cfg.batch_size, [])

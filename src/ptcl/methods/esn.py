"""ESN: stage-isolated classifiers aggregated by energy with temperature voting.

Wang, Ma, Huang, Wang, Su, Hong. "Isolation and Impartial Aggregation: A Paradigm of
Incremental Learning without Interference." AAAI 2023 (arXiv:2211.15969). Official code:
github.com/iamwangyabin/ESN (``main.py``, ``networks.py`` ``incremental_vitood``,
``trainer.py`` ``training``/``eval``, ``models/convit.py`` ``Block``/``ClassAttention``).

Implemented as the official code does it:

* the pre-trained ViT is frozen; ``num_prompts`` (100) instance prompt tokens, shared by all
  tasks, are inserted after the CLS token at the input of block 0 (after the position
  embedding, which they do not get) and kept in the output; an expert reads the token
  sequence of the last block *before* the ViT's final norm (``returnbeforepool=True``):
  ``(B, 1 + num_prompts + N, D)``;
* every task ``t`` gets its own expert, frozen after its task (``experts[str(t)]``, a
  :class:`torch.nn.ModuleDict`): a task token (initialised with the pre-trained CLS token),
  one CaiT/ConViT class-attention block (``norm1``, class attention whose query is the task
  token and whose keys/values are all tokens, ``norm2``, an MLP of ``mlp_ratio`` 0.5; the
  task token is the only output) and a linear head over the task's classes;
* loss of task ``t``: cross-entropy over its classes plus ``lamda * mean((E(x) -
  anchor_energy)^2)`` (:func:`energy_alignment`). The official code computes ``E(x) =
  -logsumexp(-beta * f(x)) / beta`` (``networks.py`` ``_calculate_loss``: ``output_div_t =
  -1.0 * energy_beta * logits``), a soft minimum of the logits, not the free energy
  ``-logsumexp(beta * f(x)) / beta`` the experts are selected by; ``align_energy: official``
  (default) keeps the code's sign, ``standard`` uses the free energy;
* SGD (momentum 0.9, weight decay 5e-4, lr 0.01), per-epoch cosine annealing, batch 128,
  a fresh optimiser per task over the new expert and the prompt;
* inference (``trainer.py`` ``eval``): the prompted ViT runs once; every expert gives its
  logits; for each temperature ``T`` of the *set* of the experts' selected temperatures the
  expert of lowest free energy ``-T logsumexp(f / T)`` is chosen, and the most frequent
  choice wins (``torch.mode``; ties: the lowest expert index)
  (:func:`ptcl.experts.select_by_energy`); the prediction is that expert's argmax
  (:func:`ptcl.experts.scatter_selected`: its logits in its class block, ``-inf``
  elsewhere);
* temperature selection: expert 0 gets ``first_temperature`` (0.001); after task ``t >= 1``,
  on task ``t``'s training images (eval transform, current prompt) and experts ``0..t``,
  each candidate of ``temperatures`` scores its *separation accuracy* (the share of the
  images for which the energy selection picks expert ``t``) and the first best candidate
  is stored with expert ``t`` (:func:`separation_accuracy`, :func:`select_temperature`).

Where ptcl differs from the official code, and why:

* the prompt trains at every task (``prompt_training: every_task``, the default): the
  official ``trainer.py`` builds task ``t >= 1``'s model with ``freezep=True``, which
  freezes a fresh prompt, but then replaces it with the previous task's trained prompt
  (``model.vitprompt = vitprompt``), whose parameters still require gradients, so the
  optimiser (built afterwards from ``requires_grad``) trains it at every task, continuing
  from the previous one. ``first_task`` trains it at task 0 only (what ``freezep``
  intends). Either way old experts are evaluated on the current prompt, as in the official
  ``eval`` (``vitpromptlist[taskid]`` for every expert); their weights never change;
* the official prompt-distillation term (``kdloss`` against ``pre_vitprompt``) is dead
  code (``pre_vitprompt`` is never set), so it is not implemented;
* initial values are drawn from generators derived from the run seed and the task, not
  from the global generator; the distributions are the official ones (class-attention
  block and MLP weights ``trunc_normal(std=0.02)``, biases 0; the head as ``nn.Linear``;
  the prompt as ``nn.Linear(D, num_prompts).weight``: ``U(-1/sqrt(D), 1/sqrt(D))``);
* the class attention is timm's ``ClassAttn`` (the same computation, fused attention) and
  the block uses the ViT's number of heads (the official hard-codes 12, ViT-B's);
* logits are placed in each expert's true class block; the official ``eval`` offsets an
  expert's prediction by ``expert * its own number of classes`` (equal task sizes only);
* the domain-incremental evaluation (``--dil``, CORe50) is not implemented.

Input pipeline: ptcl's defaults, not the official code's; ``configs/esn_*.yaml`` select the
official ones (``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.cait import ClassAttn
from torch import nn

from ptcl.backbones.base import Backbone
from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.experts import free_energy, scatter_selected, select_by_energy
from ptcl.methods.base import IMAGES, Learner, require_vit
from ptcl.options import option
from ptcl.peft.prompting import PromptInjector, attach_prompting
from ptcl.registry import METHODS
from ptcl.seeding import generator, isolated_rng

log = logging.getLogger(__name__)

_MAIN = "official ESN main.py"
_NET = "official ESN networks.py (incremental_vitood)"
_EVAL = "official ESN trainer.py (eval)"
CANDIDATE_TEMPERATURES = [0.001, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
"""The official ``eval``'s ``candidata_temperatures`` ("fast mode")."""


# ------------------------------------------------------------------ pure functions
def energy_alignment(
    logits: torch.Tensor, beta: float, anchor: float, form: Literal["official", "standard"] = "official"
) -> torch.Tensor:
    """ESN's anchor-based energy self-normalisation: ``mean_n (E(x_n) - anchor)^2`` (a scalar).

    ``logits``: ``(N, C)``. ``form="official"``: ``E = -logsumexp(-beta * logits) / beta``
    (the official ``networks.py``: a soft minimum of the logits); ``"standard"``: the free
    energy ``E = -logsumexp(beta * logits) / beta`` (:func:`ptcl.experts.free_energy` at
    temperature ``1 / beta``). Raises ``ValueError`` for ``beta <= 0`` or an unknown form."""
    if form not in ("official", "standard"):
        raise ValueError(f"form must be 'official' or 'standard', got {form!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    energy = free_energy(-logits if form == "official" else logits, 1.0 / beta)
    return ((energy - anchor) ** 2).mean()


def separation_accuracy(logits: Sequence[torch.Tensor], target: int, temperatures: Sequence[float]) -> torch.Tensor:
    """Per temperature, the share of samples (in [0, 1]) for which the lowest free energy
    (:func:`ptcl.experts.select_by_energy` at that temperature alone) is expert ``target``'s.

    ``logits``: one ``(N, C_e)`` tensor per expert. Returns ``(len(temperatures),)`` float."""
    return torch.stack([(select_by_energy(logits, [t]) == target).float().mean() for t in temperatures])


def select_temperature(logits: Sequence[torch.Tensor], target: int, temperatures: Sequence[float]) -> float:
    """The candidate of best :func:`separation_accuracy` (the first one on ties, as the
    official ``np.argmax``)."""
    return float(temperatures[int(separation_accuracy(logits, target, temperatures).argmax())])


# ------------------------------------------------------------------ the expert
class ClassAttentionBlock(nn.Module):
    """CaiT/ConViT class-attention block (official ``models/convit.py`` ``Block`` with
    ``ClassAttention``): ``x (B, 1 + L, D) -> (B, 1, D)``, the updated first token::

        c = x[:, :1] + attn(norm1(x))       # query: the first token; keys/values: all
        c = c + mlp(norm2(c))
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttn(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, :1] + self.attn(self.norm1(x))
        return c + self.mlp(self.norm2(c))


class ESNExpert(nn.Module):
    """One task's expert: task token ``(1, 1, D)``, class-attention block, linear head, and
    the buffer ``temperature`` selected for it. ``forward(tokens (B, L, D)) -> (B, classes)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, num_classes: int, temperature: float) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = ClassAttentionBlock(dim, num_heads, mlp_ratio)
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def reset(self, token: torch.Tensor, g: torch.Generator) -> None:
        """Official initial values, drawn from ``g``: the token copies ``token`` (the
        pre-trained CLS token); block linears ``trunc_normal(std=0.02)`` (timm's absolute
        bounds +-2), biases 0, LayerNorms 1/0; the head as ``nn.Linear``'s default."""
        with torch.no_grad():
            self.token.copy_(token.reshape(1, 1, -1))
            for m in self.block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02, generator=g)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.kaiming_uniform_(self.head.weight, a=math.sqrt(5), generator=g)
            bound = 1.0 / math.sqrt(self.head.in_features)
            nn.init.uniform_(self.head.bias, -bound, bound, generator=g)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.token.to(tokens.dtype).expand(len(tokens), -1, -1), tokens], dim=1)
        return self.head(self.block(x)[:, 0])


# ------------------------------------------------------------------ method
@dataclass
class ESNConfig(TrainConfig):
    """Official defaults (``main.py``, ``networks.py``, ``trainer.py``; README's Split-CIFAR100
    command for ``epochs``)."""

    name: str = option("esn")
    epochs: int = option(30, source="official ESN README.md (Split-CIFAR100: --max_epochs 30; main.py default 50)")
    lr: float = option(0.01, source=f"{_MAIN} (--lr)")
    batch_size: int = option(128, source=f"{_MAIN} (DataLoader batch_size)")
    momentum: float = option(0.9, source=f"{_NET} (configure_optimizers)")
    weight_decay: float = option(5e-4, source="official ESN trainer.py (weight_decay=0.0005)")
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant", "coda_cosine"] = option(
        "cosine", source=f"{_NET} (CosineAnnealingLR(T_max=max_epoch), stepped per epoch)")
    lamda: float = option(0.1, "weight of the energy-alignment loss; 0: cross-entropy only", ge=0,
                          source=f"{_MAIN} (--lamda)")
    anchor_energy: float = option(-10.0, "the anchor the experts' energies are pulled to",
                                  source=f"{_MAIN} (--anchor_energy)")
    energy_beta: float = option(1.0, "beta of the training energy -logsumexp(+-beta f) / beta", gt=0,
                                source=f"{_MAIN} (--energy_beta)")
    align_energy: Literal["official", "standard"] = option(
        "official", "energy of the alignment loss: official -logsumexp(-beta f)/beta (the code's sign) or "
        "standard -logsumexp(beta f)/beta (the free energy used for selection)",
        source=f"{_NET} (_calculate_loss: output_div_t = -1.0 * energy_beta * logits)")
    using_prompt: bool = option(True, "insert the shared instance prompt tokens into the ViT",
                                source=f"{_MAIN} (--using_prompt)")
    num_prompts: int = option(100, "instance prompt tokens after the CLS token", gt=0,
                              source=f"{_NET} (vitprompt = nn.Linear(768, 100))")
    prompt_training: Literal["every_task", "first_task"] = option(
        "every_task", "tasks at which the prompt trains: every_task (what the official code does: the "
        "previous prompt replaces the frozen one) or first_task (freezep's intent)",
        source="official ESN trainer.py (training: model.vitprompt = vitprompt after freezep=True)")
    mlp_ratio: float = option(0.5, "MLP width of each class-attention block / D", gt=0,
                              source=f"{_NET} (ConBlock mlp_ratio=0.5)")
    temperatures: list[float] = option(
        help="candidate temperatures of the per-task selection by separation accuracy", gt=0,
        factory=lambda: list(CANDIDATE_TEMPERATURES), source=f"{_EVAL} (candidata_temperatures, fast mode)")
    first_temperature: float = option(0.001, "temperature of the first expert (no earlier expert to separate)",
                                      gt=0, source=f"{_EVAL} (select_temperature = [0.001])")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperatures:
            raise ConfigError("method.temperatures must list at least one candidate temperature > 0, "
                              f"e.g. {CANDIDATE_TEMPERATURES}")


def _vit_host(backbone: Backbone) -> nn.Module:
    model = backbone.model
    if not (hasattr(model, "forward_features") and isinstance(getattr(model, "norm", None), nn.Module)
            and getattr(model, "cls_token", None) is not None):
        raise ConfigError(f"ESN needs a timm ViT with a CLS token and a final norm; {backbone.name} has none")
    return model


@METHODS.register("esn")
class ESN(Learner):
    """ESN: per-task class-attention experts chosen by energy with temperature voting (Wang et al., AAAI 2023)."""

    config_cls = ESNConfig
    inputs = IMAGES
    test_options = {"num_prompts": 2}

    def __init__(self, cfg: ESNConfig, backbone: Backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        require_vit(backbone, "ESN")
        model = _vit_host(backbone)
        self.dim = int(model.embed_dim)
        self.num_heads = int(model.blocks[0].attn.num_heads)
        self.experts = nn.ModuleDict()  # task t's expert under str(t)
        self.prompting: PromptInjector | None = None
        self.prompt: nn.Parameter | None = None
        if cfg.using_prompt:
            self.prompting = attach_prompting(model)
            bound = 1.0 / math.sqrt(self.dim)  # nn.Linear(D, num_prompts).weight's default range
            init = torch.empty(cfg.num_prompts, self.dim).uniform_(-bound, bound, generator=generator(ctx.seed, "esn-prompt"))
            self.prompt = nn.Parameter(init.to(model.cls_token), requires_grad=False)

    # -- the shared token sequence --------------------------------------------------------
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of the last ViT block, before the final norm, with the prompts after the CLS
        token: ``(B, 1 + num_prompts + N, D)`` (the official ``returnbeforepool=True``)."""
        model = self.backbone.model
        seen: list[torch.Tensor] = []
        hook = model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            if self.prompting is not None:
                with self.prompting.use(tokens=self.prompt, keep_tokens=True):
                    model.forward_features(x)
            else:
                model.forward_features(x)
        finally:
            hook.remove()
        return seen[-1]

    def expert_logits(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Each expert's logits over its own task's classes, in task order."""
        return [e(tokens) for e in self.experts.values()]

    # -- lifecycle ---------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        key = str(task.index)
        if key in self.experts:
            return
        cfg: ESNConfig = self.cfg  # type: ignore[assignment]
        with isolated_rng():  # module construction draws defaults; reset() overwrites them
            expert = ESNExpert(self.dim, self.num_heads, cfg.mlp_ratio, task.num_new, cfg.first_temperature)
        cls = self.backbone.model.cls_token.detach()
        expert.reset(cls.float().cpu(), generator(self.ctx.seed, "esn-expert", task.index))
        expert.requires_grad_(False)
        self.experts[key] = expert.to(device=cls.device, dtype=cls.dtype)

    def trains_prompt(self, task: Task) -> bool:
        """Whether the shared prompt trains at ``task`` (``prompt_training``)."""
        return self.prompt is not None and (self.cfg.prompt_training == "every_task" or task.index == 0)

    def train_task(self, task: Task) -> None:
        cfg: ESNConfig = self.cfg  # type: ignore[assignment]
        self.to(self.device)
        expert = self.experts[str(task.index)]
        train_prompt = self.trains_prompt(task)
        params = list(expert.parameters()) + ([self.prompt] if train_prompt else [])
        data = self.ctx.data.images("train", task.classes, train_transform=True)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if train_prompt:
                toks = self.tokens(x)
            else:
                with torch.no_grad():
                    toks = self.tokens(x)
            logits = expert(toks)
            loss = F.cross_entropy(logits, y - task.start)
            if cfg.lamda > 0:
                loss = loss + cfg.lamda * energy_alignment(logits, cfg.energy_beta, cfg.anchor_energy,
                                                           cfg.align_energy)
            return loss

        for p in params:
            p.requires_grad_(True)
        try:
            losses = self.fit(data, step, params, desc=f"task {task.index}", seed=task.index)
        finally:
            for p in params:
                p.requires_grad_(False)
        log.info("ESN task %d: loss %.4f -> %.4f", task.index, losses[0], losses[-1])

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        """Select expert ``t``'s temperature by separation accuracy on task ``t``'s training
        images (eval transform); expert 0 keeps ``first_temperature``."""
        cfg: ESNConfig = self.cfg  # type: ignore[assignment]
        expert = self.experts[str(task.index)]
        if task.index == 0:
            expert.temperature.fill_(cfg.first_temperature)
            return
        data = self.ctx.data
        self.to(self.device)
        self.eval()
        loader = data.loader(data.images("train", task.classes, train_transform=False), data.batch_size, shuffle=False,
                             shard=False)  # torchrun: every rank selects on all images (same temperature)
        per_batch = [self.expert_logits(self.tokens(x.to(self.device))) for x, _ in loader]
        logits = [torch.cat(parts) for parts in zip(*per_batch)]
        acc = separation_accuracy(logits, task.index, cfg.temperatures)
        t = float(cfg.temperatures[int(acc.argmax())])
        expert.temperature.fill_(t)
        log.info("ESN task %d: temperature %g (separation accuracy %.3f; candidates %s)", task.index, t,
                 float(acc.max()), [round(float(a), 3) for a in acc])

    def voting_temperatures(self) -> list[float]:
        """The distinct temperatures of the experts (the official ``set(select_temperature)``)."""
        return sorted({float(e.temperature) for e in self.experts.values()})

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.expert_logits(self.tokens(x))
        selected = select_by_energy(logits, self.voting_temperatures())
        return scatter_selected(logits, selected)

    def inference_cost(self) -> dict[str, int]:
        """One (prompted) backbone pass, then every expert's class-attention block and head."""
        return {**super().inference_cost(), "backbone_passes": 1, "experts_run": len(self.experts)}

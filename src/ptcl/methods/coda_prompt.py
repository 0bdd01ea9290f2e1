"""CODA-Prompt: prompts assembled per image from a growing set of orthogonal components.

Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris, Kira.
"CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
Continual Learning." CVPR 2023 (arXiv:2211.13218).

Implemented as in the official code (GT-RIPL/CODA-Prompt, ``models/zoo.py`` at its
latest version; LAMDA-PILOT ``models/coda_prompt.py`` and ``exps/coda_prompt*.json``
copy it):

* every prompted block ``l`` (``layers = [0..4]``) has ``M = pool_size = 100`` prompt
  components ``P_m`` of length ``L = 8``, keys ``K_m`` and attention vectors ``A_m`` (both
  of the query's width); the pool is split evenly over the tasks (``M / T`` per task);
* the prompt of an image with query ``q`` (the frozen CLS feature after the final norm)
  is ``sum_m alpha_m P_m`` with ``alpha_m = cos(q * A_m, K_m)``, over the components of
  the tasks seen so far; its first ``L/2`` rows are the attention-prefix keys and the
  last ``L/2`` the values (prefix-tuning, ``P_k, P_v`` concatenated after the q/k/v
  projections, as ``models/vit.py`` does);
* when a task starts, its new components, keys and attention vectors are initialised by
  Gram-Schmidt orthogonal to all earlier ones (and to each other) and of unit norm; the
  components of earlier tasks are frozen (each task's components are their own
  parameters; training detaches the old ones as the official code does, and only the
  current task's are given to the optimiser);
* loss: cross-entropy over the current task's classes (old-class logits ``-inf`` and
  unseen classes cut off, ``train_mask``) ``+ ortho_mu * (||KK^T-I||^2 + ||AA^T-I||^2 +
  ||PP^T-I||^2)`` (mean squares). ``ortho_mu = 0``: the official ImageNet-R script and
  both PILOT configs use 0 ("with updated code, now can be 0"); the older CIFAR script's
  0.1 multiplied a penalty pre-scaled by 1e-6, i.e. effectively ~0 as well;
* Adam (betas 0.9/0.999), lr 0.001, no weight decay, batch 128, 20 epochs (CIFAR-100) /
  50 (ImageNet-R); optimiser and schedule re-created every task (``learn_batch`` calls
  ``init_optimizer`` before each task); the official ``CosineSchedule``
  (``scheduler=coda_cosine``, :func:`ptcl.train.optim.coda_cosine`): the lr of epoch ``e``
  of ``K`` is ``lr * cos(99 pi e / (200 (K - 1)))``, stepped once per epoch.

Deviations: the query is the cached frozen feature of the *un-augmented* image (the
official code queries the augmented view; see :mod:`ptcl.methods.prompt_pool`). The official
Gram-Schmidt subtracts projections on the old components one at a time, which is exact
only while they are still mutually orthogonal (after training they are not); here new
vectors are projected off an orthonormal basis (QR) of the old ones' span, so they are
exactly orthogonal to every old component. (``scheduler=cosine`` gives the toolbox's
``(1 + cos(pi e / K)) / 2`` per epoch instead, whose mean lr is ~20% lower at K = 20.)

Input pipeline: ptcl's defaults (the backbone's own mean/std, ``Resize`` to the input size,
bicubic crops), not the official code's; ``configs/coda_prompt_*.yaml`` select the official ones
(``backbone.input_norm``, ``eval_crop_ratio``, ``method.augment`` ...; README, "Reproducing
the official protocol").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.prompt_pool import PromptConfig, PromptPoolLearner
from ptcl.options import option
from ptcl.registry import METHODS
from ptcl.seeding import generator

_OFFICIAL = "official CODA-Prompt configs/cifar-100_prompt.yaml (= PILOT exps/coda_prompt.json)"


@dataclass
class CodaPromptConfig(PromptConfig):
    name: str = option("coda_prompt")
    epochs: int = option(20, source=f"{_OFFICIAL}; ImageNet-R: 50")
    lr: float = option(0.001, source=_OFFICIAL)
    batch_size: int = option(128, source=_OFFICIAL)
    scheduler: Literal["coda_cosine", "cosine", "constant"] = option(
        "coda_cosine", source=f"{_OFFICIAL} (schedule_type: cosine = utils/schedulers.py CosineSchedule)")
    pool_size: int = option(100, "prompt components M per prompted block, split evenly over the tasks "
                            "(pool_size // tasks each)", gt=0, source=_OFFICIAL)
    prompt_length: int = option(8, "component length L, even: L/2 prefix keys + L/2 prefix values", gt=0,
                                source=_OFFICIAL)
    layers: list[int] = option(help="prompted blocks (prefix-tuning), distinct, at least one", ge=0,
                               factory=lambda: [0, 1, 2, 3, 4], source=_OFFICIAL)
    ortho_mu: float = option(0.0, "weight of the orthogonality penalty on the keys, attention vectors and "
                             "components", ge=0,
                             source="official CODA-Prompt ImageNet-R script and PILOT exps/coda_prompt*.json")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_length % 2:
            raise ConfigError(f"method.prompt_length must be even (keys + values), got {self.prompt_length}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"method.layers must be distinct block indices >= 0, got {self.layers}")


class Components(nn.Module):
    """One task's components: prompts ``p`` (layers, n, L, A), keys ``k`` and attention
    vectors ``a`` (layers, n, D)."""

    def __init__(self, n_layers: int, n: int, length: int, attn_dim: int, key_dim: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(n_layers, n, length, attn_dim))
        self.k = nn.Parameter(torch.zeros(n_layers, n, key_dim))
        self.a = nn.Parameter(torch.zeros(n_layers, n, key_dim))


@torch.no_grad()
def orthogonal_rows(n: int, old: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random unit rows orthogonal to each other and to every row of ``old``
    ``(m, d)`` (Gram-Schmidt of Gaussian vectors drawn from ``generator``, in float64)."""
    d = old.shape[1]
    if old.shape[0] + n > d:
        raise ConfigError(f"cannot make {old.shape[0] + n} mutually orthogonal vectors of width {d}")
    new = torch.randn(n, d, dtype=torch.float64, generator=generator)
    if old.shape[0]:
        basis = torch.linalg.qr(old.detach().double().cpu().t()).Q  # (d, m): span of the old rows
        new -= (new @ basis) @ basis.t()
        new -= (new @ basis) @ basis.t()  # twice is enough (Kahan-Parlett)
    return torch.linalg.qr(new.t()).Q.t().contiguous()


def coda_weights(query: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``(B, M)``: ``alpha_bm = cos(query_b * attn_m, keys_m)``."""
    aq = F.normalize(query[:, None, :] * attn[None], dim=-1)
    return (aq * F.normalize(keys, dim=-1)[None]).sum(-1)


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``(t t^T - I)^2`` over the rows of ``t`` flattened (official ``ortho_penalty``)."""
    t = t.flatten(1)
    return (t @ t.t() - torch.eye(t.shape[0], device=t.device, dtype=t.dtype)).pow(2).mean()


@METHODS.register("coda_prompt")
class CodaPrompt(PromptPoolLearner):
    """CODA-Prompt: per-image prompts assembled from growing orthogonal components (Smith et al., CVPR 2023)."""

    config_cls = CodaPromptConfig
    test_options = {"layers": [0, 1], "pool_size": 10}

    def __init__(self, cfg: CodaPromptConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        depth = len(backbone.model.blocks)
        if max(cfg.layers) >= depth:
            raise ConfigError(f"method.layers {cfg.layers} exceed the backbone's {depth} blocks")
        self.components = nn.ModuleList()  # one Components per task (grown in before_task)

    def check_tasks(self, num_tasks: int) -> None:
        """Raise :class:`ConfigError` unless every task gets components (:meth:`components_per_task`)."""
        self.components_per_task(num_tasks)

    def components_per_task(self, num_tasks: int) -> int:
        """``pool_size // num_tasks``; raises :class:`ConfigError` when that is 0 or when the
        keys of all tasks cannot be mutually orthogonal in the feature width."""
        cfg: CodaPromptConfig = self.cfg  # type: ignore[assignment]
        per_task = cfg.pool_size // num_tasks
        if per_task == 0:
            raise ConfigError(
                f"method.pool_size={cfg.pool_size} is smaller than the scenario's {num_tasks} tasks: "
                f"coda_prompt gives each task pool_size // tasks components; set method.pool_size={num_tasks} (or more)"
            )
        d = self.backbone.feature_dim
        if per_task * num_tasks > d:
            raise ConfigError(
                f"method.pool_size={cfg.pool_size} keys cannot be orthogonal in {d} dimensions "
                f"({num_tasks} tasks of {per_task} components); set method.pool_size <= {d}"
            )
        return per_task

    def before_task(self, task: Task) -> None:
        cfg: CodaPromptConfig = self.cfg  # type: ignore[assignment]
        per_task = self.components_per_task(task.num_tasks)
        d = self.backbone.feature_dim
        super().before_task(task)
        self.components.append(Components(len(cfg.layers), per_task, cfg.prompt_length, self.prompting.attn_dim, d))

    def prepare_task(self, task: Task) -> None:
        """Gram-Schmidt init of the task's components (earlier tasks' stay as they are:
        they are detached in :meth:`gather` and not given to the optimiser)."""
        new = self.components[task.index]
        old = self.components[: task.index]
        gen = generator(self.ctx.seed, "coda-components", task.index)
        with torch.no_grad():
            for name in ("p", "k", "a"):
                param = getattr(new, name)
                for j in range(param.shape[0]):
                    prev = [getattr(c, name)[j].flatten(1) for c in old]
                    prev_rows = torch.cat(prev) if prev else param.new_zeros(0, param[j].flatten(1).shape[1])
                    rows = orthogonal_rows(param.shape[1], prev_rows, gen)
                    param[j].copy_(rows.view_as(param[j]).to(param))

    def trainable(self) -> list[nn.Parameter]:
        return [*self.components[int(self.seen_tasks) - 1].parameters(), *self.head.parameters()]

    def gather(self, task: Task | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P, K, A)`` over the components in use; only the training task's carry gradient."""
        n = len(self.components) if task is None else task.index + 1
        parts = [(c.p, c.k, c.a) if task is not None and i == task.index
                 else (c.p.detach(), c.k.detach(), c.a.detach()) for i, c in enumerate(self.components[:n])]
        return tuple(torch.cat(x, dim=1) for x in zip(*parts, strict=True))  # type: ignore[return-value]

    def prefixes(self, query: torch.Tensor, p: torch.Tensor, k: torch.Tensor, a: torch.Tensor) -> dict:
        """``{block: (keys, values)}`` of each image's assembled prompt."""
        half = self.cfg.prompt_length // 2
        out = {}
        for j, blk in enumerate(self.cfg.layers):
            alpha = coda_weights(query, k[j], a[j])  # (B, M)
            prompt = torch.einsum("bm,mld->bld", alpha, p[j])
            out[blk] = (prompt[:, :half], prompt[:, half:])
        return out

    def prompted_features(
        self, images: torch.Tensor, query: torch.Tensor, task: Task | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the prompted ViT and the orthogonality penalty (0 when unused)."""
        p, k, a = self.gather(task)
        feats = self.prompted_backbone(images, prefixes=self.prefixes(query, p, k, a))
        penalty = feats.new_zeros(())
        if task is not None and self.cfg.ortho_mu > 0:
            penalty = sum(ortho_penalty(k[j]) + ortho_penalty(a[j]) + ortho_penalty(p[j]) for j in range(p.shape[0]))
        return feats, penalty

    def aux_loss(self, aux: torch.Tensor) -> torch.Tensor:
        """The orthogonality penalty, weighted by ``ortho_mu`` (0 in the paper's setting)."""
        return self.cfg.ortho_mu * aux

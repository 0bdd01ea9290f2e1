"""Sequential VPT: one set of visual prompts trained task after task (the naive baseline).

Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim. "Visual Prompt Tuning." ECCV 2022
(arXiv:2203.12119).

Not a continual-learning method of its own: the lower bound of prompt-based methods.
One VPT module (``vpt_deep`` with 5 tokens per block by default, LAMDA-PILOT's VPT setting
in APER, ``exps/aper_vpt_deep.json``; ``deep: false`` gives VPT-shallow) and a growing
linear head are trained on each new task's data only, with cross-entropy over all classes
seen so far; nothing protects old tasks, so the shared prompts and head drift and the
method forgets. The optimiser follows the same PILOT file (SGD, lr 0.01, momentum 0.9,
batch 48, weight decay 5e-4, cosine schedule, 20 epochs), re-created every task, with
gradient clipping at global norm 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptcl.config import TrainConfig
from ptcl.data.scenario import Task
from ptcl.heads.linear import IncrementalLinear
from ptcl.methods.base import IMAGES, Learner, require_vit
from ptcl.options import option
from ptcl.peft import TuningHandle, attach
from ptcl.registry import METHODS

_PILOT = "LAMDA-PILOT exps/aper_vpt_deep.json (APER's VPT setting)"


@dataclass
class VPTSeqConfig(TrainConfig):
    name: str = option("vpt_seq")
    epochs: int = option(20, source=_PILOT)
    lr: float = option(0.01, source=_PILOT)
    batch_size: int = option(48, source=_PILOT)
    weight_decay: float = option(5e-4, source=_PILOT)
    num_prompts: int = option(5, "prompt tokens (per block with deep)", gt=0, source=f"{_PILOT} (prompt_token_num)")
    deep: bool = option(True, "VPT-Deep: fresh prompts at the input of every block; false: VPT-Shallow (block 0 "
                        "only)", source=f"{_PILOT} (vpt_type deep)")
    # Global-norm clipping at 1 (ViT fine-tuning practice): without it the linear head on
    # DINOv2 ViT-S/14 features (norm ~42) overshoots, task-0 loss 2.54 -> 1.98 over two
    # epochs (above ln 4); with it 1.36 -> 1.05 and 65% after 5 epochs.
    clip_grad: float | None = option(1.0, source="ptcl (ViT fine-tuning practice)")


@METHODS.register("vpt_seq")
class VPTSeq(Learner):
    """VPT-Seq: one set of visual prompts trained task after task (prompt lower bound; Jia et al., ECCV 2022)."""

    config_cls = VPTSeqConfig
    inputs = IMAGES

    def __init__(self, cfg: VPTSeqConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        require_vit(backbone, "vpt_seq")
        self.vpt: TuningHandle | None = None  # attached by the first before_task
        self.head = IncrementalLinear(backbone.feature_dim)

    def before_task(self, task: Task) -> None:
        if self.vpt is None:
            kind = "vpt_deep" if self.cfg.deep else "vpt_shallow"
            self.vpt = attach(self.backbone.model, kind, num_prompts=self.cfg.num_prompts)
        self.head.grow(task.num_new)

    def train_task(self, task: Task) -> None:
        data = self.ctx.data.images("train", task.classes, train_transform=True)
        self.to(self.device)
        assert self.vpt is not None
        params = [*self.vpt.parameters(), *self.head.parameters()]
        self.fit(data, lambda x, y: F.cross_entropy(self.predict(x), y), params,
                 desc=f"task {task.index}", seed=task.index)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

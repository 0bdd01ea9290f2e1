"""Parameter-efficient tuning modules attached to unmodified timm models.

Methods (names in :data:`PEFT_METHODS`): ``adapter`` (AdaptFormer), ``ssf`` (SSF),
``vpt_shallow`` / ``vpt_deep`` (VPT), ``lora`` (LoRA on the q/k/v projection), ``prefix``
(prefix tuning, LAE's compensated form) and ``finetune`` (all backbone weights). See
:mod:`ptcl.peft.base` for how a learner uses them. Prompt tokens (VPT and the prompt
methods' :mod:`ptcl.peft.prompting`) are inserted by one mechanism,
:class:`~ptcl.peft.tokens.TokenInserter`.
"""

from __future__ import annotations

from ptcl.peft import adapter, finetune, lora, prefix, ssf, vpt  # noqa: F401  (register the methods)
from ptcl.peft.adapter import AdapterSet
from ptcl.peft.base import (
    PEFT_METHODS,
    TuningHandle,
    TuningModule,
    attach,
    detach,
    disabled,
    load_tuning_state_dict,
    mark_only_tuning_trainable,
    tuning_parameters,
    tuning_state_dict,
)
from ptcl.peft.finetune import FineTune
from ptcl.peft.lora import LoRA
from ptcl.peft.prefix import Prefix
from ptcl.peft.ssf import SSF
from ptcl.peft.tokens import TokenInserter
from ptcl.peft.vpt import VPTDeep, VPTShallow

__all__ = [
    "PEFT_METHODS",
    "SSF",
    "AdapterSet",
    "FineTune",
    "LoRA",
    "Prefix",
    "TokenInserter",
    "TuningHandle",
    "TuningModule",
    "VPTDeep",
    "VPTShallow",
    "attach",
    "detach",
    "disabled",
    "load_tuning_state_dict",
    "mark_only_tuning_trainable",
    "tuning_parameters",
    "tuning_state_dict",
]

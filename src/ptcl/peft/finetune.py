"""Full fine-tuning as a tuning "method": no new modules, every backbone weight trains.

Registering it keeps learners uniform: ``attach(model, "finetune")`` followed by
:func:`~ptcl.peft.base.mark_only_tuning_trainable` makes all backbone parameters trainable.
Since the weights change in place, :func:`~ptcl.peft.base.disabled` refuses to run (the
pre-trained output can only come from a separate frozen copy).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ptcl.peft.base import PEFT_METHODS, TuningModule


@PEFT_METHODS.register("finetune")
class FineTune(TuningModule):
    """A parameter-free marker: the whole backbone is the tuning set."""

    trains_backbone: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()

"""The one train loop, its optimiser / schedule factory and callbacks (used by learners)."""

from ptcl.train.callbacks import AfterStep, Callback, LoopState
from ptcl.train.loop import fit, to_device
from ptcl.train.optim import LRSchedule, OptimizerMemory, make_optimizer

__all__ = ["AfterStep", "Callback", "LRSchedule", "LoopState", "OptimizerMemory", "fit", "make_optimizer", "to_device"]

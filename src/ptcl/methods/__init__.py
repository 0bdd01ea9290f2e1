"""Methods: one file per paper, each registering a :class:`Learner` in ``METHODS``."""

from ptcl.methods import fecam, finetune, ranpac, simplecil  # noqa: F401  (registration)
from ptcl.methods.base import Learner, LearnerContext

__all__ = ["Learner", "LearnerContext"]

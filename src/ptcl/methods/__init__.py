"""Methods: one file per paper, each registering a :class:`Learner` in ``METHODS``."""

from ptcl.methods import (  # noqa: F401  (registration)
    aper,
    coda_prompt,
    cofima,
    coil,
    dap,
    der,
    dgr,
    dualprompt,
    ease,
    esn,
    fecam,
    finetune,
    foster,
    icarl,
    l2p,
    lae,
    memo,
    mos,
    promptfusion,
    proof,
    ranpac,
    simplecil,
    slca,
    vpt_seq,
    zeroshot_clip,
    zscl,
)
from ptcl.methods.base import Learner, LearnerContext

__all__ = ["Learner", "LearnerContext"]

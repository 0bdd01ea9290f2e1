"""Process-group awareness (torchrun-ready): rank, world size, who writes files.

Nothing here is global state: every value is read from ``torch.distributed`` when asked.
Without an initialised process group a run is rank 0 of a world of 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes run folders, checkpoints and caches."""
    return rank() == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device if available, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank() % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)

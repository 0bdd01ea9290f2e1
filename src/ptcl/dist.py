"""Process-group awareness (torchrun-ready): rank, world size, who writes files.

Nothing here is global state: every value is read from ``torch.distributed`` when asked.
Without an initialised process group a run is rank 0 of a world of 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ptcl.errors import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes run folders, checkpoints and caches."""
    return rank() == 0


def available_devices() -> list[str]:
    """The ``device`` values this machine can run on: ``auto``, ``cpu``, then ``cuda`` and
    ``cuda:N`` for each visible GPU, and ``mps`` where Apple's Metal backend is available."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device if available, else CPU; any other name must be
    one of :func:`available_devices`.

    Raises :class:`ConfigError` naming the device and the ones available here (a GPU
    that is not visible, a device kind torch does not know, an empty name)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank() % torch.cuda.device_count())
        return torch.device("cpu")
    available = available_devices()
    if name not in available:
        why = ""
        if isinstance(name, str) and name.startswith("cuda"):
            why = " (no CUDA GPU is visible)" if not torch.cuda.is_available() else (
                f" (this machine has {torch.cuda.device_count()} visible CUDA GPUs)")
        raise ConfigError(f"device {name!r} is not available on this machine{why}; available: {', '.join(available)}")
    return torch.device(name)


def check_single_process() -> None:
    """Refuse a multi-process launch: ptcl trains in one process for now.

    ``torchrun --nproc_per_node=N`` (N > 1) would start N independent runs that race for
    one run folder, and a user-initialised process group would split the data without
    synchronising gradients. Raises :class:`ConfigError` when ``WORLD_SIZE`` is above 1
    or an initialised process group has more than one rank.
    """
    import os

    try:
        env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        env = 1
    n = max(env, world_size())
    if n > 1:
        raise ConfigError(
            f"ptcl runs in a single process for now, but this launch has {n} processes "
            "(WORLD_SIZE / torch.distributed); start it once with `ptcl run ...` "
            "(torchrun with --nproc_per_node=1 also works)"
        )

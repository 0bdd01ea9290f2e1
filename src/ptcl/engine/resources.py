"""Peak memory of one task.

CUDA: ``torch.cuda.max_memory_allocated`` since the task started (tensors only).
CPU (Linux): the process's peak resident set size (``VmHWM``) since the task started; the
peak is reset at the start of every task by writing ``5`` to ``/proc/self/clear_refs``.
Where that reset is not possible, the value is the process's peak so far (it then never
decreases from task to task); :func:`memory_kind` says which was measured.
"""

from __future__ import annotations

import resource

import torch


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class TaskMemory:
    """``start()`` at a task's start, ``peak_mb()`` at its end (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.per_task = True

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.per_task = _reset_rss_peak()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _vm_hwm_mb() if self.per_task else None
        if hwm is not None:
            return hwm
        self.per_task = False
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def kind(self) -> str:
        """What :meth:`peak_mb` measures, for ``metrics.json``."""
        if self.device.type == "cuda":
            return "cuda_max_allocated_per_task"
        return "process_peak_rss_per_task" if self.per_task else "process_peak_rss_so_far"

"""Multi-process runs under ``torchrun``: the process group, who writes, and the collectives.

``torchrun --nproc_per_node=N -m ptcl run ...`` starts N ranks with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT`` in their environment.
:func:`process_group` (around :func:`ptcl.engine.runner.run`) initialises the process group
from that environment (``env://``) once when ``WORLD_SIZE > 1`` and destroys it at the end:
``gloo`` for CPU tensors and object collectives, plus ``nccl`` for CUDA tensors when a GPU
is visible (``"cpu:gloo,cuda:nccl"``). Each rank uses ``cuda:LOCAL_RANK`` (or the CPU).

What runs sharded and how results come together (all with ``torch.distributed`` only):

* training loaders: :class:`ShardedBatches` cuts the single-process order into the same
  global batches and gives each rank its slice; gradients are averaged in the one train loop
  (:class:`ptcl.train.distributed.GradientSync`);
* feature extraction and evaluation: each rank takes a contiguous run of whole batches
  (:func:`shard`), and :func:`gather_rows` puts the rows back in the original order on
  every rank, so statistics computed from them equal the single-process ones.

Without an initialised process group a run is rank 0 of a world of 1 and every helper
here is a no-op. The collective timeout is ``PTCL_DIST_TIMEOUT_S`` seconds (default 1800,
torch's own default): a rank waits that long for the others (e.g. while rank 0 extracts an
archive) before failing with :class:`DistributedError`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ptcl.errors import ConfigError, PtclError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

TIMEOUT_ENV = "PTCL_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0  # torch.distributed's default_pg_timeout (30 minutes)


class DistributedError(PtclError):
    """A collective failed: another rank of the job died, was killed or timed out."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during a multi-process run (torchrun stops every rank when one fails)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes run folders, checkpoints and caches."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def launch_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 without torchrun), also
    before the process group exists or after it is destroyed."""
    return rank() if is_distributed() else _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; 0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0)


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
    one of :func:`available_devices`. Under torchrun (more than one rank) ``auto`` and
    ``cuda`` mean ``cuda:LOCAL_RANK``.

    Raises :class:`ConfigError` naming the device and the ones available here (a GPU
    that is not visible, a device kind torch does not know, an empty name, a fixed
    ``cuda:N`` shared by several ranks)."""
    many = world_size() > 1
    if name == "auto" or (many and name == "cuda" and torch.cuda.is_available()):
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if many and local_rank() >= count:
                raise ConfigError(f"local rank {local_rank()} has no GPU of its own: this node has {count} visible "
                                  "CUDA GPUs; start at most that many ranks per node (--nproc_per_node), or use "
                                  "device=cpu")
            return torch.device("cuda", (local_rank() if many else rank()) % count)
        return torch.device("cpu")
    available = available_devices()
    if name not in available:
        why = ""
        if isinstance(name, str) and name.startswith("cuda"):
            why = " (no CUDA GPU is visible)" if not torch.cuda.is_available() else (
                f" (this machine has {torch.cuda.device_count()} visible CUDA GPUs)")
        raise ConfigError(f"device {name!r} is not available on this machine{why}; available: {', '.join(available)}")
    if many and name.startswith("cuda:"):
        raise ConfigError(f"device {name!r} would put every rank of this torchrun job on one GPU; use "
                          "device=auto (or cuda): each rank then uses cuda:LOCAL_RANK")
    return torch.device(name)


# ---- the process group -----------------------------------------------------------------------
def timeout() -> timedelta:
    """The collective timeout: ``PTCL_DIST_TIMEOUT_S`` seconds (default 1800)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        s = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not s > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=s)


def init_from_env() -> bool:
    """Initialise the process group from torchrun's environment when ``WORLD_SIZE > 1``
    and none exists yet; returns whether this call created it (and must destroy it).

    Backend: ``gloo``, plus ``nccl`` for CUDA tensors where a GPU is visible; each rank
    selects ``cuda:LOCAL_RANK`` first. Raises :class:`ConfigError` when ``WORLD_SIZE > 1``
    but the rendezvous variables are missing (not started by torchrun)."""
    if is_distributed() or _env_int("WORLD_SIZE", 1) <= 1:
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start "
                          "multi-process runs with `torchrun --nproc_per_node=N -m ptcl run ...`")
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank() < torch.cuda.device_count():  # else resolve_device says why (or device=cpu)
            torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method="env://", timeout=timeout())
    log.info("process group: rank %d of %d (%s, local rank %d)", rank(), world_size(), backend, local_rank())
    return True


def _raise_terminated(signum: int, frame: Any) -> None:
    """SIGTERM: raise :class:`Terminated` once, unless the run is already handling an error
    (e.g. the failed collective that made torchrun stop the job): that error is the one to
    report, so the signal is then ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.exc_info()[0] is None:
        raise Terminated("stopped by SIGTERM (torchrun stops every rank when one of them fails)")


def process_group(fn: F) -> F:
    """Decorator: run ``fn`` inside a process group made by :func:`init_from_env` (when
    launched with ``WORLD_SIZE > 1``), with SIGTERM raising :class:`Terminated` so the run
    ends through its normal error path; the group is destroyed afterwards. A group the
    caller initialised is used as it is and left alone."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        created = init_from_env()
        if not created:
            return fn(*args, **kwargs)
        main_thread = threading.current_thread() is threading.main_thread()  # signals: main thread only
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            result = fn(*args, **kwargs)
            dist.barrier()  # rank 0 has written the last task's files when any rank returns
            return result
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            dist.destroy_process_group()

    return wrapper  # type: ignore[return-value]


def collective_failure(e: BaseException) -> DistributedError | None:
    """``e`` as a one-line :class:`DistributedError` if it is a failed collective of a
    multi-process run (a peer closed its connection or a timeout), else ``None``."""
    if not is_distributed() or isinstance(e, PtclError):
        return None
    if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e).lower()):
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # gloo: no source path, first sentence
        return DistributedError(f"rank {rank()}: a collective with the other ranks failed (another rank "
                                f"died, was killed or timed out after {timeout().total_seconds():g} s): {first}")
    return None


# ---- collectives (no-ops in a single process) ------------------------------------------------
def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects: a path, a dict)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling caches: archive extraction, converted weights),
    the other ranks after it (reading them). If rank 0 fails, the others are stopped by
    torchrun or the collective timeout."""
    if not is_distributed():
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()


def all_mean(value: float) -> float:
    """The mean of a float over the ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def shard(n: int, batch_size: int) -> range:
    """This rank's share of ``n`` items cut into ``batch_size`` batches: a contiguous run of
    whole batches (the batch boundaries of a single process, so per-batch results are
    bit-identical), as a range of item positions. Ranks beyond the number of batches get
    an empty range."""
    if world_size() == 1:
        return range(n)
    batches = -(-n // max(batch_size, 1))
    r, w = rank(), world_size()
    lo, hi = batches * r // w, batches * (r + 1) // w
    return range(min(lo * batch_size, n), min(hi * batch_size, n))


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (first dimension; any count, also none) in rank order,
    on every rank. ``local`` is moved to the CPU (gloo) for the collective; the result is
    on the CPU. Ranks with no rows may pass ``torch.empty(0)``."""
    if not is_distributed():
        return local
    local = local.detach().cpu()
    meta = (tuple(local.shape), local.dtype) if local.numel() or local.dim() > 1 else None
    metas: list[Any] = [None] * world_size()
    dist.all_gather_object(metas, meta)
    known = [m for m in metas if m is not None]
    if not known:
        return local
    tail, dtype = known[0][0][1:], known[0][1]
    counts = [m[0][0] if m is not None else 0 for m in metas]
    if meta is None:
        local = torch.empty((0, *tail), dtype=dtype)
    padded = torch.zeros((max(counts), *tail), dtype=dtype)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values into ``tensors`` on every rank (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def average_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in place (one all-reduce per device
    and dtype, coalesced)."""
    if not is_distributed() or not tensors:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat)
            flat /= world_size()
            offset = 0
            for t in ts:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()


def average_gradients_(params: list[torch.Tensor]) -> None:
    """Average ``.grad`` of ``params`` over the ranks, in place (the all-reduce of
    ``DistributedDataParallel``). A parameter without a gradient on some rank (unused by
    its batch) counts as a zero gradient there; one without a gradient on every rank keeps
    ``grad = None`` (the optimiser skips it, as in a single process). One all-reduce per
    device and dtype, with a has-gradient flag per parameter in the same buffer."""
    if not is_distributed() or not params:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    with torch.no_grad():
        for (device, dtype), ps in groups.items():
            parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device, dtype=dtype)
                     for p in ps]
            flags = torch.tensor([p.grad is not None for p in ps], device=device, dtype=dtype)
            flat = torch.cat([*parts, flags])
            dist.all_reduce(flat)
            has = flat[-len(ps):].tolist()
            flat /= world_size()
            offset = 0
            for p, h in zip(ps, has):
                g = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
                if h > 0:
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)


# ---- sharded training batches ----------------------------------------------------------------
class ShardedBatches:
    """A batch sampler: the global batches of a single process, each cut into one slice
    per rank (``DistributedSampler``-style sharding that keeps the batch composition).

    ``sampler`` is the single-process sampler (a seeded ``RandomSampler``, a
    ``SequentialSampler`` or a :class:`~ptcl.seeding.SeededSampler`, drawn from the same
    generator on every rank, so every rank sees the same order). Global batch ``k`` is
    items ``[k*B, (k+1)*B)`` of that order; rank ``r`` gets positions ``r, r+W, ...`` of
    it (``ceil(b/W)`` items). A short last batch whose size is not a multiple of ``W``
    is padded by repeating its first items (as ``DistributedSampler`` pads), so every
    rank takes the same number of steps and per-rank means weigh equally. ``len`` is the
    number of global batches: the lr schedule and the step count equal a single process's.
    """

    def __init__(self, sampler: Iterable, n: int, batch_size: int, drop_last: bool = False,
                 rank_: int | None = None, world: int | None = None) -> None:
        self.sampler, self.n, self.batch_size, self.drop_last = sampler, n, batch_size, drop_last
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list]:
        order = list(self.sampler)  # drawn lazily, at the first batch (as BatchSampler does)
        for k in range(len(self)):
            batch = order[k * self.batch_size: (k + 1) * self.batch_size]
            per_rank = -(-len(batch) // self.world)
            padded = batch + [batch[i % len(batch)] for i in range(per_rank * self.world - len(batch))]
            yield padded[self.rank:: self.world]


def sharded_batches(sampler: Sized | Iterable, n: int, batch_size: int, drop_last: bool) -> ShardedBatches:
    """:class:`ShardedBatches` for this rank of this world."""
    return ShardedBatches(sampler, n, batch_size, drop_last)


def loader_kwargs(n: int, batch_size: int, drop_last: bool, shuffle: bool = False,
                  sampler: Iterable | None = None, generator: torch.Generator | None = None,
                  shard_: bool = True) -> dict[str, Any]:
    """``DataLoader`` batching arguments for ``n`` items: in one process (or with
    ``shard_=False``) exactly the single-process ones (``sampler`` or ``shuffle``, with
    ``batch_size`` and ``drop_last``); with several ranks a :class:`ShardedBatches` over
    the same order (``sampler``, else a ``RandomSampler`` on ``generator`` or the stored
    order), so every rank serves its slice of the single-process batches."""
    if world_size() == 1 or not shard_:
        order = {"sampler": sampler} if sampler is not None else {"shuffle": shuffle}
        return {**order, "batch_size": batch_size, "drop_last": drop_last}
    from torch.utils.data import RandomSampler, SequentialSampler

    if sampler is None:
        sampler = RandomSampler(range(n), generator=generator) if shuffle else SequentialSampler(range(n))
    return {"batch_sampler": ShardedBatches(sampler, n, batch_size, drop_last)}


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def shard_dataset(dataset: Any, batch_size: int) -> Any:
    """``dataset`` itself in one process; under torchrun the ``Subset`` of this rank's
    :func:`shard` (a contiguous run of whole batches)."""
    if world_size() == 1:
        return dataset
    from torch.utils.data import Subset

    return Subset(dataset, shard(len(dataset), batch_size))


def shard_list(items: list) -> list:
    """This rank's contiguous share of ``items`` (e.g. index batches): all of them in one
    process; concatenated in rank order, the shares are ``items`` again."""
    if world_size() == 1:
        return items
    n, r, w = len(items), rank(), world_size()
    return items[n * r // w: n * (r + 1) // w]

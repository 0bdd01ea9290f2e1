"""Multi-process runs (torchrun, 2 CPU ranks, gloo): sharding, gathering, gradient averaging,
rank-0-only writes, resume and a killed rank.

The fast tests check the sharding arithmetic in one process and the collectives in two
spawned processes. The slow ones launch ``python -m torch.distributed.run
--nproc_per_node=2 -m ptcl run ...`` (torchrun itself) on the real CIFAR-10 archive with
the tiny random ViT, or spawn two ranks with torchrun's environment variables where a
test needs to look inside training (the per-step weight hashes).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_overrides
from test_cli import cli
from test_run_folder import one_error_line

from ptcl import dist
from ptcl.io import load_tensors

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- one process
@pytest.mark.parametrize("n,batch,drop_last", [(10, 4, False), (10, 4, True), (7, 4, False), (9, 3, False),
                                               (1, 4, False), (12, 4, False)])
def test_sharded_batches_are_slices_of_the_single_process_batches(n, batch, drop_last):
    order = list(torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist())
    single = [order[i:i + batch] for i in range(0, n, batch)]
    if drop_last:
        single = [b for b in single if len(b) == batch]
    ranks = [list(dist.ShardedBatches(order, n, batch, drop_last, rank_=r, world=2)) for r in range(2)]
    assert [len(dist.ShardedBatches(order, n, batch, drop_last, rank_=r, world=2)) for r in range(2)] == [len(single)] * 2
    assert len(ranks[0]) == len(ranks[1]) == len(single)  # the same step count as one process
    for k, b in enumerate(single):
        a, c = ranks[0][k], ranks[1][k]
        assert len(a) == len(c) == -(-len(b) // 2)  # equal slices: per-rank means weigh equally
        assert set(a) | set(c) == set(b)  # nothing from another batch
        if len(b) % 2 == 0:
            assert sorted(a + c) == sorted(b)  # no padding when the batch splits evenly


def test_shards_are_contiguous_whole_batches_in_rank_order(monkeypatch):
    for n, batch, world in [(10, 4, 2), (3, 4, 2), (100, 7, 3), (0, 4, 2)]:
        monkeypatch.setattr(dist, "world_size", lambda w=world: w)
        parts = []
        for r in range(world):
            monkeypatch.setattr(dist, "rank", lambda r=r: r)
            s = dist.shard(n, batch)
            assert s.start % batch == 0 and s.step == 1  # starts on a batch boundary
            parts += list(s)
            parts_l = dist.shard_list(list(range(n)))
            assert parts_l == list(range(n))[n * r // world: n * (r + 1) // world]
        assert parts == list(range(n))


def test_single_process_loader_arguments_are_unchanged():
    g = torch.Generator()
    assert dist.loader_kwargs(10, 4, True, shuffle=True, generator=g) == {"shuffle": True, "batch_size": 4,
                                                                        "drop_last": True}
    s = object()
    assert dist.loader_kwargs(10, 4, False, sampler=s)["sampler"] is s


def test_each_rank_gets_its_own_gpu_or_a_clear_error(monkeypatch):
    from ptcl.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    monkeypatch.setattr(dist, "available_devices", lambda: ["auto", "cpu", "cuda", "cuda:0", "cuda:1"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.resolve_device("auto") == dist.resolve_device("cuda") == torch.device("cuda", 1)
    assert dist.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="every rank of this torchrun job on one GPU"):
        dist.resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")  # 4 ranks per node, 2 GPUs
    with pytest.raises(ConfigError, match="local rank 2 has no GPU of its own"):
        dist.resolve_device("auto")


def test_world_size_without_torchrun_environment_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    code, _, err = cli(["run", *tiny_overrides("simplecil"), "--out", str(tmp_path / "r"), "-q"], capsys)
    assert code == 2 and "torchrun --nproc_per_node" in one_error_line(err)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- two spawned ranks
def _env(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})


def _collectives(rank: int, port: int, out: str) -> None:  # pragma: no cover - runs in a subprocess
    _env(rank, 2, port)
    torch.distributed.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    try:
        local = torch.arange(3 * rank, 3 * rank + 3 + rank, dtype=torch.float32)[:, None].repeat(1, 2)
        gathered = dist.gather_rows(local if rank == 0 else torch.empty(0))  # rank 1 has no rows
        gathered_b = dist.gather_rows(local)  # 3 rows + 4 rows
        p = torch.nn.Parameter(torch.zeros(3))
        q = torch.nn.Parameter(torch.zeros(2))
        u = torch.nn.Parameter(torch.zeros(2))  # no gradient on any rank
        p.grad = torch.full((3,), float(rank + 1))
        q.grad = torch.ones(2) * 4 if rank == 0 else None  # unused by rank 1's batch
        dist.average_gradients_([p, q, u])
        result = {"gathered": gathered.tolist(), "gathered_b": gathered_b.tolist(), "p": p.grad.tolist(),
                  "q": q.grad.tolist(), "u": u.grad is None, "all_true": dist.all_true(rank == 0),
                  "mean": dist.all_mean(float(rank)), "obj": dist.broadcast_object(f"from {rank}")}
        Path(out, f"r{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_between_two_ranks(tmp_path):
    torch.multiprocessing.start_processes(_collectives, args=(free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    r = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert r[0] == r[1]  # every rank holds the same result
    assert r[0]["gathered"] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert [row[0] for row in r[0]["gathered_b"]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # rank order
    assert r[0]["p"] == [1.5] * 3 and r[0]["q"] == [2.0, 2.0] and r[0]["u"] is True
    assert r[0]["all_true"] is False and r[0]["mean"] == 0.5 and r[0]["obj"] == "from 0"


# ---------------------------------------------------------------------------- real runs (slow)
def cifar_overrides(archive: Path, method: str, **extra: object) -> list[str]:
    """Two tasks of 5 CIFAR-10 classes, 8 train / 4 test images per class, tiny random ViT."""
    over = {"method.name": method, "backbone.name": "vit_tiny_test", "dataset.name": "imagefolder",
            "dataset.root": archive, "dataset.train_per_class": 8, "dataset.test_per_class": 4,
            "scenario.init_cls": 5, "scenario.increment": 5, "seed": 1993, "eval_batch_size": 8, **extra}
    return [f"{k}={v}" for k, v in over.items()]


@pytest.fixture
def fresh_cache(tmp_path, _cache_dir):
    """``fresh_cache(name)``: an empty feature cache whose extracted archives are the
    session's (the CIFAR-10 archive is extracted once per test session, not per run)."""

    def make(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (_cache_dir / "extracted").mkdir(parents=True, exist_ok=True)
        (d / "extracted").symlink_to(_cache_dir / "extracted", target_is_directory=True)
        return d

    return make


def torchrun(args: list[str], cache: Path, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PTCL_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PTCL_DIST_TIMEOUT_S": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ptcl", "run", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def torchrun_ok(args: list[str], cache: Path) -> str:
    p = torchrun(args, cache)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return out


def one_process(over: list[str], out: Path, cache: Path, monkeypatch) -> dict:
    """The same run in this (single) process, with one thread as each torchrun rank has
    (torchrun sets OMP_NUM_THREADS=1): CPU kernels may sum in another order with more threads."""
    from ptcl.engine.runner import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as m:
            m.setenv("PTCL_CACHE_DIR", str(cache))
            return run(None, over, out=out, quiet=True)
    finally:
        torch.set_num_threads(threads)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("simplecil", {}), ("ranpac", {"method.tuning": "none"})])
def test_frozen_methods_give_the_single_process_accuracy_matrix(method, extra, cifar10_archive, tmp_path,
                                                                 fresh_cache, monkeypatch):
    over = cifar_overrides(cifar10_archive, method, **extra)
    # separate feature caches: the 2-rank run computes (sharded + gathered) its features itself
    one_process(over, tmp_path / "one", fresh_cache("cache1"), monkeypatch)
    out = torchrun_ok([*over, "--out", str(tmp_path / "two"), "-q"], fresh_cache("cache2"))
    assert out.count("avg_acc") == 1  # rank 0 alone prints the results
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert two["accuracy_matrix"] == one["accuracy_matrix"]
    assert two["world_size"] == 2 and "world_size" not in one
    assert len(two["accuracy_matrix"]) == 2 and two["test_samples"] == one["test_samples"] == 40
    a, b = (load_tensors(next((tmp_path / d / "checkpoints").glob("task_001.*"))) for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # prototypes / ridge: exact
    for cache in ("cache1", "cache2"):  # the same features, computed once or in two shards
        assert len(list((tmp_path / cache / "features").glob("*.safetensors"))) == 2
    f1, f2 = (sorted((tmp_path / c / "features").glob("*.safetensors")) for c in ("cache1", "cache2"))
    assert [p.name for p in f1] == [p.name for p in f2]
    assert all(torch.equal(load_tensors(x)["features"], load_tensors(y)["features"]) for x, y in zip(f1, f2))


def _trained_rank(rank: int, port: int, over: list[str], out: str, cache: str) -> None:  # pragma: no cover
    """One rank of a 2-rank finetune run, recording a hash of the learner's whole state
    (parameters and buffers) after every optimiser step."""
    _env(rank, 2, port)
    os.environ["PTCL_CACHE_DIR"] = cache
    torch.set_num_threads(1)
    from ptcl.engine.runner import run
    from ptcl.train import distributed

    hashes: list[str] = []
    init, step = distributed.GradientSync.__init__, distributed.GradientSync.after_step

    def patched_init(self, module, optimizer):
        init(self, module, optimizer)
        self.module = module

    def after_step(self, state):
        step(self, state)
        h = hashlib.sha256()
        for k, v in sorted(self.module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        hashes.append(h.hexdigest())

    distributed.GradientSync.__init__ = patched_init
    distributed.GradientSync.after_step = after_step
    run(None, over, out=f"{out}/two", quiet=True)
    Path(out, f"hashes{rank}.json").write_text(json.dumps(hashes))


@pytest.mark.slow
def test_trained_method_ranks_stay_identical_and_match_one_process(cifar10_archive, tmp_path, fresh_cache,
                                                                   monkeypatch):
    over = cifar_overrides(cifar10_archive, "finetune", **{"method.epochs": 2, "method.batch_size": 8,
                                                           "method.lr": 0.01})
    cache = fresh_cache("cache")
    one_process(over, tmp_path / "one", cache, monkeypatch)
    torch.multiprocessing.start_processes(
        _trained_rank, args=(free_port(), over, str(tmp_path), str(cache)), nprocs=2,
        start_method="spawn")
    h0, h1 = (json.loads((tmp_path / f"hashes{r}.json").read_text()) for r in range(2))
    # 2 tasks x 2 epochs x 5 steps (40 images per task in global batches of 8): one hash per step
    assert len(h0) == 20 and h0 == h1  # identical weights and buffers on both ranks after every step
    assert len(set(h0)) == len(h0)  # and the weights did change at every step
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # Not bit-identical: each rank's forward sees 4 of the 8 images and the gradient is the
    # mean of two half-batch means (another float summation order). The global batches
    # are the same (8 divides 40: no padded sample), so the weights agree to float rounding
    # and the predictions (hence the accuracies) to within one test image per task.
    a, b = (load_tensors(next((tmp_path / d / "checkpoints").glob("task_001.*"))) for d in ("one", "two"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, worst
    for row1, row2 in zip(one["accuracy_matrix"], two["accuracy_matrix"]):
        for x, y in zip(row1, row2):
            assert (x is None and y is None) or abs(x - y) <= 100 / 20 + 1e-9, (row1, row2)


def _children(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(p.name))
    return kids


def _rank_pid(launcher: int, rank: int) -> int | None:
    for kid in _children(launcher):
        try:
            env = (Path("/proc") / str(kid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return kid
    return None


@pytest.mark.slow
def test_killed_rank_stops_the_others_cleanly_and_the_run_resumes(cifar10_archive, tmp_path, fresh_cache):
    run_dir, cache = tmp_path / "two", fresh_cache("cache")
    over = cifar_overrides(cifar10_archive, "finetune", **{"method.epochs": 30, "method.batch_size": 8})
    p = torchrun([*over, "--out", str(run_dir), "-q"], cache)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "task_000.safetensors").exists():  # task 0 is saved
        assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:]
        time.sleep(0.05)
    victim = _rank_pid(p.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)  # during task 1
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    errors = [ln for ln in out.splitlines() if ln.startswith("ptcl: ")]
    assert errors, out[-3000:]  # rank 0 says, on one line, why it stopped and what is kept
    assert any(("collective with the other ranks failed" in e or "stopped by SIGTERM" in e)
               and "task 0 is saved" in e and "--resume" in e for e in errors), errors
    # nothing half-written: every file is whole, no temporary file is left, task 0 is recorded
    assert not [f for f in run_dir.rglob("*") if f.name.endswith(".tmp")]
    m = metrics(run_dir)
    assert [r["task"] for r in m["rows"]] == [0]
    assert load_tensors(run_dir / "checkpoints" / "task_000.safetensors")
    assert not (run_dir / "checkpoints" / "task_001.safetensors").exists()
    # --resume under torchrun continues after task 0 on both ranks
    torchrun_ok(["--resume", str(run_dir), "-q"], cache)
    m = metrics(run_dir)
    assert [r["task"] for r in m["rows"]] == [0, 1] and np.isfinite(m["rows"][1]["accuracy"])
    assert "resuming after task 0" in (run_dir / "run.log").read_text()
    # ... and ends with the checkpoint tensors of an uninterrupted 2-rank run
    torchrun_ok([*over, "--out", str(tmp_path / "whole"), "-q"], cache)
    a, b = (load_tensors(d / "checkpoints" / "task_001.safetensors") for d in (run_dir, tmp_path / "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""The run folder under faults: changed data on resume, damaged files, busy or unwritable
folders, full disks, interrupted writes and Ctrl-C. Each ends in one clear line and loses
nothing that finished."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides
from PIL import Image
from test_cli import cli, make_folder

from ptcl.engine.resources import TaskMemory
from ptcl.engine.rundir import ResumeError, RunFolderBusy
from ptcl.engine.runner import run
from ptcl.errors import ResultsWriteError, RunInterrupted, TrainingDiverged


def folder_overrides(root: Path, **extra) -> list[str]:
    over = {"method": "simplecil", "backbone": "vit_tiny_test", "dataset": "imagefolder",
            "dataset.root": str(root), "scenario.init_cls": 2, "scenario.increment": 1, **extra}
    return [f"{k}={v}" for k, v in over.items()]


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ptcl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- item 4


def test_resume_refuses_a_changed_dataset(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=4)
    out = tmp_path / "run"
    assert cli(["run", *folder_overrides(root), "--out", str(out), "--max-tasks", "1", "-q"], capsys)[0] == 0
    assert json.loads((out / "stream.json").read_text())["task_sizes"] == [2, 1, 1]
    for split in ("train", "test"):  # a fifth class appears
        shutil.copytree(root / split / "class0", root / split / "class9")
    code, _, err = cli(["run", "--resume", str(out), "-q"], capsys)
    line = one_error_line(err)
    assert code == 2 and "changed since the run started" in line and "[2, 1, 1] -> [2, 1, 1, 1]" in line
    for split in ("train", "test"):
        shutil.rmtree(root / split / "class9")
    img = root / "train" / "class1" / "0.png"  # same classes, one image replaced
    Image.new("RGB", (16, 16), (1, 2, 3)).save(img)
    os.utime(img, (1, 1))
    code, _, err = cli(["run", "--resume", str(out), "-q"], capsys)
    assert code == 2 and "the dataset's files changed" in one_error_line(err)
    assert json.loads((out / "metrics.json").read_text())["tasks_done"] == 1  # untouched


# --------------------------------------------------------------------------- item 7


# multi-process launches (torchrun) are tested in tests/test_distributed.py


# --------------------------------------------------------------------------- item 8


def test_subsets_depend_on_subset_seed_not_on_run_seed(tmp_path):
    over = tiny_overrides("simplecil")
    a = run(None, [*over, "seed=1"], out=tmp_path / "a", quiet=True)
    b = run(None, [*over, "seed=2"], out=tmp_path / "b", quiet=True)
    c = run(None, [*over, "seed=1", "dataset.subset_seed=7"], out=tmp_path / "c", quiet=True)
    sub = {k: json.loads((Path(m["run_dir"]) / "stream.json").read_text())["subset"] for k, m in
           (("a", a), ("b", b), ("c", c))}
    assert sub["a"] == sub["b"] != sub["c"]
    assert a["class_order"] != b["class_order"]  # the run seed still drives the class order


def test_results_table_printed_once_and_tasks_counted_from_0(tmp_path, capsys):
    code, out, err = cli(["run", *tiny_overrides("simplecil"), "--out", str(tmp_path / "r")], capsys)
    assert code == 0
    assert (out + err).count("avg_acc") == 1
    log = (tmp_path / "r" / "run.log").read_text()
    assert "task 0 done" in log and "task 4 done" in log and "task 5" not in log
    assert "results:" in log and "avg_acc" in log  # the table is kept in run.log


def test_written_files_follow_the_umask(tmp_path, cifar10_archive, monkeypatch):
    old = os.umask(0o022)
    try:
        monkeypatch.setenv("PTCL_CACHE_DIR", str(tmp_path / "cache"))
        out = tmp_path / "r"
        run(None, [*tiny_overrides("simplecil"), "dataset=imagefolder", f"dataset.root={cifar10_archive}",
                   "dataset.train_per_class=2", "dataset.test_per_class=1", "scenario.init_cls=5",
                   "scenario.increment=5"], out=out, quiet=True)
        for p in [*out.rglob("*"), *(tmp_path / "cache" / "features").rglob("*")]:
            want = 0o755 if p.is_dir() else 0o644
            assert stat.S_IMODE(p.stat().st_mode) == want, p
        (extracted,) = (tmp_path / "cache" / "extracted").iterdir()
        assert stat.S_IMODE(extracted.stat().st_mode) == 0o755
    finally:
        os.umask(old)


def test_peak_memory_is_the_tasks_not_the_process_peak():
    mem = TaskMemory(torch.device("cpu"))
    big = torch.ones(100_000_000)  # 400 MB
    mem.start()
    before = mem.peak_mb()
    del big
    mem.start()
    after = mem.peak_mb()
    if mem.kind() == "process_peak_rss_so_far":
        pytest.skip("this kernel cannot reset the peak resident set size")
    assert after < before - 300


# --------------------------------------------------------------------------- item 9: damaged folders


def _finished_part(tmp_path: Path, method: str = "simplecil") -> Path:
    out = tmp_path / "part"
    run(None, tiny_overrides(method), out=out, quiet=True, max_tasks=2)
    return out


DAMAGE = {
    "truncated checkpoint": ("checkpoints/task_001.safetensors", lambda b: b[: len(b) // 2], "not a readable safetensors"),
    "zero-byte checkpoint": ("checkpoints/task_001.safetensors", lambda b: b"", "empty file"),
    "pickled checkpoint": ("checkpoints/task_001.safetensors", None, "not a readable safetensors"),
    "foreign checkpoint": ("checkpoints/task_001.safetensors", "finetune", "checkpoint of method 'finetune'"),
    "garbage metrics": ("metrics.json", lambda b: b"{not json", "not JSON"),
    "empty metrics object": ("metrics.json", lambda b: b"{}", "no 'rows' list"),
    "garbage config": ("config.yaml", lambda b: b"method: [unclosed", "not YAML"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_run_folder_gives_one_line_and_keeps_the_evidence(case, tmp_path, capsys):
    name, damage, message = DAMAGE[case]
    out = _finished_part(tmp_path)
    target = out / name
    if damage is None:
        torch.save({"head.weight": torch.zeros(2, 2)}, target)
    elif isinstance(damage, str):
        other = tmp_path / "other"
        run(None, tiny_overrides(damage, **{"method.epochs": 1}), out=other, quiet=True, max_tasks=2)
        shutil.copy(other / name, target)
    else:
        target.write_bytes(damage(target.read_bytes()))
    evidence = target.read_bytes()
    code, _, err = cli(["run", "--resume", str(out), "-q"], capsys)
    line = one_error_line(err)
    assert code == 2 and name.split("/")[-1] in line and message in line, line
    assert "start again" in line
    assert target.read_bytes() == evidence


def test_damaged_last_checkpoint_points_to_the_kept_earlier_one(tmp_path):
    out = tmp_path / "part"
    run(None, [*tiny_overrides("simplecil"), "keep_all_checkpoints=true"], out=out, quiet=True, max_tasks=2)
    ck = out / "checkpoints" / "task_001.safetensors"
    ck.write_bytes(b"")
    with pytest.raises(ResumeError, match="continue after task 0.*--from-task 0"):
        run(resume=out, quiet=True)
    assert ck.read_bytes() == b""
    assert run(resume=out, quiet=True, from_task=0)["finished"]  # what the message says to do


def test_resume_and_out_options_are_checked(tmp_path, capsys):
    out = _finished_part(tmp_path)
    code, _, err = cli(["run", "--resume", str(out), "--out", str(tmp_path / "x"), "-q"], capsys)
    assert code == 2 and "cannot be combined with --out" in one_error_line(err)
    code, _, err = cli(["run", *tiny_overrides("simplecil"), "--out", "", "-q"], capsys)
    assert code == 2 and "--out is empty" in one_error_line(err)
    assert not any(Path.cwd().glob("config.yaml"))


# --------------------------------------------------------------------------- item 10


HOLD_LOCK = """
import sys, time
from ptcl.engine.rundir import RunFolder
RunFolder(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_folder_is_held_by_one_process(tmp_path):
    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=rf"in use by another ptcl process \(pid {holder.pid}\)"):
            run(None, tiny_overrides("simplecil"), out=out, quiet=True)
    finally:
        holder.kill()
        holder.wait()
    assert run(None, tiny_overrides("simplecil"), out=out, quiet=True)["finished"]  # released on kill


KILL_WHILE_WORKERS_RUN = """
import os, signal, sys
import ptcl.train.loop as train
from ptcl.cli import main

move = train.to_device
calls = {"n": 0}

def to_device_then_die(x, device):
    calls["n"] += 1
    if calls["n"] == 5:  # task 1 (task 0 has 3 batches), its loader workers alive
        os.kill(os.getpid(), signal.SIGKILL)
    return move(x, device)

train.to_device = to_device_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_resume_right_after_kill_with_loader_workers_alive(tmp_path):
    """Forked loader workers outlive a kill -9 by seconds; they must not hold the lock."""
    out = tmp_path / "r"
    over = [*tiny_overrides("finetune", **{"method.epochs": 1, "method.batch_size": 4}), "num_workers=2"]
    p = subprocess.run([sys.executable, "-c", KILL_WHILE_WORKERS_RUN, "run", *over, "--out", str(out), "-q"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    assert run(resume=out, quiet=True)["finished"]


def test_two_concurrent_runs_into_one_folder(tmp_path):
    out = tmp_path / "same"
    cmd = [sys.executable, "-m", "ptcl", "run", *tiny_overrides("finetune", **{"method.epochs": 2}),
           "--out", str(out), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "in use by another ptcl process" in err or "already holds a run" in err
    assert json.loads((out / "metrics.json").read_text())["finished"]


def test_unwritable_out_is_refused_before_running(tmp_path, capsys, readonly_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((afile, "is not a folder"), (afile / "below", "which is a file"),
                         (readonly_dir / "r", "is not writable")):
        code, _, err = cli(["run", *tiny_overrides("simplecil"), "--out", str(out), "-q"], capsys)
        assert code == 2 and message in one_error_line(err), (out, err)


def test_unwritable_cache_dir_is_refused(tmp_path, capsys, monkeypatch, readonly_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for cache, message in ((afile, "is not a folder"), (readonly_dir, "is not writable")):
        monkeypatch.setenv("PTCL_CACHE_DIR", str(cache))
        code, _, err = cli(["run", *tiny_overrides("simplecil"), "--out", str(tmp_path / "r"), "-q"], capsys)
        line = one_error_line(err)
        assert code == 2 and message in line and "PTCL_CACHE_DIR" in line
        assert not (tmp_path / "r").exists()


def test_compare_plot_into_unwritable_folder_and_no_default_plot(tmp_path, capsys, readonly_dir, monkeypatch):
    out = _finished_part(tmp_path)
    code, _, err = cli(["compare", str(out), "--plot", str(readonly_dir / "c.png")], capsys)
    assert code == 2 and "not writable" in one_error_line(err)
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = cli(["compare", str(out)], capsys)
    assert code == 0 and "simplecil" in stdout and not (tmp_path / "compare.png").exists()


def test_full_disk_at_checkpoint_time_keeps_what_finished(tmp_path, monkeypatch):
    import ptcl.engine.checkpoint as ck

    real = ck.atomic_save_tensors
    calls = {"n": 0}

    def full_disk(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the checkpoint of task 2
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(ck, "atomic_save_tensors", full_disk)
    out = tmp_path / "r"
    with pytest.raises(ResultsWriteError, match=r"task 2 .* the disk is full; tasks 0-1 are saved .*--resume"):
        run(None, tiny_overrides("simplecil"), out=out, quiet=True)
    assert json.loads((out / "metrics.json").read_text())["tasks_done"] == 2
    monkeypatch.setattr(ck, "atomic_save_tensors", real)
    assert run(resume=out, quiet=True)["finished"]


def test_full_disk_for_real(tmp_path, small_tmpfs):
    """A real ENOSPC: the run folder on a tmpfs too small for many checkpoints."""
    with pytest.raises(ResultsWriteError, match="the disk is full") as e:
        run(None, tiny_overrides("ranpac", **{"method.M": 20000}), out=small_tmpfs / "r", quiet=True)
    if (small_tmpfs / "r" / "metrics.json").is_file():
        assert "are saved" in str(e.value) or "is saved" in str(e.value)
    else:
        assert "was removed" in str(e.value) and "--resume" not in str(e.value)
    assert not list(small_tmpfs.rglob("*.tmp"))


def test_leftover_tmp_files_are_removed_on_the_next_start(tmp_path):
    out = _finished_part(tmp_path)
    stale = [out / ".metrics.json.abc123.tmp", out / "checkpoints" / ".task_002.safetensors.h-1.x1.tmp"]
    for p in stale:
        p.write_bytes(b"")
    fc = tmp_path / "fc"
    fc.mkdir()
    dead = fc / f".abc.safetensors.{__import__('ptcl.io', fromlist=['_HOST'])._HOST}-999999999.q.tmp"
    dead.write_bytes(b"")
    from ptcl.data.features import FeatureCache

    run(resume=out, quiet=True, cache=FeatureCache(fc))
    assert not any(p.exists() for p in [*stale, dead])


def test_half_extracted_archive_is_removed_on_the_next_start(tmp_path, monkeypatch, cifar10_archive):
    from ptcl.data.archive import extract_once
    from ptcl.io import _HOST

    monkeypatch.setenv("PTCL_CACHE_DIR", str(tmp_path / "cache"))
    half = tmp_path / "cache" / "extracted" / f".deadbeef.{_HOST}-999999999.abcdef.tmp"
    (half / "train").mkdir(parents=True)
    extract_once(cifar10_archive)
    assert not half.exists()


def test_ctrl_c_says_what_was_kept(tmp_path, monkeypatch, capsys):
    import ptcl.engine.runner as runner

    evaluate = runner.predict_seen

    def interrupt_at(task_index):
        def predict(learner, task, *a, **k):
            if task.index == task_index:
                raise KeyboardInterrupt
            return evaluate(learner, task, *a, **k)
        return predict

    monkeypatch.setattr(runner, "predict_seen", interrupt_at(0))
    with pytest.raises(RunInterrupted) as e:
        run(None, tiny_overrides("simplecil"), out=tmp_path / "a", quiet=True)
    assert "was removed" in e.value.message and "--resume" not in e.value.message
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(runner, "predict_seen", interrupt_at(2))
    code, _, err = cli(["run", *tiny_overrides("simplecil"), "--out", str(tmp_path / "b"), "-q"], capsys)
    assert code == 130 and "tasks 0-1 are saved" in err and f"--resume {tmp_path / 'b'}" in err


# --------------------------------------------------------------------------- item 2


def test_nan_loss_stops_with_one_line_and_keeps_finished_tasks(tmp_path, monkeypatch):
    from ptcl.registry import METHODS

    cls = METHODS.get("finetune")
    train = cls.train_task

    def poisoned(self, task):
        if task.index == 1:
            with torch.no_grad():
                next(p for p in self.parameters() if p.requires_grad).fill_(float("nan"))
        return train(self, task)

    monkeypatch.setattr(cls, "train_task", poisoned)
    out = tmp_path / "r"
    with pytest.raises(TrainingDiverged, match=r"^task 1: the loss became nan in epoch 1/1, step 1/1 .*"
                                               r"lower method.lr .*; task 0 is saved in"):
        run(None, tiny_overrides("finetune", **{"method.epochs": 1}), out=out, quiet=True)
    assert json.loads((out / "metrics.json").read_text())["tasks_done"] == 1


def test_huge_learning_rate_is_reported_not_silent(tmp_path, capsys):
    code, _, err = cli(["run", *tiny_overrides("finetune", **{"method.lr": "1.0e+30", "method.clip_grad": "null"}),
                        "--out", str(tmp_path / "r"), "-q"], capsys)
    line = one_error_line(err)
    assert code == 2 and "nan" in line.lower() and "method.lr" in line


# --------------------------------------------------------------------------- review follow-ups


def _edit_metrics(out: Path, edit) -> bytes:
    m = json.loads((out / "metrics.json").read_text())
    edit(m)
    (out / "metrics.json").write_text(json.dumps(m))
    return (out / "metrics.json").read_bytes()


BAD_ROWS = {
    "text accuracy": lambda m: m["rows"][0].update(accuracy="abc"),
    "null accuracy": lambda m: m["rows"][0].update(accuracy=None),
    "accuracy_row text": lambda m: m["rows"][0].update(accuracy_row="x"),
    "accuracy_row too long": lambda m: m["rows"][1].update(accuracy_row=[1, 2, 3, 4, 5, 6, 7, 8]),
    "time text": lambda m: m["rows"][0].update(time_s="slow"),
    "old_acc text": lambda m: m["rows"][1].update(old_acc="x"),
    "seen_classes": lambda m: m["rows"][1].update(seen_classes=99),
    "row not a mapping": lambda m: m["rows"].__setitem__(0, 7),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_metrics_rows_are_checked_on_resume(case, tmp_path, capsys):
    out = _finished_part(tmp_path)
    evidence = _edit_metrics(out, BAD_ROWS[case])
    code, _, err = cli(["run", "--resume", str(out), "-q"], capsys)
    line = one_error_line(err)
    assert code == 2 and "metrics.json is damaged (row" in line, line
    assert (out / "metrics.json").read_bytes() == evidence


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_missing_last_checkpoint_is_named_and_from_task_continues(kind, tmp_path, capsys):
    out = tmp_path / "part"
    run(None, [*tiny_overrides("simplecil"), "keep_all_checkpoints=true"], out=out, quiet=True, max_tasks=2)
    ck = out / "checkpoints" / "task_001.safetensors"
    ck.unlink()
    if kind == "folder":
        ck.mkdir()
    evidence = (out / "metrics.json").read_bytes()
    code, _, err = cli(["run", "--resume", str(out), "-q"], capsys)
    line = one_error_line(err)
    assert code == 2 and "task_001.safetensors is" in line and "--from-task 0" in line, line
    assert (out / "metrics.json").read_bytes() == evidence
    if kind == "folder":
        ck.rmdir()
    m = run(resume=out, quiet=True, from_task=0)
    assert m["finished"] and m["tasks_done"] == 5
    full = run(None, [*tiny_overrides("simplecil"), "keep_all_checkpoints=true"], out=tmp_path / "full", quiet=True)
    assert m["accuracy_matrix"] == full["accuracy_matrix"]


def test_only_the_last_checkpoint_stays(tmp_path):
    out = tmp_path / "part"
    run(None, [*tiny_overrides("simplecil"), "keep_all_checkpoints=true"], out=out, quiet=True, max_tasks=2)
    cfg = (out / "config.yaml").read_text().replace("keep_all_checkpoints: true", "keep_all_checkpoints: false")
    (out / "config.yaml").write_text(cfg)
    run(resume=out, quiet=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task_004.safetensors"]


def test_resume_of_a_read_only_run_folder(tmp_path, capsys, readonly_copy):
    out = readonly_copy(_finished_part(tmp_path))
    code, _, err = cli(["run", "--resume", str(out), "-q"], capsys)
    assert code == 2 and "not writable" in one_error_line(err)


def test_loader_worker_errors_are_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=2)
    bad = root / "test" / "class1" / "1.png"
    bad.write_bytes(b"not an image")
    code, _, err = cli(["run", *folder_overrides(root), "num_workers=2", "--out", str(tmp_path / "r"), "-q"], capsys)
    line = one_error_line(err)
    assert code == 2 and str(bad) in line and "Original Traceback" not in err


def test_decompression_bomb_is_named(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=2)
    bomb = root / "train" / "class0" / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    code, _, err = cli(["run", *folder_overrides(root), "--out", str(tmp_path / "r"), "-q"], capsys)
    line = one_error_line(err)
    assert code == 2 and str(bomb) in line and "too large" in line


def test_out_as_dangling_or_looping_link(tmp_path, capsys):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    for out in ("dangling", "dangling/sub", "loopA"):
        code, _, err = cli(["run", *tiny_overrides("simplecil"), "--out", str(tmp_path / out), "-q"], capsys)
        assert code == 2 and "symbolic link" in one_error_line(err), (out, err)


def test_compare_plot_never_replaces_a_non_regular_file(tmp_path, capsys):
    out = _finished_part(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = cli(["compare", str(out), "--plot", str(fifo)], capsys)
    assert code == 2 and "not a regular file" in one_error_line(err)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    target = tmp_path / "target.png"
    target.write_bytes(b"old")
    (tmp_path / "link.png").symlink_to(target)
    assert cli(["compare", str(out), "--plot", str(tmp_path / "link.png")], capsys)[0] == 0
    assert (tmp_path / "link.png").is_symlink() and target.read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_in_a_folder_with_user_files_and_after_a_task(tmp_path, monkeypatch):
    import ptcl.engine.runner as runner

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    evaluate = runner.predict_seen

    def interrupt(learner, task, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "predict_seen", interrupt)
    with pytest.raises(RunInterrupted, match="run's files in .* were removed"):
        run(None, tiny_overrides("simplecil"), out=out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    save = runner._save_task

    def save_then_interrupt(folder, index, *a, **k):
        save(folder, index, *a, **k)
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "predict_seen", evaluate)
    monkeypatch.setattr(runner, "_save_task", save_then_interrupt)
    with pytest.raises(RunInterrupted, match="interrupted after task 1; tasks 0-1 are saved"):
        run(None, tiny_overrides("simplecil"), out=tmp_path / "b", quiet=True)


def test_peak_memory_kind_says_what_was_measured(tmp_path, monkeypatch):
    import ptcl.engine.resources as res

    monkeypatch.setattr(res, "_reset_rss_peak", lambda: False)
    m = run(None, tiny_overrides("simplecil"), out=tmp_path / "r", quiet=True)
    assert m["peak_memory_kind"] == "process_peak_rss_so_far"

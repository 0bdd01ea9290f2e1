"""The command line: listing, running, comparing, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_overrides
from PIL import Image

from ptcl.cli import main


def make_folder(root: Path, classes: int = 4, per_class: int = 3) -> Path:
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = (rng.rand(16, 16, 3) * 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys):
    code, out, _ = cli(["list", "methods"], capsys)
    assert code == 0 and "simplecil" in out and "finetune" in out and "joint" in out
    code, out, _ = cli(["list", "backbones"], capsys)
    assert "efficientnet_lite0" in out and "vit_tiny_test" in out
    code, out, _ = cli(["list", "datasets"], capsys)
    for name in ("cifar100", "imagefolder", "imagenet-r", "mnist_demo"):
        assert name in out


def test_run_writes_run_folder_and_compare(tmp_path, capsys):
    code, out, _ = cli(["run", *tiny_overrides("simplecil"), "--out", str(tmp_path / "r"), "-q"], capsys)
    assert code == 0, out
    r = tmp_path / "r"
    for f in ("config.yaml", "metrics.json", "run.log", "accuracy.png", "checkpoints/task_004.safetensors"):
        assert (r / f).is_file(), f
    assert not (r / "checkpoints/task_003.safetensors").exists()  # only the latest is kept
    m = json.loads((r / "metrics.json").read_text())
    for k in ("accuracy_matrix", "accuracy_per_task", "avg_acc", "last_acc", "forgetting", "task_time_s", "class_order"):
        assert k in m
    assert len(m["accuracy_per_task"]) == 5 and 0 <= m["last_acc"] <= 100
    assert "acc_all" in out
    code, out, _ = cli(["compare", str(r), str(r), "--plot", str(tmp_path / "cmp.png")], capsys)
    assert code == 0 and "simplecil" in out and (tmp_path / "cmp.png").is_file()


BAD = {
    "unknown method": (["method=simplecl"], "unknown method 'simplecl' (did you mean 'simplecil'?)"),
    "unknown backbone": (["backbone=resnet_nonexistent_xyz"], "unknown backbone 'resnet_nonexistent_xyz'"),
    "unknown dataset": (["dataset=cifar1000"], "unknown dataset 'cifar1000'"),
    "unknown key": (["scenario.incremnt=2"], "unknown key 'scenario.incremnt'; valid:"),
    "impossible split": (["scenario.init_cls=20"], "impossible task split"),
    "missing folder": (["dataset=imagefolder", "dataset.root=/nonexistent/data"], "/nonexistent/data"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(case, tmp_path, capsys):
    extra, message = BAD[case]
    out_dir = tmp_path / "run"
    code, _, err = cli(["run", *tiny_overrides("simplecil"), *extra, "--out", str(out_dir), "-q"], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ptcl: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not out_dir.exists()


def test_offline_timm_weights_fail_fast_and_clearly(tmp_path, capsys, monkeypatch):
    import ptcl.backbones.timm_models as tm

    monkeypatch.setattr(tm, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    out_dir = tmp_path / "run"
    code, _, err = cli(["run", *tiny_overrides("simplecil"), "backbone=vit_base_patch16_224.augreg_in21k",
                        "--out", str(out_dir), "-q"], capsys)
    assert code == 2 and "cannot download pretrained weights" in err and "backbone.weights=PATH" in err
    assert not out_dir.exists()


def test_corrupt_image_is_named_and_nothing_is_left(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    bad = root / "test" / "class1" / "1.png"
    bad.write_bytes(b"this is not a png")
    out_dir = tmp_path / "run"
    args = ["run", "method=simplecil", "backbone=vit_tiny_test", "dataset=imagefolder",
            f"dataset.root={root}", "--out", str(out_dir), "-q"]
    code, _, err = cli(args, capsys)
    assert code == 2
    assert "corrupt or unreadable image" in err and str(bad) in err
    assert not out_dir.exists()


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    args = ["run", *tiny_overrides("simplecil"), "--out", str(tmp_path / "r"), "-q"]
    assert cli(args, capsys)[0] == 0
    code, _, err = cli(args, capsys)
    assert code == 2 and "--resume" in err


def test_console_script_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ptcl", "run", "method=nope"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("ptcl: error: unknown method 'nope'")
    assert "Traceback" not in p.stderr


def test_overrides_may_follow_options():
    """``key=value`` after ``--out``/``-o`` joins the overrides; other leftovers stay errors."""
    from ptcl.cli import _parse

    a = _parse(["run", "cfg.yaml", "seed=1", "--out", "x", "method.lr=0.1"])
    assert a.args == ["cfg.yaml", "seed=1", "method.lr=0.1"] and a.out == "x"
    b = _parse(["import-pilot", "p.json", "-o", "o.yaml", "dataset.root=d"])
    assert b.overrides == ["dataset.root=d"] and b.output == "o.yaml"
    with pytest.raises(SystemExit):
        _parse(["run", "cfg.yaml", "--out", "x", "stray"])
    with pytest.raises(SystemExit):
        _parse(["list", "methods", "a=b"])

"""Config values: numbers as users write them, every value range-checked before a run,
devices that exist here, config structure, prompt-pool sizes against the stream, and
path options resolved relative to the file that sets them."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CPU, fake_context, tiny_overrides, tiny_timm_vit
from PIL import Image

from ptcl import dist
from ptcl.cli import main
from ptcl.config import (
    BackboneConfig,
    DatasetConfig,
    RunConfig,
    TrainConfig,
    build_config,
    load_file,
    parse_overrides,
    save_config,
)
from ptcl.data.scenario import Scenario
from ptcl.errors import ConfigError
from ptcl.methods.base import LearnerContext
from ptcl.methods.coda_prompt import CodaPrompt, CodaPromptConfig
from ptcl.methods.dap import DAP, DAPConfig
from ptcl.methods.dualprompt import DualPrompt, DualPromptConfig
from ptcl.registry import METHODS

SEED_MAX = 2**32 - 1
REPO = Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def cli_error(args: list[str], capsys, out_dir: Path) -> str:
    """Run the CLI expecting a user error: exit 2, one ``ptcl: error:`` line, no run folder."""
    code = main([*args, "--out", str(out_dir), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ptcl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out_dir.exists()
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- 1. numbers


@pytest.mark.parametrize(
    "text, value",
    [("1e-3", 1e-3), ("5E-4", 5e-4), ("1.0e30", 1e30), ("-2e+3", -2000.0), (".5", 0.5), ("-.5", -0.5),
     ("+1.5e-2", 0.015), ("1_000.5", 1000.5), ("0.01", 0.01), ("3", 3), ("1.0e+30", 1e30)],
)
def test_scientific_notation_is_a_number(text, value):
    got = parse_overrides([f"a={text}"])["a"]
    assert got == value and type(got) is type(value)
    assert parse_overrides(["a=1e3x", "b=e3", "c=abc"]) == {"a": "1e3x", "b": "e3", "c": "abc"}


def test_scientific_notation_in_overrides_and_yaml(tmp_path):
    cfg = build_config(None, ["method=finetune", "method.lr=1e-3", "method.weight_decay=5E-4", "method.clip_grad=1.0e30"])
    assert (cfg.method.lr, cfg.method.weight_decay, cfg.method.clip_grad) == (1e-3, 5e-4, 1e30)
    y = write(tmp_path / "c.yaml", "method:\n  name: finetune\n  lr: 1e-3\n  weight_decay: 5e-4\n  epochs: 1e1\n")
    cfg = build_config(load_file(y))
    assert (cfg.method.lr, cfg.method.weight_decay, cfg.method.epochs) == (1e-3, 5e-4, 10)
    assert type(cfg.method.epochs) is int
    assert build_config(load_file(write(tmp_path / "c2.yaml", save_config(cfg)))) == cfg  # round trip
    cfg = build_config(None, ["method=aper", "method.tuning_options={scale: 1e-3}"])
    assert cfg.method.tuning_options["scale"] == 1e-3  # free-form options too


@pytest.mark.parametrize(
    "override, pattern",
    [("method.epochs=2.5", r"method.epochs must be an integer, got 2.5"),
     ("method.epochs=1e30", r"method.epochs must be an integer"),  # not an exact integer
     ("method.lr=abc", r"method.lr must be a number, got 'abc'"),
     ("method.lr=1e-3x", r"method.lr must be a number"),
     ("method.lr=true", r"method.lr must be a number")],
)
def test_non_numbers_and_non_integers_stay_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(None, ["method=finetune", override])


def test_integral_numbers_for_int_options():
    cfg = build_config(None, ["method=finetune", "method.epochs=1e3", "method.batch_size=16.0", "seed=1e3"])
    assert (cfg.method.epochs, cfg.method.batch_size, cfg.seed) == (1000, 16, 1000)
    assert all(type(v) is int for v in (cfg.method.epochs, cfg.method.batch_size, cfg.seed))


# --------------------------------------------------------------------------- 2. value ranges

BAD_VALUES = {
    "seed=-1": r"seed must be an integer in \[0, 2\*\*32 - 1",
    "seed=4294967296": r"seed must be an integer in \[0, 2\*\*32 - 1 = 4294967295\], got 4294967296",
    "eval_batch_size=0": r"eval_batch_size must be >= 1, got 0",
    "num_workers=-1": r"num_workers must be >= 0, got -1",
    "scenario.init_cls=0": r"scenario.init_cls must be >= 1, got 0",
    "scenario.increment=-2": r"scenario.increment must be >= 1, got -2",
    "backbone.image_size=4": r"backbone.image_size must be >= 8 or null, got 4",
    "backbone.name=": r"backbone.name must be a non-empty name",
    "dataset.name=": r"dataset.name must be a non-empty name",
    "dataset.train_per_class=0": r"dataset.train_per_class must be >= 1 or null",
    "dataset.test_per_class=2.5": r"dataset.test_per_class must be an integer or null, got 2.5",
    "dataset.subset_seed=-1": r"dataset.subset_seed must be an integer in \[0, 2\*\*32 - 1",
    "dataset.subset_seed=4294967296": r"dataset.subset_seed must be an integer in \[0, 2\*\*32 - 1",
    "keep_all_checkpoints=2": r"keep_all_checkpoints must be true or false",
    "method=finetune method.momentum=1": r"method.momentum must be in \[0, 1\), got 1.0",
    "method=finetune method.momentum=-0.1": r"method.momentum must be in \[0, 1\)",
    "method=finetune method.weight_decay=-1e-4": r"method.weight_decay must be >= 0, got -0.0001",
    "method=finetune method.lr=.inf": r"method.lr must be a finite number, got inf",
    "method=finetune method.lr=.nan": r"method.lr must be a finite number, got nan",
    "method=finetune method.clip_grad=-.inf": r"method.clip_grad must be a finite number or null, got -inf",
    "method=finetune method.lr=1e400": r"method.lr must be a finite number",
    "method=aper method.tuning_options.scale=.inf": r"method.tuning_options.scale must be a finite number",
}


@pytest.mark.parametrize("override", sorted(BAD_VALUES))
def test_bad_values_name_key_value_and_range(override):
    with pytest.raises(ConfigError, match=BAD_VALUES[override]):
        build_config(None, override.split())


def test_seed_range_edges_and_subset_seed():
    assert build_config(None, ["seed=0"]).seed == 0
    assert build_config(None, [f"seed={SEED_MAX}"]).seed == 2**32 - 1
    cfg = build_config()
    assert cfg.dataset.subset_seed == 1993
    assert build_config(None, ["dataset.subset_seed=7"]).dataset.subset_seed == 7
    assert "subset_seed: 1993" in save_config(cfg)


def float_options() -> list[tuple[str, str]]:
    out = []
    for name in METHODS.names():
        cls = METHODS.get(name).config_cls
        for f, tp in typing.get_type_hints(cls).items():
            if tp is float or tp == (float | None):
                out.append((name, f))
    return out


@pytest.mark.parametrize("method, option", float_options(), ids=lambda x: str(x))
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_option_of_every_method_rejects_non_finite(method, option, value):
    with pytest.raises(ConfigError, match=rf"method.{option} must be a finite number"):
        build_config(None, [f"method={method}", f"method.{option}={value}"])


def test_dataclasses_built_in_python_are_checked_too():
    with pytest.raises(ConfigError, match="method.lr must be a finite number"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match=r"method.momentum must be in \[0, 1\)"):
        TrainConfig(momentum=1.5)
    with pytest.raises(ConfigError, match="seed must be an integer in"):
        RunConfig(seed=-1)
    with pytest.raises(ConfigError, match="num_workers must be >= 0"):
        RunConfig(num_workers=-1)


@pytest.mark.parametrize("override", ["seed=-1", "seed=4294967296", "eval_batch_size=0", "num_workers=-1",
                                      "method.lr=.inf"])
def test_bad_values_are_one_line_before_the_run_folder(override, tmp_path, capsys):
    over = tiny_overrides("finetune", **{"method.epochs": 1})
    line = cli_error(["run", *over, override], capsys, tmp_path / "run")
    assert override.split("=")[0] in line


# --------------------------------------------------------------------------- 3. devices


def test_available_devices_lists_this_machine():
    avail = dist.available_devices()
    assert avail[:2] == ["auto", "cpu"]
    assert ("cuda" in avail) == torch.cuda.is_available()
    assert dist.resolve_device("cpu") == CPU


@pytest.mark.parametrize("name", ["tpu", "", "cuda:99", "gpu", "cuda:x"])
def test_unknown_or_missing_devices_are_config_errors(name):
    with pytest.raises(ConfigError, match=r"device .* is not available on this machine.*available: auto, cpu"):
        dist.resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_config_error(name, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"no CUDA GPU is visible\); available: auto, cpu"):
        dist.resolve_device(name)
    line = cli_error(["run", *tiny_overrides("simplecil"), f"device={name}"], capsys, tmp_path / "run")
    assert f"device '{name}'" in line and "available: auto, cpu" in line


@pytest.mark.parametrize("name", ["tpu", "", "CPU", "cuda:"])
def test_device_syntax_is_checked_with_the_config(name, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"device must be auto, cpu, cuda, cuda:N or mps"):
        build_config(None, [f"device={name}"])
    line = cli_error(["run", *tiny_overrides("simplecil"), f"device={name}"], capsys, tmp_path / "run")
    assert "device must be" in line


# --------------------------------------------------------------------------- 4. structure

STRUCTURES = {
    "section is a list": ("method: [a, b]\n", r"config section 'method' must be a mapping of options"),
    "empty list section": ("dataset: []\n", r"config section 'dataset' must be a mapping of options"),
    "method without a name": ("method: {x: 1}\n", r"config section 'method' sets x but no method.name; valid names:"),
    "method is a number": ("method: 5\n", r"config section 'method' must be a mapping of options \(or a method name\), got 5"),
    "section is a number": ("scenario: 3\n", r"config section 'scenario' must be a mapping"),
    "section is a bool": ("backbone: true\n", r"config section 'backbone' must be a mapping"),
    "top-level list": ("- method\n- seed\n", r"must hold a mapping of keys to values at the top level"),
    "top-level scalar": ("5\n", r"must hold a mapping of keys to values at the top level"),
    "mapping for a scalar": ("seed: {a: 1}\n", r"seed must be an integer, got \{'a': 1\}"),
    "mapping for a name": ("method: {name: {a: 1}}\n", r"method.name must be a method name"),
    "list for a number": ("method: {name: finetune, lr: [1, 2]}\n", r"method.lr must be a number, got \[1, 2\]"),
    "list for a choice": ("method: {name: finetune, optimizer: [sgd]}\n", r"bad value \['sgd'\] for method.optimizer"),
    "number keys": ("1: 2\nx: 3\n", r"unknown config key 1; valid:"),
    "mapping for a path": ("dataset: {root: {a: 1}}\n", r"dataset.root must be a path"),
}


@pytest.mark.parametrize("case", sorted(STRUCTURES))
def test_bad_structure_is_one_config_error(case, tmp_path, capsys):
    text, pattern = STRUCTURES[case]
    path = write(tmp_path / "cfg.yaml", text)
    with pytest.raises(ConfigError, match=pattern):
        build_config(load_file(path))
    assert re.search(pattern, cli_error(["run", str(path)], capsys, tmp_path / "run"))


@pytest.mark.parametrize(
    "data, pattern",
    [([1, 2], r"the config must be a mapping of keys to values, got \[1, 2\]"),
     ("method: l2p", r"the config must be a mapping"),
     ({"method": ["a"]}, r"config section 'method' must be a mapping"),
     ({1: 2, "x": 3}, r"unknown config key 1")],
)
def test_bad_structure_from_python(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(data)


@pytest.mark.parametrize(
    "overrides, pattern",
    [(["method=finetune", "method.lr=[1,2]"], r"method.lr must be a number, got \[1, 2\]"),
     (["seed.a=1"], r"seed must be an integer, got \{'a': 1\}"),
     (["method.name.x=1"], r"method.name must be a method name"),
     (["method.epochs=3"], r"config section 'method' sets epochs but no method.name")],
)
def test_bad_structure_from_overrides(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(None, overrides)


def test_section_named_by_a_string_keeps_its_name_under_overrides():
    cfg = build_config({"method": "l2p"}, ["method.epochs=3"])
    assert (cfg.method.name, cfg.method.epochs) == ("l2p", 3)
    cfg = build_config({"method": None, "dataset": None}, ["method=finetune"])
    assert cfg.method.name == "finetune" and cfg.dataset == DatasetConfig()


def test_structure_error_from_the_console_has_no_traceback(tmp_path):
    path = write(tmp_path / "cfg.yaml", "method: [a, b]\n")
    p = subprocess.run([sys.executable, "-m", "ptcl", "run", str(path), "-q", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # this tree's ptcl
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("ptcl: error: config section 'method' must be a mapping")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 5. pool sizes


def scenario_context(num_tasks: int) -> LearnerContext:
    return LearnerContext(None, Scenario.build(2 * num_tasks, 2, 2, 0), CPU, 0, quiet=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make, message",
    [(lambda ctx: DualPrompt(DualPromptConfig(pool_size=3), tiny_timm_vit(6), ctx),
      r"method.pool_size=3 is smaller than the scenario's 5 tasks: dualprompt .* set method.pool_size=5"),
     (lambda ctx: DAP(DAPConfig(pool_size=3, num_tokens=2, task_emb_dim=4), tiny_timm_vit(4), ctx),
      r"method.pool_size=3 is smaller than the scenario's 5 tasks: dap .* set method.pool_size=5"),
     (lambda ctx: CodaPrompt(CodaPromptConfig(pool_size=3, layers=[0]), tiny_timm_vit(2), ctx),
      r"method.pool_size=3 is smaller than the scenario's 5 tasks: coda_prompt .* set method.pool_size=5"),
     (lambda ctx: CodaPrompt(CodaPromptConfig(pool_size=40, layers=[0]), tiny_timm_vit(2), ctx),
      r"method.pool_size=40 keys cannot be orthogonal in 32 dimensions .* set method.pool_size <= 32")],
    ids=["dualprompt", "dap", "coda_prompt-small", "coda_prompt-orthogonal"],
)
def test_pool_size_is_checked_when_the_learner_is_built(make, message):
    with pytest.raises(ConfigError, match=message):
        make(scenario_context(5))


def test_pool_size_check_skips_a_context_without_scenario():
    assert DualPrompt(DualPromptConfig(pool_size=3), tiny_timm_vit(6), None).cfg.pool_size == 3  # type: ignore[arg-type]
    assert DAP(DAPConfig(pool_size=3, num_tokens=2, task_emb_dim=4), tiny_timm_vit(4), fake_context()).keys.shape[0] == 3
    assert len(CodaPrompt(CodaPromptConfig(pool_size=3, layers=[0]), tiny_timm_vit(2), fake_context()).components) == 0
    assert DualPrompt(DualPromptConfig(pool_size=5), tiny_timm_vit(6), scenario_context(5)).pool.prompts.shape[0] == 5


@pytest.mark.parametrize("method, extra", [("dualprompt", {"method.g_layers": "[0]", "method.e_layers": "[1]"}),
                                           ("dap", {"method.num_tokens": 2, "method.task_emb_dim": 4}),
                                           ("coda_prompt", {"method.layers": "[0]"})])
def test_pool_size_fails_before_the_run_folder(method, extra, tmp_path, capsys):
    over = tiny_overrides(method, **{"method.pool_size": 3, "method.epochs": 1, **extra})  # 5 tasks
    line = cli_error(["run", *over], capsys, tmp_path / "run")
    assert "method.pool_size=3" in line and "5 tasks" in line


# --------------------------------------------------------------------------- 6. paths


def test_path_fields_are_marked_by_metadata():
    from ptcl.config import is_path_field

    assert [f.name for f in dataclasses.fields(DatasetConfig) if is_path_field(f)] == ["root", "class_names"]
    assert [f.name for f in dataclasses.fields(BackboneConfig) if is_path_field(f)] == ["weights"]


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path, monkeypatch):
    cfg_file = write(tmp_path / "a" / "b" / "cfg.yaml",
                     "dataset:\n  root: data/x\nbackbone:\n  weights: ../w.safetensors\n")
    for cwd in (tmp_path, tmp_path / "a" / "b", REPO):
        monkeypatch.chdir(cwd)
        cfg = build_config(load_file(os.path.relpath(cfg_file, cwd)))
        assert cfg.dataset.root == str(tmp_path / "a" / "b" / "data" / "x")
        assert cfg.backbone.weights == str(tmp_path / "a" / "w.safetensors")
    cfg = build_config({"dataset": {"root": "data/x"}}, base_dir=tmp_path / "elsewhere")
    assert cfg.dataset.root == str(tmp_path / "elsewhere" / "data" / "x")


def test_override_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    cfg_file = write(tmp_path / "conf" / "cfg.yaml", "dataset:\n  root: data/x\n")
    monkeypatch.chdir(tmp_path)
    cfg = build_config(load_file(cfg_file), ["dataset.root=mine", "backbone.weights=./w.pth"])
    assert cfg.dataset.root == str(tmp_path / "mine") and cfg.backbone.weights == str(tmp_path / "w.pth")
    assert build_config({"dataset": {"root": "d"}}).dataset.root == str(tmp_path / "d")  # a Python dict: cwd


def test_home_absolute_and_null_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg_file = write(tmp_path / "c.yaml", "dataset:\n  root: ~/data\nbackbone:\n  weights: /abs/w.pth\n")
    cfg = build_config(load_file(cfg_file))
    assert cfg.dataset.root == str(tmp_path / "home" / "data") and cfg.backbone.weights == "/abs/w.pth"
    assert build_config(None, ["backbone.weights=~/w.pth"]).backbone.weights == str(tmp_path / "home" / "w.pth")
    cfg = build_config(load_file(write(tmp_path / "n.yaml", "dataset:\n  root: null\n")))
    assert cfg.dataset.root is None and cfg.backbone.weights is None
    with pytest.raises(ConfigError, match=r"dataset.root must be a path \(or null for none\), got ''"):
        build_config(None, ["dataset.root="])


def test_saved_config_records_absolute_paths(tmp_path, monkeypatch):
    cfg_file = write(tmp_path / "conf" / "cfg.yaml", "dataset:\n  name: imagefolder\n  root: ../data\n")
    monkeypatch.chdir(tmp_path / "conf")
    cfg = build_config(load_file("cfg.yaml"))
    saved = write(tmp_path / "run" / "config.yaml", save_config(cfg))
    assert f"root: {tmp_path / 'data'}" in saved.read_text()
    monkeypatch.chdir(REPO)
    assert build_config(load_file(saved)) == cfg
    assert DatasetConfig(root="rel").root == str(REPO / "rel")  # a dataclass built in Python too
    assert cfg_file.is_file()


@pytest.mark.skipif(not CIFAR10_ARCHIVE.is_file(), reason="real CIFAR-10 archive not present")
@pytest.mark.parametrize("cwd", [REPO, REPO / "configs", REPO.parent])
def test_shipped_offline_config_works_from_any_directory(cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    cfg = build_config(load_file(os.path.relpath(REPO / "configs" / "simplecil_cifar10_offline.yaml", cwd)))
    assert cfg.dataset.root == str(CIFAR10_ARCHIVE)


def image_folder(root: Path, classes: int = 4, per_class: int = 2) -> Path:
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray((rng.rand(16, 16, 3) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def test_run_and_resume_from_other_directories(tmp_path, monkeypatch, capsys):
    image_folder(tmp_path / "project" / "data")
    cfg_file = write(tmp_path / "project" / "configs" / "c.yaml",
                     "method: simplecil\nbackbone: vit_tiny_test\n"
                     "dataset:\n  name: imagefolder\n  root: ../data\nscenario:\n  init_cls: 2\n  increment: 1\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg_file), "--out", str(run_dir), "--max-tasks", "1", "-q"]) == 0, capsys.readouterr().err
    assert f"root: {tmp_path / 'project' / 'data'}" in (run_dir / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", str(run_dir), "-q"]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- review follow-ups


def test_integers_follow_yaml_1_2():
    from ptcl.config import yaml_load

    assert yaml_load("a: 012\nb: 0o17\nc: 0x1f\nd: 1_000\ne: -5") == {"a": 12, "b": 15, "c": 31, "d": 1000, "e": -5}
    assert yaml_load("a: 1:30\nb: 1:30.5") == {"a": "1:30", "b": "1:30.5"}  # no sexagesimal
    assert build_config(None, ["seed=012"]).seed == 12
    with pytest.raises(ConfigError, match="method.epochs must be an integer"):
        build_config(None, ["method=finetune", "method.epochs=1:30"])


def test_numpy_scalars_from_python():
    import numpy as np

    cfg = build_config({"seed": np.int64(5), "method": {"name": "finetune", "lr": np.float32(0.5)}})
    assert cfg.seed == 5 and type(cfg.seed) is int and cfg.method.lr == 0.5 and type(cfg.method.lr) is float


def test_scenario_is_not_a_named_section():
    with pytest.raises(ConfigError, match="section 'scenario' must be a mapping of options, got 5"):
        build_config(None, ["scenario=5"])


def test_projection_seed_range():
    with pytest.raises(ConfigError, match="method.projection_seed must be an integer in"):
        build_config(None, ["method=ranpac", "method.projection_seed=-1"])

"""Typed run configuration: dataclasses, YAML/JSON loading and ``key=value`` overrides.

A run config has the sections ``method``, ``backbone``, ``dataset``, ``scenario`` and the
top-level keys ``seed``, ``device``, ``eval_batch_size``, ``num_workers``,
``keep_all_checkpoints``, ``precision``, ``loggers``. The ``method`` section is parsed into the registered method's own
config dataclass, so ``method.epochs=3`` is checked against that method's options.

Every value is checked here, before a run starts: unknown keys, values of the wrong type or
shape, out-of-range numbers and non-finite floats raise :class:`ConfigError` naming the key,
the bad value and what is valid. Rules shared by every section:

* numbers are read as YAML 1.2 writes them (``1e-3``, ``5E-4``, ``1.0e30``, ``-2e+3``,
  ``.5``, ``1_000.5``); an int option takes an integral number (``1e3`` -> 1000, not
  ``2.5``); a float option must be finite (no ``.nan``, ``.inf``);
* fields marked ``metadata={"path": True}`` (:data:`PATH`: ``dataset.root``,
  ``backbone.weights``) are paths: ``~`` is expanded, a relative path from a config file
  is relative to that file's folder, one from an override or a Python dict to the current
  directory, and the :class:`RunConfig` holds it absolute (so the saved config is
  independent of the directory a run or ``--resume`` starts from).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ptcl.errors import ConfigError
from ptcl.options import check_constraints, option
from ptcl.precision import check_precision
from ptcl.registry import METHODS as DEFAULT_METHODS
from ptcl.registry import Registry
from ptcl.report.loggers import check_loggers

SECTIONS = ("method", "backbone", "dataset", "scenario")
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
_EXACT_INT = 2**53  # larger floats are not exact integers

PATH: dict[str, Any] = {"path": True}
"""Field metadata of a path-valued option (see the module docstring). A subclass that
re-declares such a field must repeat ``metadata=PATH``."""


# --------------------------------------------------------------------------- checks


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _positive(cfg: Any, *names: str, section: str = "method") -> None:
    """Each of ``names`` must be ``> 0`` (NaN fails too)."""
    for n in names:
        if not getattr(cfg, n) > 0:  # also rejects NaN
            raise ConfigError(f"{_key(section, n)} must be > 0, got {getattr(cfg, n)!r}")


def _at_least(cfg: Any, section: str, lo: float, *names: str, optional: bool = False) -> None:
    """Each of ``names`` must be ``>= lo`` (or ``None`` when ``optional``)."""
    for n in names:
        v = getattr(cfg, n)
        if optional and v is None:
            continue
        if not (isinstance(v, (int, float)) and v >= lo):
            null = " or null" if optional else ""
            raise ConfigError(f"{_key(section, n)} must be >= {lo}{null}, got {v!r}")


def _seed(cfg: Any, section: str, *names: str) -> None:
    """Each of ``names`` must be a seed in ``[0, 2**32 - 1]``."""
    for n in names:
        v = getattr(cfg, n)
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SEED_MAX):
            raise ConfigError(f"{_key(section, n)} must be an integer in [0, 2**32 - 1 = {SEED_MAX}], got {v!r}")


def _named(cfg: Any, section: str) -> None:
    """``name`` must be a non-empty string."""
    if not (isinstance(cfg.name, str) and cfg.name.strip()):
        raise ConfigError(f"{section}.name must be a non-empty name, got {cfg.name!r}")


def _finite(value: Any, key: str) -> None:
    """Every float in ``value`` (nested in lists and mappings too) must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if isinstance(value, (list, tuple)):
        for v in value:
            _finite(v, key)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _finite(v, f"{key}.{k}")


def is_path_field(f: dataclasses.Field) -> bool:
    """Whether a dataclass field holds a path (``metadata=PATH``)."""
    return bool(f.metadata.get("path"))


def absolute_path(value: Any, base: str | os.PathLike | None, key: str) -> str:
    """``value`` (a path) with ``~`` expanded, relative to ``base`` (default: the current
    directory), absolute and normalised. Raises :class:`ConfigError` for an empty or
    non-path value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a folder named by a number
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a path (or null for none), got {value!r}")
    p = os.path.expanduser(value)
    if base is not None and not os.path.isabs(p):
        p = os.path.join(os.path.expanduser(os.fspath(base)), p)
    return os.path.abspath(p)


def _check_common(cfg: Any, section: str) -> None:
    """Checks every config dataclass shares: finite floats, the options' bounds
    (:func:`ptcl.options.check_constraints`), absolute paths."""
    check_constraints(cfg, section)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        _finite(v, _key(section, f.name))
        if is_path_field(f) and v is not None:
            setattr(cfg, f.name, absolute_path(v, None, _key(section, f.name)))


# --------------------------------------------------------------------------- sections


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add the paper's options and defaults.

    ``__post_init__`` checks what every method shares (finite floats, absolute paths);
    a subclass calls it first, then checks its own options."""

    name: str = option("simplecil", "the method (ptcl list methods)")

    def __post_init__(self) -> None:
        _named(self, "method")
        _check_common(self, "method")


@dataclass
class TrainConfig(MethodConfig):
    """Options shared by methods that train with SGD-style optimisers.

    ``epochs``, ``lr``, ``batch_size`` > 0; ``momentum`` in [0, 1) (SGD only);
    ``weight_decay`` >= 0; ``clip_grad`` > 0 or null. The optimisers and schedules are
    described in :mod:`ptcl.train.optim`."""

    epochs: int = option(10, "training epochs per task", gt=0)
    lr: float = option(0.01, "learning rate", gt=0)
    batch_size: int = option(32, "training batch size", gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = option("sgd", "optimiser")
    momentum: float = option(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = option(False, "SGD with Nesterov momentum")
    betas: list[float] = option(help="Adam/AdamW betas", ge=0, lt=1, factory=lambda: [0.9, 0.999],
                                source="torch's default")
    eps: float = option(1e-8, "Adam/AdamW epsilon", gt=0, source="torch's default")
    amsgrad: bool = option(False, "Adam/AdamW with AMSGrad")
    weight_decay: float = option(0.0, "weight decay (L2, decoupled for AdamW)", ge=0)
    scheduler: Literal["cosine", "cosine_step", "multistep", "constant", "coda_cosine"] = option(
        "cosine", "lr schedule: cosine per epoch (LAMDA-PILOT), cosine per step, step decay at "
        "milestones, constant, or CODA-Prompt's per-epoch CosineSchedule (ptcl.train.optim)")
    milestones: list[int] = option(help="multistep: epochs at which the lr is multiplied by lr_decay",
                                   gt=0, factory=list)
    lr_decay: float = option(0.1, "multistep: lr factor at each milestone", gt=0)
    warmup_steps: int = option(0, "linear lr warmup over the first optimiser steps (not with cosine)", ge=0)
    clip_grad: float | None = option(None, "max global gradient norm of every step; null: no clipping", gt=0)
    augment: Literal["crop_flip", "resize"] = option(
        "crop_flip", "train augmentation: RandomResizedCrop + flip (+ brightness jitter), or resize only "
        "(DAP) (ptcl.backbones.transforms)")
    crop_scale: list[float] = option(help="augment=crop_flip: RandomResizedCrop's area range", gt=0, le=1,
                                     factory=lambda: [0.05, 1.0], source="LAMDA-PILOT utils/data.py build_transform")
    brightness: float = option(0.0, "augment=crop_flip: ColorJitter brightness (0: none; SLCA CIFAR: 63/255)", ge=0)
    interpolation: Literal["bicubic", "bilinear"] = option(
        "bicubic", "train crop/resize resampling: bicubic (SLCA) or bilinear (torchvision's default: the "
        "random crops of PILOT, RevisitingCIL, EASE, MOS, RanPAC, CODA-Prompt, the L2P/DualPrompt ports; DAP)")
    shuffle: bool = option(True, "shuffle the training samples every epoch (DAP's ImageNet-R loader does not)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("method.nesterov needs method.optimizer=sgd and method.momentum > 0")
        if len(self.betas) != 2:
            raise ConfigError(f"method.betas must be two numbers in [0, 1), got {self.betas!r}")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(f"method.milestones must be increasing positive epochs, got {self.milestones}")
        if len(self.crop_scale) != 2 or self.crop_scale[0] > self.crop_scale[1]:
            raise ConfigError(f"method.crop_scale must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale!r}")
        if self.warmup_steps and self.scheduler == "cosine":
            raise ConfigError("method.warmup_steps needs a per-step schedule: method.scheduler=cosine_step, "
                              "multistep or constant")


@dataclass
class BackboneConfig:
    """Which pre-trained model extracts features. Any timm model name works too.

    ``image_size``: input side in pixels (>= 8; null: the backbone's own). ``weights``: a
    local checkpoint (.safetensors, or .pth read ``weights_only``), a path.
    ``clip_model`` / ``clip_pretrained``: the open_clip model name and pretrained tag of
    ``name: clip`` (:mod:`ptcl.backbones.clip`); set with another backbone, or a tag together
    with ``weights``, they raise :class:`ConfigError`."""

    name: str = option("efficientnet_lite0", "a registered backbone (ptcl list backbones) or any timm model name")
    pretrained: bool = option(True, "load the pre-trained weights")
    image_size: int | None = option(None, "input side in pixels; null: the backbone's own", ge=8)
    weights: str | None = option(None, "a local checkpoint (.safetensors, or .pth read weights_only)", path=True)
    input_norm: Literal["backbone", "none", "imagenet", "custom"] = option(
        "backbone", "input normalisation: the weights' own mean/std, none ([0, 1] pixels, the official "
        "ViT pipelines of PILOT, APER, RanPAC, EASE, MOS, FeCAM), ImageNet's (DAP), or custom "
        "(backbone.mean / backbone.std, e.g. SLCA's dataset statistics)")
    mean: list[float] | None = option(None, "input_norm=custom: per-channel mean of [0, 1] pixels (3 numbers)")
    std: list[float] | None = option(None, "input_norm=custom: per-channel std of [0, 1] pixels (3 numbers)", gt=0)
    eval_crop_ratio: float = option(
        1.0, "evaluation centre crop's share of the resized short side: 1.0 resizes to the input size; "
        "0.875 is Resize(256) + CenterCrop(224) (PILOT, EASE, MOS, RevisitingCIL, SLCA)", gt=0, le=1)
    eval_interpolation: Literal["bicubic", "bilinear"] = option(
        "bicubic", "evaluation resize: bicubic (PILOT, SLCA) or bilinear (torchvision's default: CODA-Prompt, FeCAM)")
    clip_model: str | None = option(
        None, "name=clip: the open_clip model (open_clip.list_models(), e.g. ViT-B-16, ViT-L-14); null: ViT-B-16")
    clip_pretrained: str | None = option(
        None, "name=clip: the open_clip pretrained tag, e.g. openai (ZSCL, PromptFusion), laion400m_e32 "
        "(PROOF), laion2b_s34b_b88k; null: openai (ptcl.backbones.clip)")

    def __post_init__(self) -> None:
        _named(self, "backbone")
        _check_common(self, "backbone")
        clip_keys = [k for k in ("clip_model", "clip_pretrained") if getattr(self, k) is not None]
        if clip_keys and self.name != "clip":
            raise ConfigError(f"backbone.{clip_keys[0]} is only used with backbone.name=clip "
                              f"(name is {self.name!r}); set backbone.name=clip or drop it")
        for k in clip_keys:
            if not getattr(self, k).strip():
                raise ConfigError(f"backbone.{k} must be a non-empty name or null, got {getattr(self, k)!r}")
        if self.clip_pretrained is not None and self.weights is not None:
            raise ConfigError("backbone.weights (a local CLIP checkpoint) replaces backbone.clip_pretrained "
                              "(a tag to download); set only one of them")
        given = [k for k in ("mean", "std") if getattr(self, k) is not None]
        if self.input_norm == "custom":
            for k in ("mean", "std"):
                v = getattr(self, k)
                if v is None or len(v) != 3:
                    raise ConfigError(f"backbone.input_norm=custom needs backbone.{k} as 3 numbers "
                                      f"(per RGB channel, of [0, 1] pixels), got {v!r}")
        elif given:
            raise ConfigError(f"backbone.{given[0]} is only used with backbone.input_norm=custom "
                              f"(input_norm is {self.input_norm!r}); set input_norm=custom or drop it")


@dataclass
class DatasetConfig:
    """Which dataset, where it lives, and optional per-class subsetting for quick runs.

    ``root``: the dataset's folder or archive (a path; null: the dataset's default).
    ``train_per_class`` / ``test_per_class``: keep this many images of each class (>= 1;
    null: all), drawn with ``subset_seed`` (an integer in [0, 2**32 - 1]; 1993 as the
    class order), so the subset does not change with the run's ``seed``. ``class_names``:
    a file naming the classes in words (:mod:`ptcl.data.class_names`, a path), for
    vision-language methods."""

    name: str = option("mnist_demo", "a registered dataset (ptcl list datasets)")
    root: str | None = option(None, "the dataset's folder or archive; null: its default place", path=True)
    train_per_class: int | None = option(None, "keep this many training images per class; null: all", ge=1)
    test_per_class: int | None = option(None, "keep this many test images per class; null: all", ge=1)
    subset_seed: int = option(1993, "seed of the per-class subsets (not the run seed), in [0, 2**32 - 1]")
    download: bool = option(True, "download a missing dataset where its loader can")
    class_names: str | None = option(
        None, "a class-name map (classnames.txt / words.txt format, ptcl.data.class_names) giving the text "
        "name of each class id; null: a classnames.txt or words.txt beside train/ and test/, else the "
        "dataset's own names (folder names with _ as spaces)", path=True)

    def __post_init__(self) -> None:
        _named(self, "dataset")
        _check_common(self, "dataset")
        _seed(self, "dataset", "subset_seed")


@dataclass
class ScenarioConfig:
    """The class-incremental protocol: ``[init_cls] + [increment] * k`` (+ remainder);
    ``init_cls`` and ``increment`` are numbers of classes (>= 1)."""

    init_cls: int = option(2, "classes of the first task", ge=1)
    increment: int = option(2, "classes of every later task", ge=1)
    shuffle: bool = option(True, "class order np.random.seed(seed) permutation (else label order)",
                           source="LAMDA-PILOT DataManager")

    def __post_init__(self) -> None:
        _check_common(self, "scenario")


@dataclass
class RunConfig:
    """A whole run. ``seed``: class order and every random draw (an integer in
    [0, 2**32 - 1]); ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether
    it exists here is checked by :func:`ptcl.dist.resolve_device`);
    ``eval_batch_size`` >= 1; ``num_workers`` (data-loader processes) >= 0 or ``auto``
    (:func:`ptcl.data.loading.resolve_num_workers`); ``precision``:
    ``fp32`` or ``bf16`` (:mod:`ptcl.precision`); ``loggers``: names of registered loggers
    (:data:`ptcl.report.loggers.LOGGERS`), each at most once."""

    method: MethodConfig = field(default_factory=MethodConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    seed: int = option(1993, "class order and every random draw, in [0, 2**32 - 1]", source="LAMDA-PILOT")
    device: str = option("auto", f"{DEVICE_FORMS}")
    eval_batch_size: int = option(64, "batch size of feature extraction and evaluation", ge=1)
    num_workers: int | Literal["auto"] = option(
        "auto", "data-loader worker processes that decode and resize images; auto: min(8, usable cores - 1), "
        "none for loaders under 256 items (ptcl.data.loading)", ge=0,
        source="ptcl (LAMDA-PILOT uses 8 workers)")
    keep_all_checkpoints: bool = option(False, "keep every task's checkpoint (else only the latest)")
    loggers: list[str] = option(
        help="progress loggers besides run.log, into <run>/logs: csv, tensorboard (ptcl.report.loggers)",
        factory=list)
    precision: Literal["fp32", "bf16"] = option(
        "fp32", "network forwards (feature extraction, training steps, image-input evaluation): fp32, or bf16 "
        "autocast on CPU/GPU; statistics and cached features stay float32 (ptcl.precision)")

    def __post_init__(self) -> None:
        for sec, cls in (("method", MethodConfig), ("backbone", BackboneConfig),
                         ("dataset", DatasetConfig), ("scenario", ScenarioConfig)):
            if not isinstance(getattr(self, sec), cls):
                raise ConfigError(f"config section {sec!r} must be a {cls.__name__}, got {getattr(self, sec)!r}")
        _check_common(self, "")
        _seed(self, "", "seed")
        check_loggers(self.loggers)
        if not (isinstance(self.device, str) and _DEVICE_RE.fullmatch(self.device)):
            raise ConfigError(f"device must be {DEVICE_FORMS}, got {self.device!r}")
        check_precision(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- parsing


class _Loader(yaml.SafeLoader):
    """``safe_load`` with YAML 1.2's numbers: PyYAML's YAML 1.1 rules read ``1e-3``,
    ``5E-4``, ``1.0e30`` and ``-.5`` as strings, ``012`` as octal 10 and ``1:30`` as 90."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    """YAML 1.2 core integers: decimal (leading zeros too), ``0o`` octal, ``0x`` hex."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body[:2] in ("0o", "0x"):
        return sign * int(body[2:], 8 if body[1] == "o" else 16)
    return sign * int(body, 10)


_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` reading numbers as YAML 1.2 does (``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


class ConfigData(dict):
    """A config file's mapping; ``base_dir`` (the file's folder) is what its relative
    paths are relative to (see :func:`build_config`)."""

    def __init__(self, data: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> None:
        super().__init__(data)
        self.base_dir = base_dir


def load_file(path: str | os.PathLike) -> ConfigData:
    """Read a YAML or JSON config file into a dict (YAML through a safe loader) that
    remembers the file's folder as its ``base_dir``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {p}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of keys to values at the top level, got {data!r}"
        )
    return ConfigData(data, Path(os.path.abspath(p)).parent)  # the folder as named, links kept


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "method=l2p"]`` -> nested dict; values are read as YAML scalars (and flow
    lists or mappings: ``[0, 1]``, ``{a: 1}``; other text stays a string)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # a block collection (`cuda:`, `- a`) is text; only flow ones are values
        if key in SECTIONS and key != "scenario":  # shorthand: method=simplecil
            key = f"{key}.name"
        set_dotted(out, key, value)
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r} conflicts with a value set for {p!r}")
        d = nxt
    d[parts[-1]] = value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _normalise(data: Any, what: str) -> dict[str, Any]:
    """``data`` checked to be a mapping whose sections are mappings; a section given as a
    string is its name (``method: l2p``), an empty one (``method:``) its defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of keys to values, got {data!r}")
    out = dict(data)
    for sec in SECTIONS:
        if sec not in out:
            continue
        v = out[sec]
        if v is None:
            out[sec] = {}
        elif isinstance(v, str) and sec != "scenario":  # the scenario has no name
            out[sec] = {"name": v}
        elif isinstance(v, Mapping):
            out[sec] = dict(v)
        else:
            named = "" if sec == "scenario" else f" (or a {sec} name)"
            raise ConfigError(f"config section {sec!r} must be a mapping of options{named}, got {v!r}")
    return out


def _resolve_paths(raw: dict[str, Any], classes: dict[str, type], base: str | os.PathLike) -> dict[str, Any]:
    """``raw`` with the path fields of each section (``classes``; ``""``: the top level)
    made absolute relative to ``base``."""
    out = dict(raw)
    for sec, cls in classes.items():
        target = out if not sec else out.get(sec)
        if not isinstance(target, dict):
            continue
        target = dict(target) if sec else target
        for f in dataclasses.fields(cls):
            if is_path_field(f) and target.get(f.name) is not None:
                target[f.name] = absolute_path(target[f.name], base, _key(sec, f.name))
        if sec:
            out[sec] = target
    return out


def build_config(
    data: Mapping[str, Any] | None = None,
    overrides: list[str] | None = None,
    base_dir: str | os.PathLike | None = None,
    methods: Registry | None = None,
) -> RunConfig:
    """Validate ``data`` (+ ``key=value`` overrides) into a :class:`RunConfig`.

    Relative paths in ``data`` are relative to ``base_dir`` (default: ``data.base_dir``
    when ``data`` comes from :func:`load_file`, i.e. the config file's folder, else the
    current directory); those in ``overrides`` to the current directory.
    ``methods``: the registry the method section is looked up in (default
    :data:`ptcl.registry.METHODS`, filled by ``import ptcl``).
    Raises :class:`ConfigError` naming the first bad key and what is valid.
    """
    METHODS = methods if methods is not None else DEFAULT_METHODS  # noqa: N806

    if base_dir is None:
        base_dir = getattr(data, "base_dir", None)
    given = _normalise(data if data is not None else {}, "the config")
    over = _normalise(parse_overrides(overrides or []), "the overrides")
    raw = merge(given, over)
    top_fields = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted((k for k in raw if k not in top_fields), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid: {', '.join(sorted(top_fields))}")
    method_raw = raw.get("method", {})
    if method_raw and "name" not in method_raw:
        raise ConfigError(
            f"config section 'method' sets {', '.join(map(str, method_raw))} but no method.name; "
            f"valid names: {', '.join(METHODS.names())}"
        )
    method_name = method_raw.get("name", MethodConfig.name)
    if not isinstance(method_name, str):
        raise ConfigError(f"method.name must be a method name, got {method_name!r}; valid: {', '.join(METHODS.names())}")
    classes = {"": RunConfig, "method": METHODS.get(method_name).config_cls, "backbone": BackboneConfig,
               "dataset": DatasetConfig, "scenario": ScenarioConfig}
    cwd = os.getcwd()
    raw = merge(_resolve_paths(given, classes, base_dir if base_dir is not None else cwd),
                _resolve_paths(over, classes, cwd))
    kwargs: dict[str, Any] = {sec: from_dict(classes[sec], raw.get(sec, {}), sec) for sec in SECTIONS}
    hints = _hints(RunConfig)
    for name in top_fields:
        if name not in SECTIONS and name in raw:
            kwargs[name] = coerce(raw[name], hints[name], name)
    try:
        return RunConfig(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad config: {e}") from e


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, type-checking each value."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {prefix!r} must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"unknown key '{prefix}.{k}'; valid: {', '.join(names)}")
        kwargs[k] = coerce(v, hints[k], f"{prefix}.{k}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value in section {prefix!r}: {e}") from e


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to type ``tp`` (int, float, bool, str, Optional, Literal,
    list, dict). An int takes an integral number (``1e3`` -> 1000); a float must be finite."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        msg = errors[0] if errors else f"bad value for {key}: {value!r}"
        if type(None) in args:  # name the null the option also takes
            msg = msg.replace(", got ", " or null, got ", 1) if ", got " in msg else f"{msg}, null"
        raise ConfigError(msg)
    if origin is Literal:
        if isinstance(value, (dict, list)) or value not in args:
            raise ConfigError(
                f"bad value {value!r} for {key}; valid: {', '.join(map(str, args))}"
            )
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return origin(coerce(v, inner, key) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)  # numpy integers from the Python API too
        if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INT:
            return int(value)  # 1e3 -> 1000
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:
                out = math.inf
            if not math.isfinite(out):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return out
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def save_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text (loadable again with :func:`load_file`)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

"""Typed run configuration: dataclasses, YAML/JSON loading and ``key=value`` overrides.

A run config has the sections ``method``, ``backbone``, ``dataset``, ``scenario`` and the
top-level keys ``seed``, ``device``, ``eval_batch_size``, ``num_workers``. The ``method``
section is parsed into the registered method's own config dataclass, so
``method.epochs=3`` is checked against that method's options. Unknown keys and values of
the wrong type raise :class:`ConfigError` naming the key and listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ptcl.errors import ConfigError

SECTIONS = ("method", "backbone", "dataset", "scenario")


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add the paper's options and defaults."""

    name: str = "simplecil"

    def __post_init__(self) -> None:
        pass


@dataclass
class TrainConfig(MethodConfig):
    """Options shared by methods that train with SGD-style optimisers."""

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 32
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: Literal["cosine", "constant"] = "cosine"
    clip_grad: float | None = None  # max global gradient norm of every step; null: no clipping

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "epochs", "lr", "batch_size")
        if self.clip_grad is not None:
            _positive(self, "clip_grad")


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        if not getattr(cfg, n) > 0:  # also rejects NaN
            raise ConfigError(f"method.{n} must be > 0, got {getattr(cfg, n)!r}")


@dataclass
class BackboneConfig:
    """Which pre-trained model extracts features. Any timm model name works too."""

    name: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int | None = None  # None: the backbone's own input size
    weights: str | None = None  # local checkpoint (.safetensors, or .pth read weights_only)

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"backbone.image_size must be >= 8, got {self.image_size}")


@dataclass
class DatasetConfig:
    """Which dataset, where it lives, and optional per-class subsetting for quick runs."""

    name: str = "mnist_demo"
    root: str | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    download: bool = True

    def __post_init__(self) -> None:
        for n in ("train_per_class", "test_per_class"):
            v = getattr(self, n)
            if v is not None and v <= 0:
                raise ConfigError(f"dataset.{n} must be a positive integer or null, got {v}")


@dataclass
class ScenarioConfig:
    """The class-incremental protocol: ``[init_cls] + [increment] * k`` (+ remainder)."""

    init_cls: int = 2
    increment: int = 2
    shuffle: bool = True


@dataclass
class RunConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    seed: int = 1993
    device: str = "auto"
    eval_batch_size: int = 64
    num_workers: int = 0
    keep_all_checkpoints: bool = False  # False: only the latest task's checkpoint is kept

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- parsing


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (YAML through ``safe_load``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {p}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "method=l2p"]`` -> nested dict; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if key in SECTIONS:  # shorthand: method=simplecil
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


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Validate ``data`` (+ overrides) into a :class:`RunConfig`."""
    import ptcl.methods  # noqa: F401  (registers the methods)
    from ptcl.registry import METHODS

    raw = merge(data or {}, parse_overrides(overrides or []))
    for sec in SECTIONS:
        if isinstance(raw.get(sec), str):
            raw[sec] = {"name": raw[sec]}
    top_fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(raw) - top_fields)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}; valid: {', '.join(sorted(top_fields))}"
        )
    method_raw = dict(raw.get("method") or {})
    method_name = method_raw.get("name", MethodConfig.name)
    method_cls = METHODS.get(method_name).config_cls
    kwargs: dict[str, Any] = {
        "method": from_dict(method_cls, method_raw, "method"),
        "backbone": from_dict(BackboneConfig, raw.get("backbone") or {}, "backbone"),
        "dataset": from_dict(DatasetConfig, raw.get("dataset") or {}, "dataset"),
        "scenario": from_dict(ScenarioConfig, raw.get("scenario") or {}, "scenario"),
    }
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTIONS and f.name in raw:
            kwargs[f.name] = coerce(raw[f.name], _hints(RunConfig)[f.name], f.name)
    return RunConfig(**kwargs)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, type-checking each value."""
    if not isinstance(data, dict):
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
    """Check/convert ``value`` to type ``tp`` (int, float, bool, str, Optional, Literal, list)."""
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
        raise ConfigError(errors[0] if errors else f"bad value for {key}: {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"bad value {value!r} for {key}; valid: {', '.join(map(str, args))}"
            )
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
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
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def save_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text (loadable again with :func:`load_file`)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

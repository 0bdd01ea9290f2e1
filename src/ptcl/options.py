"""Config options that carry their help, constraints and source.

Every config dataclass field is declared with :func:`option`::

    lr: float = option(0.01, "learning rate of the head", gt=0, source="PILOT exps/slca.json")

The constraints (``ge``, ``gt``, ``le``, ``lt``; applied to every element of a list) are
enforced in one place, :func:`check_constraints`, which every section's ``__post_init__``
calls; choices are ``Literal`` types (checked by the parser). :func:`describe` lists the
options of a config class (type, default, help, constraints, source) for ``ptcl show``.

A subclass that changes a default re-declares the field with the default's own source and
keeps the base field's help and bounds (:func:`field_meta`)::

    epochs: int = option(20, source="official SLCA exps/slca/slca_cifar.json")
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass
from typing import Any

from ptcl.errors import ConfigError

PATH_KEY = "path"


def option(
    default: Any = MISSING,
    help: str = "",  # noqa: A002 (the field's help text)
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    source: str = "",
    path: bool = False,
    factory: Any = MISSING,
) -> Any:
    """A dataclass field with metadata: ``help``, numeric bounds, ``source`` of the default
    (paper / official config), ``path`` (relative paths resolve against the config file).
    A mutable default (a list) is given as ``factory`` (a zero-argument callable)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "source": source, PATH_KEY: path}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


BOUNDS = ("ge", "gt", "le", "lt")


def field_meta(cls: type, name: str) -> typing.Mapping[str, Any]:
    """The metadata of option ``name`` of ``cls``: its nearest declaration's, where a subclass
    that re-declares the field (to change its default and name that default's ``source``)
    inherits from the nearest base declaration what it leaves unset: the ``help`` text and the
    bounds (taken together: a declaration that sets any bound replaces all of them)."""
    metas = [f.metadata for klass in cls.__mro__
             if (f := getattr(klass, "__dataclass_fields__", {}).get(name)) is not None]
    if not metas:
        return {}
    out = dict(metas[0])
    out["help"] = next((m["help"] for m in metas if m.get("help")), "")
    bounds = next((m for m in metas if any(m.get(b) is not None for b in BOUNDS)), {})
    out.update({b: bounds.get(b) for b in BOUNDS})
    return out


def bounds_text(meta: typing.Mapping[str, Any]) -> str:
    """``'> 0'``, ``'in [0, 1)'``, ... (empty without bounds)."""
    lo = ("[", meta.get("ge")) if meta.get("ge") is not None else ("(", meta.get("gt"))
    hi = ("]", meta.get("le")) if meta.get("le") is not None else (")", meta.get("lt"))
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    lo, hi = (lo[0], None if lo[1] is None else num(lo[1])), (hi[0], None if hi[1] is None else num(hi[1]))
    if lo[1] is not None and hi[1] is not None:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo[1] is not None:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi[1] is not None:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return ""


def _within(v: Any, meta: typing.Mapping[str, Any]) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return True  # types are the parser's job
    checks = (("ge", lambda b: v >= b), ("gt", lambda b: v > b), ("le", lambda b: v <= b), ("lt", lambda b: v < b))
    return all(meta.get(k) is None or ok(meta[k]) for k, ok in checks)


def check_constraints(cfg: Any, section: str) -> None:
    """Enforce every field's bounds on ``cfg`` (``None`` passes: optional options);
    raises :class:`ConfigError` naming ``section.field``, the bound and the value."""
    hints: dict[str, Any] | None = None
    for f in dataclasses.fields(cfg):
        meta = field_meta(type(cfg), f.name)
        text = bounds_text(meta)
        if not text:
            continue
        v = getattr(cfg, f.name)
        values = v if isinstance(v, (list, tuple)) else [v]
        if not all(x is None or _within(x, meta) for x in values):
            hints = hints if hints is not None else typing.get_type_hints(type(cfg))
            null = " or null" if type(None) in typing.get_args(hints[f.name]) else ""
            key = f"{section}.{f.name}" if section else f.name
            each = "each value of " if isinstance(v, (list, tuple)) else ""
            raise ConfigError(f"{each}{key} must be {text}{null}, got {v!r}")


@dataclass(frozen=True)
class OptionInfo:
    """One option of a config class, as ``ptcl show`` prints it."""

    name: str
    type: str
    default: Any
    help: str
    bounds: str
    source: str


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type) -> list[OptionInfo]:
    """The options of config dataclass ``cls`` in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        meta = field_meta(cls, f.name)
        out.append(OptionInfo(f.name, _type_name(hints[f.name]), default, meta.get("help", ""),
                              bounds_text(meta), f.metadata.get("source", "")))
    return out

"""Method options, generated from the registry: every method describes itself in one line,
every option has help text, every default a method sets names its source, the bounds are
enforced by the parser, and the command line lists all of it."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest

import ptcl  # noqa: F401  (fills the registries)
from ptcl.cli import main
from ptcl.config import MethodConfig, TrainConfig, build_config
from ptcl.errors import ConfigError
from ptcl.options import OptionInfo, describe, field_meta, option
from ptcl.registry import METHODS

NAMES = METHODS.names()
#: The fields every method config inherits (a method that keeps one unchanged keeps its
#: generic help and needs no source of its own).
BASE_FIELDS = {**MethodConfig.__dataclass_fields__, **TrainConfig.__dataclass_fields__}


def config_cls(method: str) -> type:
    return METHODS.get(method).config_cls


def options(method: str) -> list[OptionInfo]:
    """The options ``ptcl show`` lists (all but ``name``)."""
    return [o for o in describe(config_cls(method)) if o.name != "name"]


def own_options(method: str) -> list[str]:
    """Options the method declares or re-declares (anything not inherited unchanged from
    :class:`MethodConfig` / :class:`TrainConfig`)."""
    cls = config_cls(method)
    return [f.name for f in dataclasses.fields(cls) if f.name != "name" and BASE_FIELDS.get(f.name) is not f]


def description(method: str) -> str:
    cls = METHODS.get(method)
    assert "__doc__" in vars(cls) and cls.__doc__, f"{cls.__name__} has no docstring of its own"
    return cls.__doc__.strip().splitlines()[0]


# --------------------------------------------------------------------------- descriptions


@pytest.mark.parametrize("method", NAMES)
def test_every_method_has_a_one_line_description(method):
    line = description(method)
    assert len(line) > 20 and line.endswith("."), line
    assert len(line) <= 120, f"{method}: the description is longer than a line ({len(line)} characters)"


# --------------------------------------------------------------------------- help and source


@pytest.mark.parametrize("method", NAMES)
def test_every_option_has_help(method):
    missing = [o.name for o in options(method) if not o.help.strip()]
    assert not missing, f"{method}: options without help: {missing}"


@pytest.mark.parametrize("method", NAMES)
def test_every_default_the_method_sets_names_its_source(method):
    sources = {o.name: o.source for o in options(method)}
    missing = [n for n in own_options(method) if not sources[n].strip()]
    assert not missing, f"{method}: re-declared or method-specific options without source: {missing}"


def test_redeclared_options_are_found():
    """The generated source check above sees both kinds of option."""
    assert {"epochs", "ca_lr", "cov_ridge"} <= set(own_options("slca"))  # re-declared and SLCA's own
    assert {"pool_size", "train_mask", "pull_coeff", "lr"} <= set(own_options("l2p"))  # via the shared bases
    assert "momentum" not in own_options("slca")  # inherited unchanged
    assert own_options("simplecil") == []


def test_a_redeclared_field_keeps_the_base_help_and_bounds():
    @dataclasses.dataclass
    class Base:
        n: int = option(3, "a count", gt=0)
        x: float = option(0.5, "a fraction", ge=0, le=1)

    @dataclasses.dataclass
    class Child(Base):
        n: int = option(5, source="the paper")
        x: float = option(0.25, ge=0, lt=1, source="the code")  # own bounds replace the base's

    n, x = field_meta(Child, "n"), field_meta(Child, "x")
    assert (n["help"], n["gt"], n["source"]) == ("a count", 0, "the paper")
    assert (x["help"], x["ge"], x["le"], x["lt"]) == ("a fraction", 0, None, 1)
    info = {o.name: o for o in describe(Child)}
    assert (info["n"].bounds, info["n"].source, info["n"].default) == ("> 0", "the paper", 5)
    assert info["x"].bounds == "in [0, 1)"


# --------------------------------------------------------------------------- bounds


def _is_int(tp: typing.Any) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (list, tuple):
        return _is_int(args[0])
    return tp is int or (bool(args) and all(a is int for a in args))


def _is_list(tp: typing.Any) -> bool:
    return any(typing.get_origin(t) in (list, tuple) for t in (tp, *typing.get_args(tp)))


def bound_violations() -> list[tuple[str, str, str, typing.Any]]:
    """``(method, option, bound, value)``: a value just outside each bound of every option."""
    out = []
    for method in NAMES:
        cls = config_cls(method)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta, tp = field_meta(cls, f.name), hints[f.name]
            step = 1 if _is_int(tp) else 0.5
            for bound, offset in (("ge", -step), ("gt", 0), ("le", step), ("lt", 0)):
                if meta.get(bound) is None:
                    continue
                v = meta[bound] + offset
                v = int(v) if step == 1 else float(v)
                out.append((method, f.name, bound, [v] if _is_list(tp) else v))
    return out


VIOLATIONS = bound_violations()


def test_every_method_with_options_has_a_lower_bound_to_check():
    lower = {m for m, _, bound, _ in VIOLATIONS if bound in ("ge", "gt")}
    with_options = {m for m in NAMES if options(m)}
    assert with_options - lower == set()
    own_lower = {m for m, name, bound, _ in VIOLATIONS if bound in ("ge", "gt") and name in own_options(m)}
    assert own_lower >= with_options - {"finetune", "joint"}  # each method bounds an option of its own


@pytest.mark.parametrize("method, key, bound, value", VIOLATIONS,
                         ids=[f"{m}.{k}-{b}" for m, k, b, _ in VIOLATIONS])
def test_the_parser_enforces_every_bound(method, key, bound, value):
    with pytest.raises(ConfigError, match=rf"method\.{re.escape(key)} must be ") as e:
        build_config(None, [f"method={method}", f"method.{key}={json.dumps(value)}"])
    assert "got " in str(e.value)


@pytest.mark.parametrize("method", [m for m in NAMES if options(m)])
def test_every_default_is_within_its_bounds(method):
    build_config({"method": {"name": method}})  # the defaults pass their own checks


# --------------------------------------------------------------------------- command line


def test_list_methods_prints_a_description_on_every_line(capsys):
    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    for line, method in zip(lines, NAMES, strict=True):
        assert line[len(method):].strip() == description(method)


def option_line(block: list[str], o: OptionInfo) -> str:
    lines = [line for line in block if line.split()[0] == o.name]
    assert len(lines) == 1, f"option {o.name}: {len(lines)} lines"
    return lines[0]


def check_block(block: list[str], method: str) -> None:
    """``block``: the option lines of ``method``; each option has one line with its type,
    default, bounds, help and source."""
    for o in options(method):
        line = option_line(block, o)
        for part in (o.type, f"default {o.default!r}", o.bounds, o.help, o.source):
            assert part in line, f"{method}.{o.name}: {part!r} missing from {line!r}"
    assert len(block) == len(options(method))


def test_list_methods_verbose_prints_every_option(capsys):
    assert main(["list", "methods", "-v"]) == 0
    blocks: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            current = blocks.setdefault(line.split()[0], [])
            assert line[len(line.split()[0]):].strip() == description(line.split()[0])
        else:
            current.append(line)
    assert list(blocks) == NAMES
    for method, block in blocks.items():
        check_block(block, method)


def test_show_prints_the_description_and_every_option(capsys):
    assert main(["show", "slca"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"slca: {description('slca')}"
    start = out.index("options (method.<name>=VALUE):")
    check_block([line for line in out[start + 1:] if line.strip()], "slca")
    assert any("ca_mean_shrink" in line and "in [0, 1)" in line and "official SLCA" in line for line in out)

"""Attach parameter-efficient tuning modules to an unmodified timm model.

A tuning method is a :class:`TuningModule` registered in :data:`PEFT_METHODS`. ``attach``
builds it, stores it as one child ``model.tuning_<name>`` and lets it register forward
(pre-)hooks on the layers it tunes. The timm model is never copied or rewritten, so:

* the tuning parameters declare themselves (they live in ``TuningModule`` instances);
  :func:`tuning_parameters` finds them and :func:`mark_only_tuning_trainable` freezes the
  rest in one call;
* under :func:`disabled` every hook passes through, so the same model object computes the
  plain pre-trained output bit for bit (no second copy of the backbone);
* :func:`detach` removes the hooks and the child and leaves the original module tree.

Hooks are bound methods of ``TuningModule`` s (or partials of them), so a
``copy.deepcopy(model)`` has hooks that call the copy's own tuning modules.

Typical use in a learner::

    handle = attach(backbone.model, "adapter", bottleneck=64)
    mark_only_tuning_trainable(backbone.model)
    opt = torch.optim.SGD(tuning_parameters(backbone.model), lr=0.01)
    ...
    with disabled(backbone.model):      # pre-trained features, same object
        plain = backbone(images)
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from ptcl.backbones.base import TUNING_PREFIX
from ptcl.errors import ConfigError
from ptcl.registry import Registry

logger = logging.getLogger(__name__)

PEFT_METHODS: Registry = Registry("peft method")
"""Name -> :class:`TuningModule` subclass; duplicate names raise, unknown names list the valid."""

PREFIX = TUNING_PREFIX


class TuningModule(nn.Module):
    """Base of every tuning module: owns its parameters and the hooks it registers.

    Subclasses take the host model as first constructor argument, then keyword-only
    options with the paper's defaults, and implement :meth:`install`. ``enabled`` is
    checked by every hook; ``False`` makes the hook a no-op.
    """

    #: True for methods that train the backbone's own weights (full fine-tuning).
    trains_backbone: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def install(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` (called by :func:`attach`, once)."""


class TuningHandle:
    """What :func:`attach` returns: one attached tuning module and its model."""

    def __init__(self, model: nn.Module, module: TuningModule, name: str) -> None:
        self.model = model
        self.module = module
        self.name = name

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of this method (all backbone ones for ``finetune``)."""
        return list((self.model if self.module.trains_backbone else self.module).parameters())

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Bypass this method only (other attached methods stay active)."""
        with _switched_off(self.module):
            yield

    def detach(self) -> None:
        """Remove this method's hooks and module from the model."""
        detach(self.model, self.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This method's tensors (the whole backbone's for ``finetune``)."""
        src = self.model if self.module.trains_backbone else self.module
        return {k: v.detach().clone() for k, v in src.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`state_dict` returned; keys must match exactly."""
        src = self.model if self.module.trains_backbone else self.module
        _check_keys(set(src.state_dict()), set(state))
        src.load_state_dict(state)


def _unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside a ``ptcl`` Backbone (anything with a ``model`` child)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def check_options(method: str, opts: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for an unknown ``method`` or options it does not take
    (without building anything: a config is checked before a run starts)."""
    cls = PEFT_METHODS.get(method)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for peft method {method!r}; valid: {valid}")


def attach(model: nn.Module, method: str, *, name: str | None = None, **opts: Any) -> TuningHandle:
    """Attach tuning ``method`` (a :data:`PEFT_METHODS` name) to ``model`` in place.

    ``opts`` are the method's keyword options; unknown ones raise :class:`ConfigError`.
    ``name`` (default: the method name) names the child ``model.tuning_<name>``, so two
    sets of the same method can coexist (e.g. one adapter set per task).
    """
    check_options(method, opts)
    cls = PEFT_METHODS.get(method)
    host = _unwrap(model)
    attr = PREFIX + (name or method)
    if hasattr(host, attr):
        raise ConfigError(f"{attr!r} is already attached to the model; detach it first")
    module = cls(host, **opts)
    ref = next((p for p in host.parameters() if p.is_floating_point()), None)
    if ref is not None:
        module.to(device=ref.device, dtype=ref.dtype)
    host.add_module(attr, module)
    module.install(host)
    n = sum(p.numel() for p in module.parameters())
    logger.info("attached %s as %s: %d tuning parameters", method, attr, n)
    return TuningHandle(host, module, name or method)


def _roots(model: nn.Module) -> dict[str, TuningModule]:
    """Top-level tuning modules of ``model`` by their full module name."""
    roots: dict[str, TuningModule] = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, TuningModule) and not any(mod_name.startswith(r + ".") for r in roots):
            roots[mod_name] = m
    return roots


def _hook_owner(hook: Any) -> object:
    while isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(hook, "__self__", None)


def _remove_hooks(model: nn.Module, owners: set[int]) -> int:
    removed = 0
    for m in model.modules():
        for hooks, extras in (
            (m._forward_hooks, (m._forward_hooks_with_kwargs, m._forward_hooks_always_called)),
            (m._forward_pre_hooks, (m._forward_pre_hooks_with_kwargs,)),
        ):
            for hid in [h for h, hook in hooks.items() if id(_hook_owner(hook)) in owners]:
                del hooks[hid]
                for extra in extras:
                    extra.pop(hid, None)
                removed += 1
    return removed


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove the tuning module ``tuning_<name>`` (default: all) and its hooks."""
    host = _unwrap(model)
    roots = {k: v for k, v in _roots(host).items() if "." not in k}
    if name is not None:
        if PREFIX + name not in roots:
            raise ConfigError(f"no tuning module {name!r} attached; attached: {sorted(roots)}")
        roots = {PREFIX + name: roots[PREFIX + name]}
    for attr, module in roots.items():
        owners = {id(m) for m in module.modules()}
        n = _remove_hooks(host, owners)
        delattr(host, attr)
        logger.info("detached %s (%d hooks removed)", attr, n)


def tuning_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters to train: those of the tuning modules, or all of them for ``finetune``."""
    roots = _roots(model)
    if any(m.trains_backbone for m in roots.values()):
        return list(model.parameters())
    return list({id(p): p for m in roots.values() for p in m.parameters()}.values())


def mark_only_tuning_trainable(model: nn.Module) -> int:
    """Set ``requires_grad`` True on tuning parameters only; returns how many elements train."""
    keep = {id(p) for p in tuning_parameters(model)}
    n = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        n += p.numel() if id(p) in keep else 0
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", n, total, 100.0 * n / max(total, 1))
    return n


def tuning_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of all tuning modules, keyed as in ``model.state_dict()``."""
    roots = _roots(model)
    full = model.state_dict()
    if any(m.trains_backbone for m in roots.values()):
        return {k: v.detach().clone() for k, v in full.items()}
    keep = tuple(r + "." for r in roots)
    return {k: v.detach().clone() for k, v in full.items() if k.startswith(keep)}


def load_tuning_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`tuning_state_dict` returned; keys must match exactly."""
    _check_keys(set(tuning_state_dict(model)), set(state))
    model.load_state_dict(state, strict=False)


def _check_keys(expected: set[str], got: set[str]) -> None:
    if expected != got:
        missing, extra = sorted(expected - got)[:5], sorted(got - expected)[:5]
        raise ConfigError(
            f"tuning state does not match the attached modules: missing {missing}, "
            f"unexpected {extra}; attach the same method with the same options first"
        )


@contextmanager
def _switched_off(*modules: TuningModule) -> Iterator[None]:
    subs = [m for mod in modules for m in mod.modules() if isinstance(m, TuningModule)]
    if any(m.trains_backbone for m in subs):
        raise ConfigError(
            "finetune changes the backbone weights in place, so its pre-trained output "
            "cannot be recovered without a copy; keep a frozen copy of the backbone instead"
        )
    before = [m.enabled for m in subs]
    try:
        for m in subs:
            m.enabled = False
        yield
    finally:
        for m, state in zip(subs, before):
            m.enabled = state


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` computes exactly its plain pre-trained output."""
    with _switched_off(*_roots(model).values()):
        yield

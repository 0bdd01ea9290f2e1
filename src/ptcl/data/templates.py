"""Prompt templates for vision-language classifiers, and CLIP's zero-shot text classifier.

A template is a string with one ``{}`` where the class name goes. Named sets
(:data:`TEMPLATE_SETS`, selected by name in method options such as ``method.templates``):

``simple``
    ``"a photo of a {}."``: CLIP's default prompt (Radford et al., ICML 2021, Sec. 3.1.4).
``cifar``
    The 18 CIFAR-10/100 templates of CLIP (``openai/CLIP`` ``data/prompts.md``), PROOF's
    ``cifar224`` set (``utils/templates.json``). open_clip does not ship them.
``imagenet_simple``
    The 7 templates of CLIP's ImageNet prompt-engineering notebook, open_clip's
    ``SIMPLE_IMAGENET_TEMPLATES``: PROOF's set for ImageNet-R, ObjectNet and ImageNet.
``imagenet_openai``
    The 80 OpenAI ImageNet templates, open_clip's ``OPENAI_IMAGENET_TEMPLATES``.
``bad_photo`` / ``good_photo``
    ``"a bad photo of a {}."`` (ZSCL / Continual-CLIP on CIFAR-100 and Tiny-ImageNet) and
    ``"a good photo of a {}."`` (on ImageNet-100/1K), from Continual-CLIP's
    ``configs/class/*.yaml``.

:func:`text_classifier` is the CLIP zero-shot recipe (open_clip's
``build_zero_shot_classifier``): per class, the mean over templates of the L2-normalised
text embeddings, normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ptcl.backbones.clip import TextTower
from ptcl.errors import ConfigError

CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)
"""CLIP's 18 CIFAR templates (``openai/CLIP`` ``data/prompts.md``; PROOF ``utils/templates.json``)."""

_OWN: dict[str, tuple[str, ...]] = {
    "simple": ("a photo of a {}.",),
    "cifar": CIFAR_TEMPLATES,
    "bad_photo": ("a bad photo of a {}.",),
    "good_photo": ("a good photo of a {}.",),
}
_OPEN_CLIP = {"imagenet_simple": "SIMPLE_IMAGENET_TEMPLATES", "imagenet_openai": "OPENAI_IMAGENET_TEMPLATES"}

TEMPLATE_SETS: tuple[str, ...] = ("simple", "cifar", "imagenet_simple", "imagenet_openai", "bad_photo", "good_photo")
"""The names :func:`template_set` knows."""


def template_set(name: str) -> tuple[str, ...]:
    """The templates of set ``name`` (:data:`TEMPLATE_SETS`) as format strings."""
    if name in _OWN:
        return _OWN[name]
    if name in _OPEN_CLIP:
        from open_clip import zero_shot_metadata

        # open_clip stores them as lambdas; called on "{}" they give the format strings
        return tuple(t("{}") for t in getattr(zero_shot_metadata, _OPEN_CLIP[name]))
    raise ConfigError(f"unknown template set {name!r}; valid: {', '.join(TEMPLATE_SETS)}, "
                      "or a list of templates with one {} each")


def resolve_templates(spec: str | Sequence[str], key: str = "method.templates") -> list[str]:
    """``spec`` (a set name or a list of templates) as a list of templates, each with exactly
    one ``{}``; a :class:`ConfigError` naming ``key`` otherwise."""
    if isinstance(spec, str):
        try:
            return list(template_set(spec))
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    out = list(spec)
    if not out:
        raise ConfigError(f"{key} must name a template set or list at least one template")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise ConfigError(f"{key}: template {t!r} must hold exactly one {{}} for the class name "
                              "(and no other braces)")
    return out


def prompts(class_name: str, templates: Sequence[str]) -> list[str]:
    """``class_name`` put into every template."""
    return [t.format(class_name) for t in templates]


@torch.no_grad()
def text_classifier(
    text: TextTower, class_names: Sequence[str], templates: str | Sequence[str], batch_classes: int = 64
) -> torch.Tensor:
    """CLIP's zero-shot classifier ``(C, E)`` on ``text``'s device: row ``c`` is the mean over
    ``templates`` (a set name or a list) of the L2-normalised embeddings of
    ``class_names[c]`` put into each template, L2-normalised again (open_clip's
    ``build_zero_shot_classifier``, ``batch_classes`` classes per text-encoder call)."""
    from types import SimpleNamespace

    from open_clip import build_zero_shot_classifier

    if not class_names:
        raise ValueError("text_classifier needs at least one class name")
    device = text.token_embedding.weight.device
    weights = build_zero_shot_classifier(
        SimpleNamespace(encode_text=text.encode), text.tokenize, list(class_names),
        resolve_templates(templates, "templates"), num_classes_per_batch=batch_classes, device=device,
    )
    return weights.T.contiguous()

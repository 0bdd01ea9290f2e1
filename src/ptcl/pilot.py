"""Import LAMDA-PILOT experiment files (``exps/*.json``) as ptcl run configs.

LAMDA-PILOT (Sun et al., "PILOT: A Pre-Trained Model-Based Continual Learning Toolbox",
github.com/LAMDA-CL/LAMDA-PILOT) describes a run by one flat JSON dict read by its
``main.py`` / ``trainer.py``: ``model_name`` picks ``models/<name>.py`` (``utils/factory.py``),
``backbone_type`` a ViT (``utils/inc_net.py get_backbone``), ``dataset`` a
``utils/data_manager.py`` dataset, and the rest are the model's own keys.
:func:`pilot_to_ptcl` maps such a dict onto ptcl's config sections with tables, never
if/elif chains:

* :data:`DATASETS` -- PILOT dataset names to ptcl datasets (paths: ``dataset.root=...``);
* :data:`BACKBONES` -- ``backbone_type`` to a ptcl backbone; its suffix (``_adapter``,
  ``_ssf``, ``_vpt``) to the method's ``tuning`` where the method has one;
* :data:`MODELS` -- ``model_name`` to a ptcl method, the method's key table (PILOT key ->
  ptcl option, with a value converter where the vocabularies differ), the values PILOT's
  model implies (e.g. ``aper_ssf`` -> ``tuning: ssf``), the keys whose value ptcl's method
  fixes (e.g. L2P's ``embedding_key: cls``), and the keys PILOT's model never reads;
* the keys every PILOT file has (``init_cls``, ``increment``, ``shuffle``, ``seed``,
  ``memory_*``, ``prefix``, ``device``...) in :data:`COMMON`.

The PILOT data pipeline is part of the import: ``backbone.input_norm: none`` ([0, 1]
pixels), ``backbone.eval_crop_ratio: 0.875`` (Resize 256 + CenterCrop 224) and bilinear
random crops (``method.interpolation``) as ``utils/data.py build_transform``.

Nothing is dropped silently: every key that is not mapped (no ptcl counterpart, or a value
ptcl cannot honour) and every key ignored on purpose (logging only, unused by PILOT's
model, a structure ptcl's method builds itself) is named, with its reason, in ONE warning
line (:meth:`PilotImport.warning`). ``seed`` is a list in PILOT (``trainer.py`` runs one
experiment per seed); ptcl runs one seed per run: the first seed is taken and the others
are named in the warning line, to be run as ``seed=N``. An unknown ``model_name`` is a
:class:`~ptcl.errors.ConfigError` listing PILOT's model names and ptcl's methods; a PILOT
model ptcl does not have yet (iCaRL, DER, FOSTER, MEMO, Coil, DGR, DUCT) is a
:class:`~ptcl.errors.ConfigError` saying so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ptcl.config import (
    BackboneConfig,
    DatasetConfig,
    absolute_path,
    is_path_field,
    merge,
    parse_overrides,
)
from ptcl.errors import ConfigError
from ptcl.registry import METHODS as DEFAULT_METHODS
from ptcl.registry import Registry

log = logging.getLogger("ptcl.pilot")

DATASETS: dict[str, str] = {
    "cifar224": "cifar100", "cifar100": "cifar100", "cifar10": "cifar10", "imagenetr": "imagenet-r",
    "imageneta": "imagenet-a", "cub": "cub", "objectnet": "objectnet", "omnibenchmark": "omnibenchmark",
    "vtab": "vtab",
}
"""PILOT ``utils/data_manager.py _get_idata`` names -> ptcl datasets (``ptcl list datasets``).
PILOT's ``imagenet100`` / ``imagenet1000`` have no ptcl loader: give ``dataset.name=imagefolder
dataset.root=...``."""

_IN1K = "vit_base_patch16_224_in1k"  # timm 0.6's vit_base_patch16_224 (augreg_in21k_ft_in1k)
_IN21K = "vit_base_patch16_224_in21k"
BACKBONES: dict[str, str] = {
    "pretrained_vit_b16_224": _IN1K, "vit_base_patch16_224": _IN1K,
    "pretrained_vit_b16_224_in21k": _IN21K, "vit_base_patch16_224_in21k": _IN21K,
}
"""PILOT ``backbone_type`` stems (after removing a :data:`SUFFIXES` entry) -> ptcl backbones
(``ptcl.backbones.timm_models`` aliases; PILOT's own ``backbone/vit_*.py`` copies load the
same timm checkpoints)."""

SUFFIXES: dict[str, str | None] = {
    "_adapter": "adapter", "_ssf": "ssf", "_vpt": "vpt", "_l2p": None, "_dualprompt": None,
    "_coda_prompt": None, "_ease": None, "_mos": None, "_lae": None, "_memo": None,
}
"""``backbone_type`` suffixes -> the ptcl ``tuning`` they mean (``vpt``: shallow or deep from
``vpt_type``); ``None``: the method's own structure (built by ptcl's method)."""

_LOGGING = "PILOT uses it only to name the log file"
_DEVICE = "ptcl picks the device: device=auto, or device=cuda:N; several GPUs: torchrun"


# --------------------------------------------------------------------------- the import


@dataclass
class PilotImport:
    """The result of :func:`pilot_to_ptcl`: ``config`` (a ptcl config mapping for
    :func:`ptcl.config.build_config`), ``mapped`` (PILOT key -> the dotted ptcl keys it set),
    ``not_mapped`` (``"key=value (reason)"`` for every key ptcl cannot honour) and
    ``ignored`` (reason -> keys dropped on purpose)."""

    model: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    not_mapped: list[str] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)
    fields: frozenset[str] = frozenset()
    mapped: dict[str, list[str]] = field(default_factory=dict)
    current: str = ""  # the PILOT key being mapped

    def set(self, dotted: str, value: Any) -> None:
        if self.current:
            self.mapped.setdefault(self.current, []).append(dotted)
        d = self.config
        *parents, last = dotted.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value

    def get(self, dotted: str, default: Any = None) -> Any:
        d: Any = self.config
        for p in dotted.split("."):
            if not isinstance(d, dict) or p not in d:
                return default
            d = d[p]
        return d

    def ignore(self, key: str, reason: str) -> None:
        self.ignored.setdefault(reason, []).append(key)

    def reject(self, key: str, value: Any, reason: str) -> None:
        self.not_mapped.append(f"{key}={json.dumps(value)} ({reason})")

    def accounted(self) -> set[str]:
        """The PILOT keys mapped, ignored or reported as not mapped."""
        return ({k.split(" ")[0] for ks in self.ignored.values() for k in ks} | set(self.mapped)
                | {x.split("=")[0] for x in self.not_mapped})

    def warning(self) -> str | None:
        """The one warning line naming every key not mapped and every key ignored; ``None``
        when every key was mapped."""
        parts = []
        if self.not_mapped:
            parts.append("NOT mapped: " + "; ".join(self.not_mapped))
        if self.ignored:
            parts.append("ignored: " + "; ".join(f"{', '.join(k)} ({r})" for r, k in self.ignored.items()))
        return " | ".join(parts) or None


Handler = Callable[[PilotImport, str, Any, Mapping[str, Any]], None]
"""``handler(imp, key, value, data)``: maps one PILOT key (``data``: the whole file)."""


def to(target: str, convert: Mapping[Any, Any] | Callable[[Any], Any] | None = None) -> Handler:
    """A handler setting ``method.<target>`` (or the dotted ``target`` when it names a section
    or top-level key) to the value, through ``convert`` (a dict of PILOT -> ptcl values, or a
    function raising ``ValueError``) where given. A ``method.`` target the ptcl method lacks,
    or a value outside ``convert``, is reported as not mapped."""

    def handler(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
        dotted = target if "." in target or target in _TOP else f"method.{target}"
        if dotted.startswith("method.") and dotted.split(".")[1] not in imp.fields:
            imp.reject(key, value, f"ptcl's {imp.method} has no option {dotted.split('.')[1]}")
            return
        v = value
        if isinstance(convert, Mapping):
            k = v.lower() if isinstance(v, str) else v
            if k not in convert:
                imp.reject(key, value, f"ptcl's {imp.method} takes {', '.join(map(str, convert))}")
                return
            v = convert[k]
        elif convert is not None:
            try:
                v = convert(v)
            except (ValueError, TypeError) as e:
                imp.reject(key, value, str(e))
                return
        imp.set(dotted, v)

    return handler


_TOP = ("seed", "device", "eval_batch_size", "num_workers")
_LATE = ("min_lr", "pet_length", "down_sample_dim")


def ignored(reason: str) -> Handler:
    """A handler reporting the key as ignored for ``reason``."""
    return lambda imp, key, value, data: imp.ignore(key, reason)


def fixed(expected: Any, reason: str) -> Handler:
    """A key whose value ptcl's method fixes (``expected``; a tuple: any of them): ignored
    when the file agrees, not mapped when it does not."""
    allowed = expected if isinstance(expected, tuple) else (expected,)

    def handler(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
        if value in allowed:
            imp.ignore(key, f"the file's value is what ptcl's {imp.method} always does")
        else:
            imp.reject(key, value, f"ptcl's {imp.method} supports only {' or '.join(map(json.dumps, allowed))}: "
                                   f"{reason}")

    return handler


def min_lr(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    """PILOT's ``CosineAnnealingLR(eta_min=min_lr)``: ptcl's cosine anneals to 0."""
    scheduler = imp.get("method.scheduler", "cosine")
    if "scheduler" not in imp.fields:
        imp.ignore(key, f"ptcl's {imp.method} does not train")
    elif scheduler != "cosine":
        imp.ignore(key, f"unused by the {scheduler} schedule")
    elif value == 0:
        imp.ignore(key, "ptcl's cosine anneals to 0 as PILOT's with min_lr 0")
    else:
        imp.reject(key, value, "ptcl's cosine anneals to 0")


def steplr(target: str) -> Handler:
    """``init_milestones`` / ``init_lr_decay``: used by PILOT only with ``scheduler: steplr``."""

    def handler(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
        if str(data.get("scheduler", "")).lower() == "steplr":
            to(target)(imp, key, value, data)
        else:
            imp.ignore(key, "used by PILOT only with scheduler steplr")

    return handler


def prompt_param(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    """CODA-Prompt's ``prompt_param: [pool size, prompt length, ortho_mu]``."""
    if not (isinstance(value, list) and len(value) == 3):
        imp.reject(key, value, "expected [pool_size, prompt_length, ortho_mu]")
        return
    imp.set("method.pool_size", int(value[0]))
    imp.set("method.prompt_length", int(value[1]))
    imp.set("method.ortho_mu", float(value[2]))


def ranpac_projection(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    """RanPAC's ``use_RP`` (false: no random projection, ptcl ``M: 0``) and ``M``."""
    if key == "M":
        if data.get("use_RP", True):
            imp.set("method.M", value)
        else:
            imp.ignore(key, "use_RP is false")
    elif not value:
        imp.set("method.M", 0)
    else:
        imp.ignore(key, "use_RP true is ptcl's M > 0")


def vpt_key(target: str | None) -> Handler:
    """``vpt_type`` / ``prompt_token_num``: the VPT tuning's depth and tokens (``target``:
    the tuning option), unused when the tuning is not VPT."""

    def handler(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
        tuning = str(imp.get("method.tuning", ""))
        if not tuning.startswith("vpt"):
            imp.ignore(key, "used by PILOT only with VPT tuning")
        elif target is None:
            imp.ignore(key, f"gives method.tuning={tuning}")
        else:
            imp.set(f"method.tuning_options.{target}", value)

    return handler


def adapter_key(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    """``ffn_num``: the AdaptFormer bottleneck, where the tuning is an adapter."""
    if imp.get("method.tuning") == "adapter":
        imp.set("method.tuning_options.bottleneck", value)
    else:
        imp.ignore(key, "used by PILOT only with adapter tuning")


def _effective_milestones(value: Any, data: Mapping[str, Any]) -> Any:
    """Milestones at or after the last epoch never fire: the list without them."""
    epochs = data.get("epochs", data.get("init_epoch"))
    if isinstance(value, list) and isinstance(epochs, int):
        return [m for m in value if m < epochs]
    return value


def same_as(other: str, effect: Callable[[Any, Mapping[str, Any]], Any] = lambda v, d: v) -> Handler:
    """A second PILOT key that ptcl has one option for (EASE's ``later_lr`` / ``init_lr``):
    ignored when its ``effect`` equals ``other``'s, not mapped otherwise."""

    def handler(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
        if effect(value, data) == effect(data.get(other), data):
            imp.ignore(key, f"equal to {other}: one value for every task in ptcl")
        else:
            imp.reject(key, value, f"ptcl uses {other}={json.dumps(data.get(other))} for every task")

    return handler


def lae_pet_size(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    """LAE's ``pet_length`` (prefix) and ``down_sample_dim`` (adapter): sizes of one PET kind."""
    want = {"pet_length": "prefix", "down_sample_dim": "adapter"}[key]
    if imp.get("method.pet", "prefix") == want:
        imp.set(f"method.{'prefix_length' if want == 'prefix' else 'adapter_bottleneck'}", value)
    else:
        imp.ignore(key, f"used by PILOT only with pet_cls {want}")


# --------------------------------------------------------------------------- tables


_SCHEDULERS = {"cosine": "cosine", "constant": "constant", "steplr": "multistep"}
_OPTIMIZERS = {"sgd": "sgd", "adam": "adam"}

_FIRST_SESSION: dict[str, Handler] = {  # APER, RanPAC, FeCAM: PILOT trains the first task only
    "tuned_epoch": to("epochs"), "init_lr": to("lr"), "batch_size": to("batch_size"),
    "weight_decay": to("weight_decay"), "optimizer": to("optimizer", _OPTIMIZERS), "min_lr": min_lr,
    "ffn_num": adapter_key, "vpt_type": vpt_key(None), "prompt_token_num": vpt_key("num_prompts"),
}
_PROMPT_COMMON: dict[str, Handler] = {  # the timm-style prompt ports and LAE, MOS
    "tuned_epoch": to("epochs"), "init_lr": to("lr"), "batch_size": to("batch_size"),
    "weight_decay": to("weight_decay"), "optimizer": to("optimizer", _OPTIMIZERS),
    "scheduler": to("scheduler", _SCHEDULERS), "min_lr": min_lr,
    "init_milestones": steplr("milestones"), "init_lr_decay": steplr("lr_decay"),
    "reinit_optimizer": fixed(True, "a fresh optimiser every task"),
    "pretrained": to("backbone.pretrained"),
    "drop": fixed(0.0, "no dropout"), "drop_path": fixed(0.0, "no drop path"),
}
_POOL_COMMON: dict[str, Handler] = {  # L2P and DualPrompt (JH-LEE-KR ports' keys)
    "get_original_backbone": fixed(True, "queries come from the frozen pre-trained ViT"),
    "freeze": fixed((["blocks", "patch_embed", "cls_token", "norm", "pos_embed"],), "the pre-trained ViT is frozen"),
    "global_pool": fixed("token", "the CLS token"),
    "prompt_pool": fixed(True, "a prompt pool"), "prompt_key": fixed(True, "learnable keys"),
    "initializer": fixed("uniform", "U(-1, 1) prompts"), "prompt_key_init": fixed("uniform", "U(-1, 1) keys"),
    "shared_prompt_key": fixed(False, "keys are not shared"), "embedding_key": fixed("cls", "the CLS query"),
    "predefined_key": fixed("", "learned keys"),
    "pull_constraint": lambda imp, k, v, d: (imp.ignore(k, "pull_constraint_coeff gives the weight") if v
                                             else imp.set("method.pull_coeff", 0.0)),
    "pull_constraint_coeff": lambda imp, k, v, d: (to("pull_coeff")(imp, k, v, d) if d.get("pull_constraint", True)
                                                   else imp.ignore(k, "pull_constraint is false")),
}
_SLCA_COMMON: dict[str, Handler] = {
    "epochs": to("epochs"), "lrate": to("lr"), "batch_size": to("batch_size"), "weight_decay": to("weight_decay"),
    "lrate_decay": to("lr_decay"), "milestones": to("milestones"), "ca_epochs": to("ca_epochs"),
    "ca_with_logit_norm": to("ca_logit_norm"), "model_postfix": ignored(_LOGGING),
}
_REHEARSAL: dict[str, Handler] = {  # PILOT's rehearsal models: first-task (init_*) and later settings
    "init_epoch": to("init_epochs"), "init_lr": to("init_lr"), "init_weight_decay": to("init_weight_decay"),
    "init_milestones": to("init_milestones"), "init_lr_decay": to("init_lr_decay"),
    "epochs": to("epochs"), "lrate": to("lr"), "weight_decay": to("weight_decay"), "milestones": to("milestones"),
    "lrate_decay": to("lr_decay"), "batch_size": to("batch_size"), "T": to("T"),
}


@dataclass(frozen=True)
class ModelSpec:
    """How one PILOT ``model_name`` maps: the ptcl ``method``, its key ``table``, the values
    the model implies (``implies``, dotted ptcl keys) and the keys PILOT's model never reads
    (``unused``)."""

    method: str
    table: Mapping[str, Handler] = field(default_factory=dict)
    implies: Mapping[str, Any] = field(default_factory=dict)
    unused: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "simplecil": ModelSpec("simplecil", unused=(
        "tuned_epoch", "init_lr", "weight_decay", "min_lr", "optimizer", "vpt_type", "prompt_token_num",
        "batch_size")),
    "aper_adapter": ModelSpec("aper", _FIRST_SESSION, {"method.tuning": "adapter"}),
    "aper_ssf": ModelSpec("aper", _FIRST_SESSION, {"method.tuning": "ssf"}),
    "aper_vpt": ModelSpec("aper", _FIRST_SESSION, {"method.tuning": "vpt"}),
    "aper_finetune": ModelSpec("aper", _FIRST_SESSION, {"method.tuning": "finetune"}),
    "ranpac": ModelSpec("ranpac", {**_FIRST_SESSION, "optimizer": to("optimizer", {"sgd": "sgd", "adam": "adamw"}),
                                   "M": ranpac_projection, "use_RP": ranpac_projection},
                        unused=("use_simplecil",)),
    "fecam": ModelSpec("fecam", _FIRST_SESSION),
    "l2p": ModelSpec("l2p", {
        **_PROMPT_COMMON, **_POOL_COMMON, "size": to("pool_size"), "length": to("prompt_length"),
        "top_k": to("top_k"), "head_type": to("pool", {"prompt": "prompt", "token": "token"}),
        "use_prompt_mask": fixed(False, "no task mask on the pool"),
        "shared_prompt_pool": fixed(False, "one pool for every task"),
        "batchwise_prompt": lambda imp, k, v, d: (imp.set("method.batchwise_train", v),
                                                  imp.set("method.batchwise_prompt", v))},
        {"method.eval_order": "class"}),
    "dualprompt": ModelSpec("dualprompt", {
        **_PROMPT_COMMON, **_POOL_COMMON, "size": to("pool_size"), "length": to("e_length"),
        "top_k": fixed(1, "one E-prompt per image"), "head_type": fixed("token", "the CLS token"),
        "use_prompt_mask": fixed(True, "the task's E-prompt in training"),
        "use_g_prompt": lambda imp, k, v, d: (imp.ignore(k, "g_prompt_layer_idx gives the G-prompt blocks") if v
                                              else imp.set("method.g_layers", [])),
        "g_prompt_length": to("g_length"),
        "g_prompt_layer_idx": lambda imp, k, v, d: (to("g_layers")(imp, k, v, d) if d.get("use_g_prompt", True)
                                                    else imp.ignore(k, "use_g_prompt is false")),
        "use_e_prompt": fixed(True, "E-prompts"), "e_prompt_layer_idx": to("e_layers"),
        "use_prefix_tune_for_g_prompt": fixed(True, "prefix-tuning"),
        "use_prefix_tune_for_e_prompt": fixed(True, "prefix-tuning"),
        "same_key_value": fixed(False, "separate prefix keys and values"),
        "shared_prompt_pool": to("shared_prompt_pool"), "batchwise_prompt": to("batchwise_prompt")},
        {"method.eval_order": "class"}),
    "coda_prompt": ModelSpec("coda_prompt", {
        **_PROMPT_COMMON, "scheduler": to("scheduler", {**_SCHEDULERS, "cosine": "coda_cosine"}),
        "prompt_param": prompt_param}),
    "ease": ModelSpec("ease", {
        "init_epochs": to("epochs"), "later_epochs": same_as("init_epochs"), "init_lr": to("lr"),
        "later_lr": same_as("init_lr"), "batch_size": to("batch_size"), "weight_decay": to("weight_decay"),
        "optimizer": to("optimizer", _OPTIMIZERS), "scheduler": to("scheduler", _SCHEDULERS), "min_lr": min_lr,
        "pretrained": to("backbone.pretrained"), "ffn_num": to("bottleneck"), "alpha": to("alpha"),
        "recalc_sim": to("recalc_sim"), "use_diagonal": fixed(False, "sub-space similarity, no diagonal"),
        "use_init_ptm": fixed(False, "no pre-trained sub-space"), "beta": fixed(0, "no pre-trained sub-space"),
        "use_old_data": fixed(False, "no old data"), "use_reweight": fixed(True, "the alpha re-weighting"),
        "moni_adam": fixed(False, "no per-task Adam"), "adapter_num": fixed(-1, "every task's adapter")},
        unused=("vpt_type", "prompt_token_num")),
    "mos": ModelSpec("mos", {
        **_PROMPT_COMMON, "ffn_num": to("bottleneck"), "reg": to("reg"), "adapter_momentum": to("adapter_momentum"),
        "ensemble": to("ensemble"), "crct_epochs": to("ca_epochs"), "ca_lr": to("ca_lr"),
        "ca_storage_efficient_method": to("ca_storage", {"covariance": "covariance", "variance": "variance"}),
        "ca_storage_efficient_method_choices": ignored("a list of the choices, not a setting"),
        "n_centroids": lambda imp, k, v, d: (
            imp.ignore(k, "used by PILOT only with ca_storage_efficient_method multi-centroid")
            if d.get("ca_storage_efficient_method") != "multi-centroid" else imp.reject(k, v, "no multi-centroid"))},
        unused=("M",)),
    "slca": ModelSpec("slca", _SLCA_COMMON),
    "cofima": ModelSpec("cofima", {**_SLCA_COMMON, "fisher_weighting": to("fisher_weighting"),
                                   "wt_lambda": to("wt_lambda")}),
    "lae": ModelSpec("lae", {
        **_PROMPT_COMMON, "ema_decay": to("ema_decay"), "num_freeze_epochs": to("num_freeze_epochs"),
        "pet_cls": to("pet", {"prefix": "prefix", "adapter": "adapter", "lora": "lora"}),
        "pet_length": lae_pet_size, "down_sample_dim": lae_pet_size},
        {"method.offline_start": "first_task", "method.freeze_first_task": True}),
    "finetune": ModelSpec("finetune", {
        "epochs": to("epochs"), "lrate": to("lr"), "batch_size": to("batch_size"), "weight_decay": to("weight_decay"),
        "milestones": to("milestones"), "lrate_decay": to("lr_decay"), "init_epoch": same_as("epochs"),
        "init_lr": same_as("lrate"), "init_weight_decay": same_as("weight_decay"),
        "init_milestones": same_as("milestones", _effective_milestones), "init_lr_decay": same_as("lrate_decay")},
        {"method.scheduler": "multistep", "method.mask_old_logits": True}),
    # PILOT's rehearsal models: issue 15 adds them to ptcl under these names
    "icarl": ModelSpec("icarl", _REHEARSAL, {"method.loss": "ce_kd", "method.classifier": "cnn"}),
    "der": ModelSpec("der", {k: v for k, v in _REHEARSAL.items() if k != "T"}, unused=("T",)),
    "foster": ModelSpec("foster", {
        "init_epochs": to("init_epochs"), "init_lr": to("init_lr"), "init_weight_decay": to("init_weight_decay"),
        "boosting_epochs": to("epochs"), "compression_epochs": to("compression_epochs"), "lr": to("lr"),
        "batch_size": to("batch_size"), "weight_decay": to("weight_decay"), "T": to("T"), "beta1": to("beta1"),
        "beta2": to("beta2"), "oofc": to("oofc", {"ft": "ft", "az": "az"}), "lambda_okd": to("lambda_okd"),
        "is_teacher_wa": to("is_teacher_wa"), "is_student_wa": to("is_student_wa"), "wa_value": to("wa_value"),
        "num_workers": ignored("ptcl's loader workers are the top-level num_workers (auto)")}),
    "memo": ModelSpec("memo", {
        **_REHEARSAL, "scheduler": to("scheduler", _SCHEDULERS), "alpha_aux": to("alpha_aux"),
        "train_base": to("train_base"), "train_adaptive": to("train_adaptive"),
        "t_max": lambda imp, k, v, d: (imp.ignore(k, "used by PILOT only with scheduler cosine")
                                       if str(d.get("scheduler", "")).lower() != "cosine" or v is None
                                       else imp.reject(k, v, "ptcl's cosine spans the task's epochs")),
        "debug": ignored("PILOT's debug switch (a few batches)"),
        "skip": fixed(False, "trains the first task (no fine-tuned first-task checkpoint is loaded)")},
        # PILOT's Specialized_Vit keeps its block in a new attribute that timm's npz loader does not fill
        {"method.specialized_init": "random"}),
    "coil": ModelSpec("coil", {
        **_REHEARSAL, "sinkhorn": to("sinkhorn_reg"), "norm_term": to("norm_term"), "reg_term": to("reg_term"),
        "calibration_term": ignored("PILOT's models/coil.py overwrites it with the computed calibration factor "
                                    "before reading it")},
        {"method.sinkhorn_marginals": "pilot"}), "dgr": ModelSpec("dgr", {
        **{k: v for k, v in _REHEARSAL.items() if k not in ("init_milestones", "init_lr_decay", "milestones",
                                                            "lrate_decay")},
        "lambda": to("kd_lambda"), "gammar_r": to("gammar_r")}), "duct": ModelSpec("duct"),
}
"""PILOT ``model_name`` (``utils/factory.py get_model``) -> how it maps. A spec without a
table (icarl, der, ...) names the ptcl method to come; until it is registered, importing
the model raises :class:`ConfigError`."""


def _dataset(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    name = DATASETS.get(str(value).lower())
    if name is None:
        imp.reject(key, value, f"no ptcl dataset; known: {', '.join(DATASETS)}; give dataset.name=imagefolder "
                               "dataset.root=PATH")
        return
    imp.set("dataset.name", name)


def _backbone(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    name = str(value).lower()
    suffix = next((s for s in SUFFIXES if name.endswith(s)), "")
    stem = name[: len(name) - len(suffix)] if suffix else name
    if stem not in BACKBONES:
        imp.reject(key, value, f"no ptcl backbone; known: ViT-B/16 {', '.join(BACKBONES)} with "
                               f"{', '.join(SUFFIXES)}; give backbone.name=...")
        return
    imp.set("backbone.name", BACKBONES[stem])
    # no suffix: PILOT's RanPAC and FeCAM train every weight of a plain ViT in the first task
    tuning = SUFFIXES.get(suffix) or ("finetune" if imp.method in ("ranpac", "fecam") else None)
    if "tuning" not in imp.fields or tuning is None:
        return
    if tuning == "vpt":  # PILOT get_backbone: Deep unless vpt_type is shallow
        tuning = f"vpt_{str(data.get('vpt_type', 'deep')).lower()}"
    if "method.tuning" in MODELS[imp.model].implies:
        if tuning != imp.get("method.tuning"):
            imp.ignore(f"{key} suffix {suffix or '(none)'}", f"model_name {imp.model} gives the tuning")
        return
    imp.set("method.tuning", tuning)


def _seed(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    seeds = value if isinstance(value, list) else [value]
    if not seeds:
        imp.reject(key, value, "an empty seed list")
        return
    imp.set("seed", seeds[0])
    if len(seeds) > 1:
        rest = ", ".join(f"seed={s}" for s in seeds[1:])
        imp.ignore(f"seed {seeds[1:]}", f"one seed per ptcl run: this runs seed={seeds[0]}; run {rest} separately")


def _memory(imp: PilotImport, key: str, value: Any, data: Mapping[str, Any]) -> None:
    """``memory_size`` (total, ``fixed_memory: false``) / ``memory_per_class``
    (``fixed_memory: true``), as PILOT ``models/base.py`` reads them."""
    fixed_memory = bool(data.get("fixed_memory", False))
    total, per_class = data.get("memory_size", 0), data.get("memory_per_class", 0)
    used = "memory_per_class" if fixed_memory else "memory_size"
    if key == "fixed_memory" or key != used:
        imp.ignore(key, f"fixed_memory is {str(fixed_memory).lower()}: the budget is {used}")
        return
    if "fixed_memory" in imp.fields:  # a ptcl method with PILOT's three keys
        for k in ("fixed_memory", "memory_size", "memory_per_class"):
            if k in data and k in imp.fields:
                imp.set(f"method.{k}", data[k])
    elif fixed_memory and "memory_per_class" in imp.fields:
        imp.set("method.memory_per_class", per_class)
        if "memory_size" in imp.fields:
            imp.set("method.memory_size", None)
    elif not fixed_memory and "memory_size" in imp.fields:
        if total:
            imp.set("method.memory_size", total)
        elif "memory_per_class" in imp.fields:
            imp.set("method.memory_per_class", 0)
        else:
            imp.set("method.memory_size", 0)
    elif value:
        imp.reject(key, value, f"ptcl's {imp.method} keeps no exemplar memory")
    else:
        imp.ignore(key, "0: no rehearsal, as ptcl's method")


COMMON: dict[str, Handler] = {
    "model_name": lambda imp, k, v, d: imp.set("method.name", imp.method), "dataset": _dataset, "backbone_type": _backbone,
    "convnet_type": _backbone, "init_cls": to("scenario.init_cls"), "increment": to("scenario.increment"),
    "shuffle": to("scenario.shuffle"), "seed": _seed, "memory_size": _memory, "memory_per_class": _memory,
    "fixed_memory": _memory, "prefix": ignored(_LOGGING), "device": ignored(_DEVICE),
    "num_workers": to("num_workers"), "debug": ignored("PILOT's debug switch"),
}
"""The keys every PILOT file has (``trainer.py``, ``utils/data_manager.py``, ``models/base.py``)."""


# --------------------------------------------------------------------------- entry points


def pilot_to_ptcl(data: Mapping[str, Any], overrides: Sequence[str] = (),
                  methods: Registry | None = None) -> PilotImport:
    """Map a PILOT experiment dict onto a ptcl config mapping (see the module docstring).

    ``overrides``: the ``key=value`` strings the run will apply on top; a dataset or
    backbone they name replaces an unknown PILOT one. ``methods``: the registry (default
    :data:`ptcl.registry.METHODS`, filled by ``import ptcl``). Raises :class:`ConfigError`
    for a missing or unknown ``model_name`` or a PILOT model ptcl does not have yet."""
    reg = methods if methods is not None else DEFAULT_METHODS
    if not isinstance(data, Mapping):
        raise ConfigError(f"a PILOT config must be a JSON object of keys to values, got {data!r}")
    model = str(data.get("model_name", "")).lower()
    if model not in MODELS:
        raise ConfigError(f"unknown PILOT model_name {data.get('model_name')!r}; PILOT models known: "
                          f"{', '.join(MODELS)}; ptcl methods: {', '.join(reg.names())}")
    spec = MODELS[model]
    if spec.method not in reg.names():
        raise ConfigError(f"PILOT model {model!r} is not yet implemented in ptcl (method {spec.method!r}); "
                          f"ptcl methods: {', '.join(reg.names())}")
    cfg_cls = reg.get(spec.method).config_cls
    imp = PilotImport(model, spec.method, fields=frozenset(f.name for f in dataclasses.fields(cfg_cls)))
    imp.set("method.name", spec.method)
    for k, v in spec.implies.items():
        if k == "method.tuning" and v == "vpt":
            v = f"vpt_{str(data.get('vpt_type', 'deep')).lower()}"
        imp.set(k, v)
    # the PILOT data pipeline (utils/data.py build_transform; models' Resize(256) + CenterCrop)
    imp.set("backbone.input_norm", "none")
    imp.set("backbone.eval_crop_ratio", 0.875)
    if "interpolation" in imp.fields:
        imp.set("method.interpolation", "bilinear")
    given = parse_overrides(list(overrides))
    # the common keys (the backbone gives the tuning) first, keys that read other options last
    order = sorted(data, key=lambda k: (k not in COMMON, k in _LATE))
    for key in order:
        value = data[key]
        handler = spec.table.get(key) or COMMON.get(key)
        imp.current = key
        if key in spec.unused:
            imp.ignore(key, f"unused by PILOT's {model}")
        elif handler is not None:
            handler(imp, key, value, data)
        else:
            imp.reject(key, value, "no ptcl counterpart")
    imp.current = ""
    for sec, keys in (("dataset", ("dataset",)), ("backbone", ("backbone_type", "convnet_type"))):
        bad = [x for x in imp.not_mapped if x.split("=")[0] in keys]
        if isinstance(given.get(sec), dict) and "name" in given[sec]:  # the override names it
            for x in bad:
                imp.not_mapped.remove(x)
                imp.ignore(x.split("=")[0], f"replaced by the override {sec}.name")
        elif bad:
            raise ConfigError(f"PILOT {bad[0]}")
    if "name" not in imp.config.get("dataset", {}) and not (isinstance(given.get("dataset"), dict)
                                                            and "name" in given["dataset"]):
        raise ConfigError("the PILOT config names no dataset; give dataset.name=... dataset.root=...")
    return imp


def read_pilot(path: str | os.PathLike) -> tuple[Path, Any]:
    """The path and parsed JSON of a PILOT file. Raises :class:`ConfigError` for a missing
    or unparsable file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"PILOT config {p} does not exist")
    try:
        return p, json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot parse PILOT config {p}: {e}") from e


def load_pilot(path: str | os.PathLike, overrides: Sequence[str] = (), methods: Registry | None = None,
               warn: bool = True) -> dict[str, Any]:
    """Read a PILOT ``exps/*.json`` file and return the ptcl config mapping
    (:func:`pilot_to_ptcl`), logging the one warning line (``warn``). Raises
    :class:`ConfigError` for a missing or unreadable file."""
    p, data = read_pilot(path)
    imp = pilot_to_ptcl(data, overrides, methods)
    line = imp.warning()
    if warn and line:
        log.warning("PILOT config %s -> ptcl %s: %s", p.name, imp.method, line)
    return imp.config


def pilot_yaml(path: str | os.PathLike, overrides: Sequence[str] = (), methods: Registry | None = None) -> str:
    """A ptcl YAML config for the PILOT file at ``path`` (for ``ptcl import-pilot``): the
    mapped keys with ``overrides`` applied (their paths made absolute), the warning line as a
    comment on top."""
    p, data = read_pilot(path)
    imp = pilot_to_ptcl(data, overrides, methods)
    line = imp.warning()
    if line:
        log.warning("PILOT config %s -> ptcl %s: %s", p.name, imp.method, line)
    over = parse_overrides(list(overrides))
    for sec, cls in (("dataset", DatasetConfig), ("backbone", BackboneConfig)):
        for f in dataclasses.fields(cls):
            v = over.get(sec, {}).get(f.name) if isinstance(over.get(sec), dict) else None
            if is_path_field(f) and v is not None:
                over[sec][f.name] = absolute_path(v, None, f"{sec}.{f.name}")
    head = f"# imported from LAMDA-PILOT {p.name} (model_name {imp.model}) by ptcl import-pilot\n"
    if line:
        head += f"# {line}\n"
    return head + yaml.safe_dump(merge(imp.config, over), sort_keys=False)

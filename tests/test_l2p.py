"""L2P: top-N cosine key matching, batch-wise selection in training, U(-1, 1) init, sparse
prompt gradients, masked head training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fake_context
from torch.utils.data import DataLoader

from ptcl.backbones import build_backbone
from ptcl.config import BackboneConfig, build_config
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.l2p import L2P, L2PConfig


class FakeData:
    """``images_with_features`` / ``loader`` of a DataManager on random tensors."""

    def __init__(self, per_class: int = 4) -> None:
        self.per_class = per_class

    def images_with_features(self, split, classes, train_transform=False):
        g = torch.Generator().manual_seed(len(classes) + classes[0])
        return [((torch.randn(3, 32, 32, generator=g), torch.randn(32, generator=g)), c)
                for c in classes for _ in range(self.per_class)]

    def loader(self, dataset, batch_size, shuffle, seed=0, drop_last=False, shard=True):
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last)


def make(**opts) -> L2P:
    torch.manual_seed(0)
    cfg = L2PConfig(**{"epochs": 1, "batch_size": 4, **opts})
    return L2P(cfg, build_backbone(BackboneConfig(name="vit_tiny_test")), fake_context(FakeData()))


def test_defaults_follow_the_official_pytorch_code():
    cfg = build_config({"method": {"name": "l2p"}}).method
    assert (cfg.pool_size, cfg.prompt_length, cfg.top_k) == (10, 5, 5)
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.scheduler) == ("adam", 0.001875, 16, 5, "constant")
    assert cfg.pull_coeff == 0.1 and cfg.clip_grad == 1.0 and cfg.train_mask and not cfg.batchwise_prompt
    assert cfg.prompt_init == "uniform" and cfg.batchwise_train  # l2p-pytorch / PILOT: U(-1, 1), batch-wise
    with pytest.raises(ConfigError, match="top_k"):
        L2PConfig(top_k=11)


def test_selects_the_top_n_keys_by_cosine_similarity():
    learner = make()
    with torch.no_grad():
        learner.pool.keys.mul_(torch.logspace(0, 3, 10)[:, None])  # dot product != cosine ranking
    q = torch.randn(6, 32)
    expected = F.cosine_similarity(q[:, None], learner.pool.keys[None], dim=-1).argsort(1, descending=True)[:, :5]
    assert torch.equal(learner.select(q).sort(1).values, expected.sort(1).values)
    learner.cfg.batchwise_prompt = True
    idx = learner.select(q)
    assert (idx == idx[0]).all()


def test_only_selected_prompts_and_keys_receive_gradients():
    learner = make(top_k=2)
    learner.before_task(Task(0, 0, 3, 2))
    with torch.no_grad():  # every query points at keys 3 and 7
        learner.pool.keys.copy_(torch.randn(10, 32) * 0.01)
        learner.pool.keys[3] += 1.0
        learner.pool.keys[7] += 0.9
    q = torch.ones(4, 32) + 0.01 * torch.randn(4, 32)
    assert set(learner.select(q).flatten().tolist()) == {3, 7}
    feats, pull = learner.prompted_features(torch.randn(4, 3, 32, 32), q, Task(0, 0, 3, 2))
    (F.cross_entropy(learner.head(feats), torch.tensor([0, 1, 2, 0])) - 0.1 * pull).backward()
    grad_p = learner.pool.prompts.grad.flatten(1).abs().sum(1)
    grad_k = learner.pool.keys.grad.abs().sum(1)
    for g in (grad_p, grad_k):
        assert (g[[3, 7]] > 0).all()
        assert g[[0, 1, 2, 4, 5, 6, 8, 9]].eq(0).all()
    assert all(p.grad is None for p in learner.backbone.parameters())


def test_feature_is_the_mean_of_the_prompt_outputs():
    learner = make(top_k=2, prompt_length=3)
    img, q = torch.randn(2, 3, 32, 32), torch.randn(2, 32)
    with torch.no_grad():
        feats, _ = learner.prompted_features(img, q, None)
        idx = learner.select(q)
        with learner.prompting.use(tokens=learner.pool.prompts[idx].flatten(1, 2), keep_tokens=True):
            toks = learner.backbone.forward_tokens(img)
        assert toks.shape[1] == 1 + 16 + 6
        torch.testing.assert_close(feats, toks[:, 1:7].mean(1))
        plain = learner.backbone(img)  # prompts are gone again
        learner.cfg.pool = "token"
        cls, _ = learner.prompted_features(img, q, None)
    assert not torch.allclose(cls, plain) and not torch.allclose(feats, cls)


def test_train_mask_leaves_old_classes_untouched_and_backbone_frozen():
    learner = make()
    frozen = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    t0, t1 = Task(0, 0, 2, 2), Task(1, 2, 4, 2)
    learner.before_task(t0)
    learner.train_task(t0)
    learner.before_task(t1)
    old = learner.head.weight[:2].detach().clone(), learner.head.bias[:2].detach().clone()
    new = learner.head.weight[2:].detach().clone()
    learner.train_task(t1)
    assert torch.equal(learner.head.weight[:2], old[0]) and torch.equal(learner.head.bias[:2], old[1])
    assert not torch.equal(learner.head.weight[2:], new)
    assert all(torch.equal(v, frozen[k]) for k, v in learner.backbone.state_dict().items())
    with torch.no_grad():
        logits = learner.predict((torch.randn(3, 3, 32, 32), torch.randn(3, 32)))
    assert logits.shape == (3, 4) and int(learner.seen_tasks) == 2


def test_prompts_and_keys_start_uniform_in_minus_one_one():
    pool = make().pool  # default prompt_init "uniform": U(-1, 1) (l2p-pytorch, PILOT)
    for t in (pool.prompts, pool.keys):
        assert t.min() < -0.9 and t.max() > 0.9 and t.abs().max() <= 1
    for init, (lo, hi) in (("uniform01", (0.0, 1.0)), ("jax", (0.0, 0.01))):
        pool = make(prompt_init=init).pool
        for t in (pool.prompts, pool.keys):
            assert t.min() >= lo and t.max() <= hi and t.max() > 0.9 * hi


def _spread_queries() -> torch.Tensor:
    """With one-hot keys 0..9, the per-image top-2 are {0, 1}, {0, 1}, {0, 2}, {3, 4}:
    the batch's most frequent two prompts are 0 (3 times) and 1 (twice)."""
    q = torch.zeros(4, 32)
    for row, (a, b) in enumerate([(0, 1), (0, 1), (0, 2), (3, 4)]):
        q[row, a], q[row, b] = 3.0, 2.0
    return q


def test_training_selects_the_batch_majority_for_every_image():
    learner = make(top_k=2)
    learner.before_task(Task(0, 0, 3, 2))
    with torch.no_grad():
        learner.pool.keys.copy_(torch.eye(10, 32))
    q = _spread_queries()
    per_image = learner.select(q)  # test time: per image (batchwise_prompt false)
    assert [set(r) for r in per_image.tolist()] == [{0, 1}, {0, 1}, {0, 2}, {3, 4}]
    assert learner.select(q, training=True).tolist() == [[0, 1]] * 4

    def trained_prompts(learner: L2P) -> set[int]:
        learner.pool.prompts.grad = None
        feats, pull = learner.prompted_features(torch.randn(4, 3, 32, 32), q, Task(0, 0, 3, 2))
        (F.cross_entropy(learner.head(feats), torch.tensor([0, 1, 2, 0])) - 0.1 * pull).backward()
        return set(learner.pool.prompts.grad.flatten(1).abs().sum(1).nonzero().flatten().tolist())

    assert trained_prompts(learner) == {0, 1}  # every image used the batch's prompts 0 and 1
    learner.cfg.batchwise_train = False
    assert trained_prompts(learner) == {0, 1, 2, 3, 4}

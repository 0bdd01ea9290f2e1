"""CODA-Prompt: Gram-Schmidt init per task, frozen old components, alpha = cos(q*A, K), the
official per-epoch cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import fake_context, tiny_timm_vit

from ptcl.config import build_config
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.coda_prompt import CodaPrompt, CodaPromptConfig, coda_weights
from ptcl.train.callbacks import Callback


def make(depth: int = 6, **opts) -> CodaPrompt:
    bb = tiny_timm_vit(depth)
    cfg = CodaPromptConfig(**{"pool_size": 12, "epochs": 1, "batch_size": 4, **opts})
    return CodaPrompt(cfg, bb, fake_context())


TASKS = [Task(i, 2 * i, 2 * i + 2, 3) for i in range(3)]


def flat(learner: CodaPrompt, name: str, block: int, tasks: range) -> torch.Tensor:
    return torch.cat([getattr(learner.components[t], name)[block].flatten(1) for t in tasks])


def test_defaults_follow_the_official_code():
    cfg = build_config({"method": {"name": "coda_prompt"}}).method
    assert (cfg.pool_size, cfg.prompt_length, cfg.layers, cfg.ortho_mu) == (100, 8, [0, 1, 2, 3, 4], 0.0)
    assert (cfg.optimizer, cfg.lr, cfg.scheduler, cfg.epochs, cfg.batch_size) == ("adam", 0.001, "coda_cosine", 20, 128)
    assert cfg.weight_decay == 0.0 and cfg.train_mask
    with pytest.raises(ConfigError, match="even"):
        CodaPromptConfig(prompt_length=5)
    with pytest.raises(ConfigError, match="exceed"):
        make(depth=4)
    with pytest.raises(ConfigError, match="orthogonal"):
        make(pool_size=40).before_task(Task(0, 0, 2, 2))  # 40 keys in 32 dims
    with pytest.raises(ConfigError, match="smaller"):
        make(pool_size=2).before_task(TASKS[0])


def test_new_components_start_orthogonal_to_all_old_ones():
    learner = make(layers=[0, 2])
    learner.before_task(TASKS[0])
    learner.prepare_task(TASKS[0])
    assert len(learner.components) == 1 and learner.components[0].p.shape == (2, 4, 8, 32)
    for name in ("p", "k", "a"):
        rows = flat(learner, name, 0, range(1))
        torch.testing.assert_close(rows @ rows.t(), torch.eye(4), atol=1e-5, rtol=0)
    with torch.no_grad():  # "training" makes the old components arbitrary (not orthogonal)
        for p in learner.components[0].parameters():
            p.add_(torch.randn_like(p))
    for t in (1, 2):
        learner.before_task(TASKS[t])
        assert learner.components[t].k.abs().sum() == 0  # grown as zeros
        learner.prepare_task(TASKS[t])
        for name in ("p", "k", "a"):
            for j in range(2):
                old, new = flat(learner, name, j, range(t)), flat(learner, name, j, range(t, t + 1))
                assert (new @ old.t()).abs().max() < 1e-5, (name, t, j)
                torch.testing.assert_close(new @ new.t(), torch.eye(4), atol=1e-5, rtol=0)


def test_training_leaves_old_components_bit_identical():
    learner = make()
    learner.before_task(TASKS[0])
    learner.train_task(TASKS[0])
    old = {k: v.clone() for k, v in learner.components[0].state_dict().items()}
    learner.before_task(TASKS[1])
    learner.prepare_task(TASKS[1])
    init = {k: v.clone() for k, v in learner.components[1].state_dict().items()}
    assert {id(p) for p in learner.trainable()} == {id(p) for p in (*learner.components[1].parameters(),
                                                                      *learner.head.parameters())}
    learner.train_task(TASKS[1])
    for k, v in learner.components[0].state_dict().items():
        assert torch.equal(v, old[k]), k
    assert all(not torch.equal(v, init[k]) for k, v in learner.components[1].state_dict().items())
    # gradients reach only the training task's components
    learner.zero_grad(set_to_none=True)
    feats, _ = learner.prompted_features(torch.randn(2, 3, 32, 32), torch.randn(2, 32), TASKS[1])
    (feats * torch.randn_like(feats)).sum().backward()
    assert all(p.grad is None for p in learner.components[0].parameters())
    assert all(p.grad.abs().sum() > 0 for p in learner.components[1].parameters())


def test_alpha_is_the_cosine_of_attended_query_and_key():
    q = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    a = torch.tensor([[1.0, 0.0, 1.0], [2.0, 1.0, 0.5]])
    k = torch.tensor([[0.0, 1.0, 1.0], [1.0, -1.0, 2.0]])
    alpha = coda_weights(q, k, a)
    for b in range(2):
        for m in range(2):
            qa = q[b] * a[m]
            expected = float(qa @ k[m]) / float(qa.norm() * k[m].norm())
            assert alpha[b, m].item() == pytest.approx(expected, abs=1e-6)
    assert alpha[0, 0].item() == pytest.approx(-0.5)  # q*A = (1, 0, -1), K = (0, 1, 1): -1 / 2
    # the assembled prompt is sum_m alpha_m P_m, split into prefix keys / values
    learner = make(layers=[1])
    for t in TASKS[:2]:
        learner.before_task(t)
        learner.prepare_task(t)
    query = torch.randn(3, 32)
    p, kk, aa = learner.gather(None)
    assert p.shape[1] == 8  # both tasks' components at test time
    k_pre, v_pre = learner.prefixes(query, p, kk, aa)[1]
    w = F.cosine_similarity(query[:, None] * aa[0][None], kk[0][None], dim=-1)
    full = torch.einsum("bm,mld->bld", w, p[0])
    torch.testing.assert_close(k_pre, full[:, :4])
    torch.testing.assert_close(v_pre, full[:, 4:])


def test_prefixes_go_to_the_configured_blocks_only():
    learner = make(layers=[1, 3], prompt_length=4)
    learner.before_task(TASKS[0])
    learner.prepare_task(TASKS[0])
    lengths: dict[int, int] = {}
    for i, b in enumerate(learner.backbone.model.blocks):
        b.attn.qkv.register_forward_hook(lambda m, a, o, i=i: lengths.__setitem__(i, o.shape[1]))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = learner.predict((images, torch.randn(2, 32)))
        plain = learner.backbone(images)
    assert out.shape == (2, 2)
    n = 1 + 16
    assert set(lengths.values()) == {n}  # the plain forward ran last: no prefixes
    with torch.no_grad():
        learner.predict((images, torch.randn(2, 32)))
    assert lengths == {0: n, 1: n + 2, 2: n, 3: n + 2, 4: n, 5: n}
    with torch.no_grad():
        torch.testing.assert_close(learner.backbone(images), plain, rtol=0, atol=0)


def test_each_task_follows_the_official_cosine_schedule_from_the_full_lr(monkeypatch):
    """Official learners/default.py: a new optimiser and CosineSchedule per task, stepped per
    epoch: epoch e of K has lr * cos(99 pi e / (200 (K - 1)))."""
    learner = make(epochs=4, lr=0.01)
    lrs: list[float] = []

    class Spy(Callback):
        def on_epoch_start(self, state):
            lrs.append(state.optimizer.param_groups[0]["lr"])

    fit = learner.fit
    monkeypatch.setattr(learner, "fit", lambda *a, **k: fit(*a, **k, callbacks=[Spy()]))
    for t in TASKS[:2]:
        learner.before_task(t)
        learner.train_task(t)
    official = [0.01 * math.cos(99 * math.pi * e / (200 * 3)) for e in range(4)]
    assert lrs == pytest.approx(official * 2, rel=1e-12)

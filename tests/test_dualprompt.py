"""DualPrompt: G/E prefixes in their blocks, task prompts at training, key matching at test."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_timm_vit

from ptcl.config import build_config
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.dualprompt import DualPrompt, DualPromptConfig


def make(depth: int = 6, **opts) -> DualPrompt:
    bb = tiny_timm_vit(depth)
    return DualPrompt(DualPromptConfig(**opts), bb, None)  # type: ignore[arg-type]


def start(learner: DualPrompt, n: int) -> list[Task]:
    tasks = [Task(i, 2 * i, 2 * i + 2, 10) for i in range(n)]
    for t in tasks:
        learner.before_task(t)
    return tasks


def test_defaults_follow_the_official_code():
    cfg = build_config({"method": {"name": "dualprompt"}}).method
    assert (cfg.g_layers, cfg.g_length, cfg.e_layers, cfg.e_length, cfg.pool_size) == ([0, 1], 5, [2, 3, 4], 5, 10)
    assert (cfg.optimizer, cfg.batch_size, cfg.epochs, cfg.pull_coeff) == ("adam", 24, 5, 1.0)
    with pytest.raises(ConfigError, match="exceed"):
        make(depth=4, e_layers=[2, 4])
    with pytest.raises(ConfigError, match="distinct"):
        DualPromptConfig(g_layers=[1, 1])
    learner = make(pool_size=2)
    with pytest.raises(ConfigError, match="pool_size"):
        start(learner, 3)


def test_g_and_e_prefixes_go_to_the_configured_blocks():
    learner = make(g_layers=[0, 1], e_layers=[1, 3], g_length=2, e_length=3)
    start(learner, 1)
    lengths: dict[int, int] = {}
    for i, b in enumerate(learner.backbone.model.blocks):
        b.attn.qkv.register_forward_hook(lambda m, a, o, i=i: lengths.__setitem__(i, o.shape[1]))
    with torch.no_grad():
        learner.predict((torch.randn(2, 3, 32, 32), torch.randn(2, 32)))
    n = 1 + 16
    assert lengths == {0: n + 2, 1: n + 2 + 3, 2: n, 3: n + 3, 4: n, 5: n}
    lengths.clear()
    with torch.no_grad():
        learner.backbone(torch.randn(2, 3, 32, 32))  # outside the method: no prefixes
    assert set(lengths.values()) == {n}


def test_training_uses_the_task_prompt_and_pulls_its_key_only():
    learner = make()
    tasks = start(learner, 3)
    q = torch.randn(4, 32)
    feats, pull = learner.prompted_features(torch.randn(4, 3, 32, 32), q, tasks[1])
    (learner.head(feats).logsumexp(1).mean() - pull).backward()
    gp = learner.pool.prompts.grad.flatten(1).abs().sum(1)
    gk = learner.pool.keys.grad.abs().sum(1)
    assert gp[1] > 0 and gp[[0, 2]].eq(0).all() and gp[3:].eq(0).all()
    assert gk[1] > 0 and gk[[0, 2]].eq(0).all()
    assert learner.g_prompt.grad.abs().sum() > 0
    torch.testing.assert_close(pull, torch.nn.functional.cosine_similarity(q, learner.pool.keys[1][None]).mean())


def test_test_time_matching_selects_the_right_seen_task():
    learner = make()
    start(learner, 3)
    basis = torch.linalg.qr(torch.randn(32, 32)).Q.t()  # orthonormal rows
    with torch.no_grad():
        learner.pool.keys.copy_(basis[:10] * torch.arange(1, 11)[:, None])  # norms differ
    truth = torch.tensor([0, 1, 2, 2, 1, 0])
    q = 3 * learner.pool.keys[truth].detach() / truth[:, None].add(1) + 0.3 * torch.randn(6, 32)
    assert torch.equal(learner.task_index(q), truth)
    # a query matching the key of a task not started yet (5) falls back to a seen task
    q5 = learner.pool.keys[5].detach()[None] + 0.05 * learner.pool.keys[2].detach()[None]
    assert learner.task_index(q5).item() == 2


def test_new_e_prompt_starts_from_the_previous_one():
    learner = make()
    tasks = start(learner, 2)
    learner.prepare_task(tasks[1])
    assert torch.equal(learner.pool.prompts[1], learner.pool.prompts[0])
    assert not torch.equal(learner.pool.keys[1], learner.pool.keys[0])
    other = make(shared_prompt_pool=False)
    start(other, 2)
    before = other.pool.prompts[1].clone()
    other.prepare_task(tasks[1])
    assert torch.equal(other.pool.prompts[1], before)

"""DAP: key matching picks the task, task FiLM modulates generated, input-dependent prompts."""

from __future__ import annotations

import pytest
import torch
from helpers import fake_context, tiny_timm_vit

from ptcl.config import build_config
from ptcl.data.scenario import Task
from ptcl.errors import ConfigError
from ptcl.methods.dap import DAP, DAPConfig


def make(depth: int = 4, **opts) -> DAP:
    bb = tiny_timm_vit(depth)
    cfg = DAPConfig(**{"num_tokens": 3, "task_emb_dim": 4, "epochs": 1, "batch_size": 4, **opts})
    return DAP(cfg, bb, fake_context())


def start(learner: DAP, n: int) -> list[Task]:
    tasks = [Task(i, 2 * i, 2 * i + 2, 10) for i in range(n)]
    for t in tasks:
        learner.before_task(t)
    return tasks


def randomise_token_maps(learner: DAP) -> None:
    """As after the first task (the maps start at zero, prompts = FiLM beta only)."""
    with torch.no_grad():
        for g in learner.generators.values():
            g.down.weight.normal_()


def capture(learner: DAP, what: str) -> dict[int, torch.Tensor]:
    """Inputs of each generator's FiLM layer (``film``) or each generator's output (``prompts``)."""
    got: dict[int, torch.Tensor] = {}
    for i, g in learner.generators.items():
        if what == "film":
            g.film.register_forward_hook(lambda m, a, o, i=int(i): got.__setitem__(i, a[0].detach().clone()))
        else:
            g.register_forward_hook(lambda m, a, o, i=int(i): got.__setitem__(i, o.detach().clone()))
    return got


def test_defaults_follow_the_official_code():
    cfg = build_config({"method": {"name": "dap"}}).method
    assert (cfg.num_tokens, cfg.task_emb_dim, cfg.pool_size, cfg.layers, cfg.pull_coeff) == (10, 16, 10, None, 0.1)
    assert (cfg.optimizer, cfg.lr, cfg.betas, cfg.amsgrad, cfg.scheduler) == ("adam", 0.01, [0.9, 0.9], True, "constant")
    assert (cfg.epochs, cfg.batch_size, cfg.clip_grad, cfg.train_mask) == (5, 128, 1.0, True)
    with pytest.raises(ConfigError, match="exceed"):
        make(layers=[0, 4])
    with pytest.raises(ConfigError, match="pool_size"):
        start(make(pool_size=2), 3)
    learner = make()
    assert set(learner.generators) == {"0", "1", "2", "3"}  # every block by default
    g = learner.generators["0"]
    assert g.down.in_features == 1 + 16 and g.down.out_features == 3 and g.down.weight.abs().sum() == 0


def test_key_matching_picks_the_most_cosine_similar_seen_task():
    learner = make()
    start(learner, 3)
    basis = torch.linalg.qr(torch.randn(32, 32)).Q.t()
    with torch.no_grad():
        learner.keys.copy_(basis[:10] * torch.arange(1, 11)[:, None])  # norms differ: not dot products
    truth = torch.tensor([0, 1, 2, 2, 1, 0])
    q = 3 * learner.keys[truth].detach() / truth[:, None].add(1) + 0.3 * torch.randn(6, 32)
    assert torch.equal(learner.task_index(q), truth)
    q7 = learner.keys[7].detach()[None] + 0.05 * learner.keys[1].detach()[None]
    assert learner.task_index(q7).item() == 1  # task 7 is not seen yet


def test_film_of_the_matched_task_modulates_each_sample():
    learner = make(layers=[0, 2])
    tasks = start(learner, 3)
    with torch.no_grad():
        learner.keys.copy_(torch.linalg.qr(torch.randn(32, 32)).Q.t()[:10])
    truth = torch.tensor([2, 0, 1, 2])
    film_in = capture(learner, "film")
    with torch.no_grad():
        learner.predict((torch.randn(4, 3, 32, 32), learner.keys[truth] + 0.01 * torch.randn(4, 32)))
    assert set(film_in) == {0, 2}
    for x in film_in.values():
        assert torch.equal(x, learner.task_emb.weight[truth])
    # training on task 1: every sample uses task 1's embedding, whatever its query
    learner.prompted_features(torch.randn(4, 3, 32, 32), learner.keys[truth].detach(), tasks[1])
    assert torch.equal(film_in[0], learner.task_emb.weight[[1, 1, 1, 1]].detach())
    # gamma/beta: the FiLM output of that embedding, each scaled to unit norm
    prompts = capture(learner, "prompts")
    with torch.no_grad():
        learner.predict((torch.randn(4, 3, 32, 32), learner.keys[truth]))
        gamma, beta = learner.generators["0"].film(learner.task_emb.weight[truth]).chunk(2, dim=-1)
    expected = (beta / beta.norm(dim=1, keepdim=True))[:, None].expand(-1, 3, -1)  # token map still zero
    torch.testing.assert_close(prompts[0], expected)


def test_generated_prompts_depend_on_the_input_and_sit_in_the_configured_blocks():
    learner = make(layers=[0, 2])
    start(learner, 1)
    prompts = capture(learner, "prompts")
    lengths: dict[int, int] = {}
    for i, b in enumerate(learner.backbone.model.blocks):
        b.attn.qkv.register_forward_hook(lambda m, a, o, i=i: lengths.__setitem__(i, o.shape[1]))
    x, q = torch.randn(2, 3, 32, 32), torch.zeros(2, 32)
    with torch.no_grad():
        learner.predict((x, q))
    assert torch.equal(prompts[0][0], prompts[0][1])  # zero-initialised maps: FiLM beta only
    assert lengths == {0: 17 + 3, 1: 17, 2: 17 + 3, 3: 17}
    randomise_token_maps(learner)
    with torch.no_grad():
        plain = learner.backbone(x)
        out = learner.features_for(x, torch.zeros(2, dtype=torch.long))
        learner.predict((x, q))
        torch.testing.assert_close(learner.backbone(x), plain, rtol=0, atol=0)  # hooks pass through outside
    for i in (0, 2):
        assert not torch.allclose(prompts[i][0], prompts[i][1])  # two images, two prompts
    assert not torch.allclose(out, plain)


def test_token_maps_train_in_the_first_task_only():
    learner = make(layers=[1])
    tasks = start(learner, 1)
    learner.train_task(tasks[0])
    down = learner.generators["1"].down
    assert down.weight.abs().sum() > 0
    w0 = down.weight.clone()
    learner.before_task(Task(1, 2, 4, 10))
    learner.train_task(Task(1, 2, 4, 10))
    assert torch.equal(down.weight, w0)
    assert not any(p is down.weight for p in learner.trainable())


def test_task_logit_mask_keeps_the_predicted_tasks_classes():
    learner = make(task_logit_mask=True)
    start(learner, 3)
    with torch.no_grad():
        learner.keys.copy_(torch.linalg.qr(torch.randn(32, 32)).Q.t()[:10])
        logits = learner.predict((torch.randn(3, 3, 32, 32), learner.keys[[2, 0, 1]]))
    kept = logits > -1e10
    assert kept.tolist() == [[False] * 4 + [True] * 2, [True] * 2 + [False] * 4, [False] * 2 + [True] * 2 + [False] * 2]

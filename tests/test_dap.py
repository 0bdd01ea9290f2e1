"""DAP: key matching picks the task, task FiLM modulates generated, input-dependent prompts;
the official training details (logit masking, one optimiser for all tasks, head init)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FakeData, fake_context, tiny_overrides, tiny_timm_vit

from ptcl.config import build_config
from ptcl.data.scenario import Scenario, Task
from ptcl.engine.runner import run
from ptcl.errors import ConfigError
from ptcl.io import load_tensors
from ptcl.methods.base import LearnerContext
from ptcl.methods.dap import DAP, DAPConfig
from ptcl.seeding import generator


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
    assert (cfg.keep_optimizer, cfg.head_init) == (False, "default")  # ptcl's earlier results (docstring)
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


# -- official training details: masking, one optimiser for all tasks, head init --------------
def test_training_masks_every_class_outside_the_current_task():
    """Official trainer.py: outputs[:, not current task] = -inf: old rows get no gradient."""
    learner = make()
    tasks = start(learner, 2)
    seen: list[torch.Tensor] = []
    learner.head.weight.register_hook(lambda g: seen.append(g.clone()))
    learner.train_task(tasks[1])
    assert seen and all(g[:2].abs().sum() == 0 and g[2:].abs().sum() > 0 for g in seen)


def train_two_tasks(**opts) -> tuple[DAP, torch.Tensor, torch.Tensor]:
    """``(learner, old rows after task 0, old rows after task 1)`` of the head."""
    learner = make(**opts)
    tasks = [Task(i, 2 * i, 2 * i + 2, 10) for i in range(2)]
    learner.before_task(tasks[0])
    learner.train_task(tasks[0])
    w0 = learner.head.weight[:2].detach().clone()
    learner.before_task(tasks[1])
    learner.train_task(tasks[1])
    return learner, w0, learner.head.weight[:2].detach().clone()


def test_keep_optimizer_carries_the_adam_state_across_tasks():
    learner, w0, w1 = train_two_tasks()
    assert learner.optimizer_state is None and "optimizer_state" not in "".join(learner.checkpoint_state())
    assert torch.equal(w0, w1)  # a new Adam per task: old rows (zero gradient) stay put
    learner, w0, w1 = train_two_tasks(keep_optimizer=True)
    state = learner.optimizer_state.state
    # 8 images per task, batch 4, 1 epoch: 2 steps per task, counted on across the tasks
    assert float(state["head.weight"]["step"]) == 4 and float(state["keys"]["step"]) == 4
    assert state["head.weight"]["exp_avg"].shape == (4, 32)
    assert not torch.equal(w0, w1)  # the carried moments still move old rows, as in the official code
    down = [n for n in state if ".down." in n]  # token maps: trained in task 0 only, state kept
    assert down and all(float(state[n]["step"]) == 2 for n in down)


def test_keep_optimizer_state_survives_a_checkpoint():
    learner, _, _ = train_two_tasks(keep_optimizer=True)
    ckpt = learner.checkpoint_state()
    assert "optimizer_state.head.weight.exp_avg" in ckpt and "optimizer_state.keys.max_exp_avg_sq" in ckpt
    resumed = make(keep_optimizer=True)
    start(resumed, 2)  # the engine replays before_task, then loads the checkpoint
    resumed.load_checkpoint_state(ckpt)
    assert resumed.optimizer_state.state.keys() == learner.optimizer_state.state.keys()
    cold = make(keep_optimizer=True)  # the same weights without the optimiser state
    start(cold, 2)
    cold.load_checkpoint_state({k: v for k, v in ckpt.items() if not k.startswith("optimizer_state.")})
    t2 = Task(2, 4, 6, 10)
    for m in (learner, resumed, cold):
        torch.manual_seed(5)  # the new head rows
        m.before_task(t2)
        m.train_task(t2)
    for k, v in learner.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert not torch.equal(cold.head.weight, learner.head.weight)


def test_head_init_kaiming_fan_out_is_the_official_mlp_init():
    data = FakeData()
    ctx = LearnerContext(data, Scenario.build(20, 2, 2, 0), torch.device("cpu"), 0, quiet=True)
    learner = DAP(DAPConfig(num_tokens=3, task_emb_dim=4, head_init="kaiming_fan_out"), tiny_timm_vit(2), ctx)
    tasks = [Task(i, 2 * i, 2 * i + 2, 10) for i in range(2)]
    learner.before_task(tasks[0])
    w0 = learner.head.weight.detach().clone()
    learner.before_task(tasks[1])
    w, b = learner.head.weight.detach(), learner.head.bias.detach()
    assert torch.equal(w[:2], w0)  # old rows kept
    assert torch.equal(b, torch.full((4,), -math.log(99)))  # official special_bias: prior 0.01
    # N(0, 2 / fan_out) with fan_out = the 20 classes of the whole head, from the run seed
    expected = torch.randn(2, 32, generator=generator(0, "dap-head", 1)) * math.sqrt(2 / 20)
    torch.testing.assert_close(w[2:], expected)
    default = make()
    start(default, 1)
    assert default.head.bias.abs().max() <= 1 / math.sqrt(32)  # nn.Linear's init


def test_keep_optimizer_run_resumes_to_the_same_weights(tmp_path):
    """Stopped after task 2 and resumed (``--resume``), a run ends with the uninterrupted
    run's tensors, the optimiser state included."""
    over = tiny_overrides("dap", **{"method.keep_optimizer": "true", "method.epochs": 1, "method.batch_size": 8,
                                    "method.num_tokens": 2, "method.task_emb_dim": 4})
    full = run(None, over, out=tmp_path / "full", quiet=True)
    part = run(None, over, out=tmp_path / "part", quiet=True, max_tasks=2)
    assert part["tasks_done"] == 2
    resumed = run(resume=tmp_path / "part", quiet=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    last = f"checkpoints/task_{full['num_tasks'] - 1:03d}.safetensors"
    a, b = load_tensors(tmp_path / "full" / last), load_tensors(tmp_path / "part" / last)
    assert a.keys() == b.keys() and any(k.startswith("optimizer_state.") for k in a)
    for k, v in a.items():
        assert torch.equal(b[k], v), k


def test_unseen_logits_score_the_unseen_classes_initial_rows():
    ctx = LearnerContext(FakeData(), Scenario.build(10, 2, 2, 0), torch.device("cpu"), 0, quiet=True)
    opts = {"num_tokens": 3, "task_emb_dim": 4, "head_init": "kaiming_fan_out"}
    learner = DAP(DAPConfig(**opts, unseen_logits=True), tiny_timm_vit(2), ctx)
    tasks = ctx.scenario.tasks
    learner.before_task(tasks[0])
    x = (torch.randn(3, 3, 32, 32), torch.randn(3, 32))
    with torch.no_grad():
        logits = learner.predict(x)
    assert logits.shape == (3, 10) and learner.scores_unseen_classes
    # the unseen columns are exactly what the later tasks' rows will start from
    w, b = learner.unseen_head(2)
    for t in tasks[1:]:
        learner.before_task(t)
    assert torch.equal(w, learner.head.weight.detach()[2:]) and torch.equal(b, learner.head.bias.detach()[2:])
    # without the option only the seen classes are scored
    seen_only = DAP(DAPConfig(**opts), tiny_timm_vit(2), ctx)
    seen_only.before_task(tasks[0])
    assert seen_only.predict(x).shape == (3, 2) and not seen_only.scores_unseen_classes
    with pytest.raises(ConfigError, match="head_init=kaiming_fan_out"):
        DAPConfig(unseen_logits=True)


def test_the_engine_counts_an_unseen_class_prediction_as_wrong(tmp_path):
    over = tiny_overrides("dap", **{"method.epochs": 1, "method.batch_size": 8, "method.head_init": "kaiming_fan_out",
                                    "method.unseen_logits": True, "scenario.init_cls": 4, "scenario.increment": 3})
    m = run(None, over, out=tmp_path / "run", quiet=True, max_tasks=1)
    assert 0 <= m["accuracy_per_task"][0] <= 100

"""ESN: properties of the algorithm on hand-made experts and the tiny random ViT."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_learner, run_task, tiny_overrides

import ptcl
from ptcl.config import build_config
from ptcl.errors import ConfigError
from ptcl.methods.esn import (
    CANDIDATE_TEMPERATURES,
    ESN,
    ESNExpert,
    energy_alignment,
    select_temperature,
    separation_accuracy,
)

D = 32  # vit_tiny_test width
PATCHES = 16  # 32 px / patch 8


def make(tmp_path, **extra) -> tuple[ESN, object]:
    opts = {"method.epochs": 1, "method.batch_size": 4, "method.num_prompts": 3, **extra}
    return make_learner(tmp_path, "esn", opts)  # type: ignore[return-value]


def images(learner: ESN, classes, split: str = "test") -> torch.Tensor:
    ds = learner.ctx.data.images(split, classes)  # served uint8, normalised as the loaders do
    return learner.backbone.normalize(torch.stack([ds[i][0] for i in range(len(ds))]))


def test_config_defaults_and_validation():
    cfg = build_config(None, ["method.name=esn"]).method
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.scheduler) == (
        30, 0.01, 128, 0.9, 5e-4, "cosine")
    assert (cfg.lamda, cfg.anchor_energy, cfg.energy_beta, cfg.align_energy) == (0.1, -10.0, 1.0, "official")
    assert (cfg.using_prompt, cfg.num_prompts, cfg.prompt_training, cfg.mlp_ratio) == (True, 100, "every_task", 0.5)
    assert cfg.temperatures == CANDIDATE_TEMPERATURES == [0.001, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert cfg.first_temperature == 0.001
    for bad, match in [("method.temperatures=[]", "temperatures"), ("method.temperatures=[0.1,0]", "temperatures"),
                       ("method.energy_beta=0", "energy_beta"), ("method.lamda=-1", "lamda"),
                       ("method.align_energy=paper", "align_energy"), ("method.num_prompts=0", "num_prompts")]:
        with pytest.raises(ConfigError, match=match):
            build_config(None, ["method.name=esn", bad])


# -- the energy-alignment loss ---------------------------------------------------------------------
def test_energy_alignment_equals_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    beta, anchor = 2.0, -1.0

    def hand(sign: float) -> float:
        total = 0.0
        for row in logits.tolist():
            energy = -math.log(sum(math.exp(sign * beta * v) for v in row)) / beta
            total += (energy - anchor) ** 2
        return total / len(logits)

    official = energy_alignment(logits, beta, anchor, "official")  # -logsumexp(-beta f) / beta
    standard = energy_alignment(logits, beta, anchor, "standard")  # -logsumexp(+beta f) / beta
    assert official.item() == pytest.approx(hand(-1.0), rel=1e-6)
    assert standard.item() == pytest.approx(hand(+1.0), rel=1e-6)
    assert official.item() != pytest.approx(standard.item())
    # the official energy is a soft minimum of the logits: <= min f
    e = -torch.logsumexp(-beta * logits, 1) / beta
    assert bool((e <= logits.min(1).values).all())
    with pytest.raises(ValueError, match="beta"):
        energy_alignment(logits, 0.0, anchor)


def test_training_loss_is_cross_entropy_plus_lamda_times_alignment(tmp_path, monkeypatch):
    """The step's loss on a batch is CE(task-local labels) + lamda * energy_alignment."""
    import ptcl.methods.esn as esn

    learner, sc = make(tmp_path, **{"method.lamda": 0.7, "method.energy_beta": 0.5, "method.anchor_energy": -3.0})
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def fit(data, step, params, **kw):
        x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=5)))
        x = learner.backbone.normalize(x)  # served uint8: normalised as the run's loaders do
        seen.append((x, y, step(x, y).detach()))
        return [0.0]

    monkeypatch.setattr(learner, "fit", fit)
    task = sc.tasks[1]
    learner.before_task(sc.tasks[0])
    learner.before_task(task)
    learner.train_task(task)
    x, y, loss = seen[0]
    with torch.no_grad():
        logits = learner.experts["1"](learner.tokens(x))
    want = torch.nn.functional.cross_entropy(logits, y - task.start) + 0.7 * esn.energy_alignment(
        logits, 0.5, -3.0, "official")
    torch.testing.assert_close(loss, want)


# -- selection by energy ---------------------------------------------------------------------------
def directional_expert(u: torch.Tensor, scale: float) -> ESNExpert:
    """An expert whose class token is the mean of the normalised input tokens (uniform class
    attention, identity value/projection, no MLP, zero task token) and whose two classes read
    ``+u`` / ``-u``: it is confident on tokens along ``u`` and indifferent to orthogonal ones."""
    dim = len(u)
    e = ESNExpert(dim, num_heads=2, mlp_ratio=0.5, num_classes=2, temperature=1.0)
    with torch.no_grad():
        for p in e.parameters():
            p.zero_()
        e.block.norm1.weight.fill_(1.0)
        e.block.norm2.weight.fill_(1.0)
        e.block.attn.v.weight.copy_(torch.eye(dim))
        e.block.attn.proj.weight.copy_(torch.eye(dim))
        e.head.weight.copy_(scale * torch.stack([u, -u]))
    return e.eval()


def test_the_right_expert_has_the_lower_energy_and_is_selected(tmp_path, monkeypatch):
    """Two tasks whose tokens lie along orthogonal directions: each task's own expert gives
    its tokens a lower free energy than the other expert, and predict picks it."""
    learner, sc = make(tmp_path)
    for task in sc.tasks[:2]:
        learner.before_task(task)
    u0 = torch.zeros(D)
    u0[:2] = torch.tensor([1.0, -1.0])
    u1 = torch.zeros(D)
    u1[2:4] = torch.tensor([1.0, -1.0])
    for k, u in (("0", u0), ("1", u1)):
        state = directional_expert(u, 3.0).state_dict()
        state["temperature"] = torch.tensor(1.0)
        learner.experts[k].load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    n = 1 + learner.cfg.num_prompts + PATCHES

    def tokens_along(u: torch.Tensor, sign: float) -> torch.Tensor:
        return sign * u * (1 + torch.rand(4, n, 1, generator=g)) + 0.01 * torch.randn(4, n, D, generator=g)

    x = torch.cat([tokens_along(u0, 1), tokens_along(u0, -1), tokens_along(u1, 1), tokens_along(u1, -1)])
    right_expert = torch.tensor([0] * 8 + [1] * 8)
    right_class = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)
    monkeypatch.setattr(learner, "tokens", lambda t: t)  # the "images" are the token sequences
    with torch.no_grad():
        logits = learner.expert_logits(x)
    energy = torch.stack([-torch.logsumexp(lg, 1) for lg in logits], 1)  # T = 1
    rows = torch.arange(len(x))
    assert bool((energy[rows, right_expert] < energy[rows, 1 - right_expert] - 1.0).all())
    out = learner.predict(x)
    assert out.shape == (16, 4)
    finite = torch.isfinite(out)
    assert finite[:8, :2].all() and finite[8:, 2:].all() and not finite[:8, 2:].any() and not finite[8:, :2].any()
    assert out.argmax(1).tolist() == right_class.tolist()


def test_predict_selects_the_lowest_energy_expert_with_a_vote_over_distinct_temperatures(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:3]:
        learner.before_task(task)
    x = images(learner, range(6))
    learner.eval()
    with torch.no_grad():
        logits = learner.expert_logits(learner.tokens(x))

    def energy(e: int, t: float) -> torch.Tensor:  # (N,) by hand
        return torch.tensor([-t * math.log(sum(math.exp(v / t) for v in row)) for row in logits[e].double().tolist()])

    def block_of(out: torch.Tensor) -> list[int]:
        finite = torch.isfinite(out)
        assert bool((finite.sum(1) == 2).all())  # exactly one expert's two classes per row
        return (finite.float().argmax(1) // 2).tolist()

    # one temperature: the expert of lowest free energy, and its own argmax
    for e in learner.experts.values():
        e.temperature.fill_(0.5)
    want = torch.stack([energy(e, 0.5) for e in range(3)], 1).argmin(1)
    out = learner.predict(x)
    assert block_of(out) == want.tolist()
    for r, e in enumerate(want.tolist()):
        assert out[r].argmax().item() == 2 * e + logits[e][r].argmax().item()
        torch.testing.assert_close(out[r, 2 * e : 2 * e + 2], logits[e][r])
    # temperatures (0.001, 1.0, 1.0): the vote is over the set {0.001, 1.0} (official
    # set(select_temperature)), so a disagreement is a tie, won by the lower expert index
    temps = (0.001, 1.0, 1.0)
    for e, t in zip(learner.experts.values(), temps):
        e.temperature.fill_(t)
    assert learner.voting_temperatures() == pytest.approx([0.001, 1.0])
    choice = {t: torch.stack([energy(e, t) for e in range(3)], 1).argmin(1) for t in (0.001, 1.0)}
    want = torch.where(choice[0.001] == choice[1.0], choice[1.0], torch.minimum(choice[0.001], choice[1.0]))
    assert block_of(learner.predict(x)) == want.tolist()


# -- temperature selection -------------------------------------------------------------------------
def separation_example(n: int = 3) -> list[torch.Tensor]:
    """Two experts; the right one is expert 1. Rows of type A are separated for T < 0.35 / ln 2
    (~0.505), rows of type B for T > 0.035 / ln 2 (~0.0505): only T = 0.1 of (0.01, 0.1, 1.0)
    separates both."""
    a0, a1 = [2.0, 2.0], [2.35, -30.0]  # expert 1 wins iff 0.35 / T > ln 2
    b0, b1 = [1.035, -30.0], [1.0, 1.0]  # expert 1 wins iff ln 2 > 0.035 / T
    return [torch.tensor([a0] * n + [b0] * n), torch.tensor([a1] * n + [b1] * n)]


def test_temperature_selection_picks_the_best_separation_accuracy():
    logits = separation_example()
    acc = separation_accuracy(logits, 1, [0.01, 0.1, 1.0])
    torch.testing.assert_close(acc, torch.tensor([0.5, 1.0, 0.5]))
    assert select_temperature(logits, 1, [0.01, 0.1, 1.0]) == 0.1
    assert select_temperature(logits, 1, [1.0, 0.01, 0.1]) == 0.1
    assert select_temperature(logits, 1, [0.01, 1.0]) == 0.01  # a tie: the first candidate (np.argmax)
    assert select_temperature(logits, 1, [1.0, 0.01]) == 1.0
    # separating towards expert 0 instead inverts the accuracies
    torch.testing.assert_close(separation_accuracy(logits, 0, [0.01, 0.1, 1.0]), torch.tensor([0.5, 0.0, 0.5]))


def test_after_task_stores_the_selected_temperature_per_expert(tmp_path):
    cands = [0.003, 0.05, 0.7, 4.0]
    learner, sc = make(tmp_path, **{"method.temperatures": f"[{','.join(map(str, cands))}]",
                                    "method.first_temperature": 0.02})
    for task in sc.tasks[:3]:
        learner.before_task(task)
        learner.after_task(task)  # untrained experts: selection only
    assert learner.experts["0"].temperature.item() == pytest.approx(0.02)
    for task in sc.tasks[1:3]:
        x = images(learner, task.classes, "train")  # the task's train images, eval transform
        with torch.no_grad():
            logits = learner.expert_logits(learner.tokens(x))[: task.index + 1]
        want = select_temperature(logits, task.index, cands)
        assert learner.experts[str(task.index)].temperature.item() == pytest.approx(want)


def test_after_task_separates_towards_the_new_expert(tmp_path, monkeypatch):
    """With the experts' logits of :func:`separation_example` on the new task's images, the
    temperature that separates them towards the *new* expert (1) is stored: 0.1."""
    learner, sc = make(tmp_path, **{"method.temperatures": "[0.01,0.1,1.0]"})
    for task in sc.tasks[:2]:
        learner.before_task(task)
    n = len(learner.ctx.data.images("train", sc.tasks[1].classes))
    assert n % 2 == 0 and n <= learner.ctx.data.batch_size  # one batch: half type A, half type B
    monkeypatch.setattr(learner, "expert_logits", lambda toks: separation_example(len(toks) // 2))
    learner.after_task(sc.tasks[1])
    assert learner.experts["1"].temperature.item() == pytest.approx(0.1)


# -- isolation, prompt, tokens, cost ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["every_task", "first_task"])
def test_old_experts_stay_bit_identical_and_the_prompt_trains_as_configured(tmp_path, mode):
    learner, sc = make(tmp_path, **{"method.prompt_training": mode, "method.lr": 0.05})
    prompts = [learner.prompt.detach().clone()]
    states = []
    for task in sc.tasks[:3]:
        run_task(learner, task)
        prompts.append(learner.prompt.detach().clone())
        states.append({k: v.clone() for k, v in learner.experts[str(task.index)].state_dict().items()})
    for t, state in enumerate(states):  # every expert as it was after its own task
        for k, v in learner.experts[str(t)].state_dict().items():
            assert torch.equal(v, state[k]), (t, k)
    fresh, _ = make(tmp_path, **{"method.prompt_training": mode})
    fresh.before_task(sc.tasks[0])
    assert not torch.equal(fresh.experts["0"].head.weight, learner.experts["0"].head.weight)  # it trained
    assert torch.equal(fresh.experts["0"].token, learner.backbone.model.cls_token)  # starts at the CLS token
    assert not torch.equal(prompts[0], prompts[1])  # task 0 trains the prompt
    assert (mode == "every_task") == (not torch.equal(prompts[1], prompts[2]))
    assert (mode == "every_task") == (not torch.equal(prompts[2], prompts[3]))
    assert not any(p.requires_grad for p in learner.parameters())  # all frozen between tasks


def test_tokens_are_the_pre_norm_sequence_with_the_prompts_after_cls(tmp_path):
    learner, sc = make(tmp_path)
    learner.before_task(sc.tasks[0])
    x = images(learner, range(2))
    model = learner.backbone.model
    with torch.no_grad():
        toks = learner.tokens(x)
        assert toks.shape == (len(x), 1 + 3 + PATCHES, D)
        plain = learner.backbone(x)  # outside tokens() the ViT is its plain pre-trained self
    no_prompt, _ = make(tmp_path, **{"method.using_prompt": False})
    assert no_prompt.prompt is None
    with torch.no_grad():
        raw = no_prompt.tokens(x)
        assert raw.shape == (len(x), 1 + PATCHES, D)
        torch.testing.assert_close(model.norm(raw)[:, 0], plain)  # pre-norm: the final norm gives CLS
        assert not torch.allclose(raw[:, 0], plain)
        assert not torch.allclose(toks[:, 0], raw[:, 0])  # the prompts act through attention
        torch.testing.assert_close(learner.backbone(x), plain, rtol=0, atol=0)


def test_inference_cost_grows_by_one_expert_per_task(tmp_path):
    learner, sc = make(tmp_path)
    base = learner.inference_cost()["parameters"]
    costs = []
    for task in sc.tasks[:3]:
        learner.before_task(task)
        costs.append(learner.inference_cost())
    assert [c["experts_run"] for c in costs] == [1, 2, 3]
    assert [c["backbone_passes"] for c in costs] == [1, 1, 1]
    sizes = [sum(p.numel() for p in learner.experts[str(t)].parameters()) for t in range(3)]
    assert [c["parameters"] - base for c in costs] == [sum(sizes[: t + 1]) for t in range(3)]


def test_three_tasks_through_ptcl_run(tmp_path):
    over = tiny_overrides("esn", **{"method.epochs": 1, "method.batch_size": 8, "method.num_prompts": 2,
                                    "scenario.init_cls": 4, "scenario.increment": 3})
    m = ptcl.run(None, over, out=tmp_path / "run", quiet=True)
    assert m["finished"] and m["tasks_done"] == 3
    assert len(m["accuracy_per_task"]) == 3 and all(0 <= a <= 100 for a in m["accuracy_per_task"])
    assert [c["experts_run"] for c in m["inference_per_task"]] == [1, 2, 3]
    assert [c["backbone_passes"] for c in m["inference_per_task"]] == [1, 1, 1]

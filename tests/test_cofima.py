"""Property tests of CoFiMA: the per-batch diagonal Fisher, the Fisher-weighted merge of the
previous merged model with the task's trained one (and CoMA's plain average), statistics and
alignment after the merge, constant inference cost, an end-to-end run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner, run_task, tiny_overrides
from torch.utils.flop_counter import FlopCounterMode

from ptcl.config import build_config
from ptcl.data.features import extract_features
from ptcl.data.scenario import Scenario
from ptcl.engine.runner import run
from ptcl.errors import ConfigError
from ptcl.io import load_tensors
from ptcl.methods.cofima import CoFiMA, diagonal_fisher

FAST = {"method.epochs": 1, "method.batch_size": 4, "method.ca_epochs": 1, "method.ca_samples": 8,
        "method.ca_batch_size": 8}


def make(tmp_path, **opts) -> tuple[CoFiMA, Scenario]:
    return make_learner(tmp_path, "cofima", {**FAST, **opts})  # type: ignore[return-value]


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def capture_merge(learner: CoFiMA, monkeypatch) -> dict:
    """Record, at the merge, the trained state th_1, the Fisher F_1 and th_0 the learner holds."""
    seen: dict = {}
    real = learner.merge

    def spy(task, fisher):
        seen["th1"] = clone(learner.merge_operands(learner.head, task.start))
        seen["th0"] = clone(learner._previous)
        seen["f1"] = None if fisher is None else clone(fisher)
        seen["merged"] = real(task, fisher)
        seen["init"] = tuple(t.clone() for t in learner.alignment_init(task))
        return seen["merged"]

    monkeypatch.setattr(learner, "merge", spy)
    return seen


# -- the diagonal Fisher ------------------------------------------------------------------------
def test_diagonal_fisher_is_the_mean_of_squared_batch_gradients():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    unused = torch.nn.Parameter(torch.ones(2))
    batches = [(torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]

    def loss(x, y):
        return F.cross_entropy(lin(x), y)

    params = {"w": lin.weight, "b": lin.bias, "u": unused}
    got = diagonal_fisher(loss, params, batches, torch.device("cpu"))
    sq = {"w": 0, "b": 0}
    per_sample = 0
    for x, y in batches:
        lin.zero_grad()
        loss(x, y).backward()
        sq["w"] = sq["w"] + lin.weight.grad**2
        sq["b"] = sq["b"] + lin.bias.grad**2
        for i in range(len(y)):
            gw = torch.autograd.grad(loss(x[i : i + 1], y[i : i + 1]), lin.weight)[0]
            per_sample = per_sample + gw**2 / len(y)
    torch.testing.assert_close(got["w"], sq["w"] / 3)
    torch.testing.assert_close(got["b"], sq["b"] / 3)
    assert torch.equal(got["u"], torch.zeros(2))  # not reached by the loss
    assert not torch.allclose(got["w"], per_sample / 3, rtol=1e-3)  # per batch, not per sample
    cap = float(got["w"].median())
    clipped = diagonal_fisher(loss, params, batches, torch.device("cpu"), max_value=cap)
    torch.testing.assert_close(clipped["w"], (sq["w"] / 3).clamp(max=cap))
    assert lin.weight.grad is not None and not torch.equal(lin.weight.grad, torch.zeros_like(lin.weight))
    with pytest.raises(ValueError, match="no batches"):
        diagonal_fisher(loss, params, [], torch.device("cpu"))


def test_learner_fisher_is_that_of_the_trained_model_over_all_seen_classes(tmp_path, monkeypatch):
    """F_t: before the merge, per batch of the task's train loader, the squared gradient of the
    cross-entropy over every seen class's logits (old heads as trained), mean over batches."""
    learner, sc = make(tmp_path, **{"method.fisher_max": "null"})
    run_task(learner, sc.tasks[0])
    hand: dict = {}
    real = learner.compute_fisher

    def spy(task):
        assert learner._merged_head is None  # the trained model, not merged yet
        learner.train()
        names = dict(learner.backbone.named_parameters())
        learner.backbone.requires_grad_(True)
        sums: dict = {}
        n = 0
        for x, y in learner.fisher_batches(task):
            learner.zero_grad()
            F.cross_entropy(learner.head(learner.backbone(x)), y).backward()
            grads = {f"backbone.{k}": p.grad for k, p in names.items()}
            grads.update({"head.weight": learner.head.weight.grad, "head.bias": learner.head.bias.grad})
            for k, gr in grads.items():
                sums[k] = sums.get(k, 0) + gr**2
            n += 1
        learner.zero_grad()
        learner.backbone.requires_grad_(False)
        hand.update({k: v / n for k, v in sums.items()})
        hand["n"] = n
        return real(task)

    monkeypatch.setattr(learner, "compute_fisher", spy)
    seen = capture_merge(learner, monkeypatch)
    run_task(learner, sc.tasks[1])
    assert hand["n"] == 3  # 2 classes x 6 images in batches of 4
    f1 = seen["f1"]
    assert set(f1) == set(hand) - {"n"}
    for k, v in f1.items():
        torch.testing.assert_close(v, hand[k], rtol=1e-4, atol=1e-12, msg=k)
    assert f1["head.weight"][:2].abs().sum() > 0  # old classes' heads are in the loss
    for k, v in learner.fisher.as_dict().items():  # kept for the next merge
        assert torch.equal(v, f1[k]), k


# -- the merge ---------------------------------------------------------------------------------
def test_fisher_merge_equals_hand_computation(tmp_path, monkeypatch):
    learner, sc = make(tmp_path, **{"method.ca_epochs": 0})
    run_task(learner, sc.tasks[0])
    th0 = clone({**{f"backbone.{n}": p for n, p in learner.backbone.named_parameters()},
                 "head.weight": learner.aligned.weight, "head.bias": learner.aligned.bias})
    f0 = clone(learner.fisher.as_dict())
    assert set(f0) == set(th0) and f0["head.weight"].shape == (2, 32)
    head0 = learner.head.weight.detach().clone()
    seen = capture_merge(learner, monkeypatch)
    run_task(learner, sc.tasks[1])
    for k, v in th0.items():  # th_0: the state after task 0
        assert torch.equal(seen["th0"][k], v), k
    a = 0.4
    th1, f1 = seen["th1"], {k: (v[:2] if k.startswith("head.") else v) for k, v in seen["f1"].items()}
    hand = {k: ((1 - a) * (f0[k] * th0[k]) + a * (f1[k] * th1[k])) / ((1 - a) * f0[k] + a * f1[k]) for k in th0}
    plain = {k: (1 - a) * th0[k] + a * th1[k] for k in th0}
    for n, p in learner.backbone.named_parameters():
        torch.testing.assert_close(p.detach(), hand[f"backbone.{n}"], msg=n)
    assert any(not torch.allclose(hand[k], plain[k]) for k in hand), "Fisher weights must matter"
    assert any(not torch.allclose(hand[k], th1[k]) for k in hand)
    # heads: old rows merged, new rows as trained; no alignment here, so they predict
    torch.testing.assert_close(learner.aligned.weight[:2], hand["head.weight"])
    torch.testing.assert_close(learner.aligned.bias[:2], hand["head.bias"])
    assert torch.equal(learner.aligned.weight[2:], learner.head.weight[2:])
    assert torch.equal(learner.head.weight[:2], head0)  # the next task starts from the heads as trained
    # statistics of the new classes come from the merged backbone
    ds = learner.ctx.data.images("train", sc.tasks[1].classes)
    feats, labels = extract_features(learner.backbone, ds), torch.from_numpy(ds.labels)
    for c in sc.tasks[1].classes:
        torch.testing.assert_close(learner.class_means[c], feats[labels == c].mean(0), rtol=1e-4, atol=1e-5)


def test_alignment_starts_from_the_merged_heads_and_the_next_merge_from_the_aligned(tmp_path, monkeypatch):
    """With the official scale_new_head the alignment starts from [merged old heads; F_t x new
    heads]; the next task's th_0 holds the aligned heads (official prev_nets after the alignment)."""
    learner, sc = make(tmp_path, **{"method.ca_epochs": 2, "method.scale_new_head": "true"})
    run_task(learner, sc.tasks[0])
    seen = capture_merge(learner, monkeypatch)
    starts = []
    real = learner.align

    def spy(task):
        starts.append(tuple(t.detach().clone() for t in learner.alignment_init(task)))
        return real(task)

    monkeypatch.setattr(learner, "align", spy)
    run_task(learner, sc.tasks[1])
    w, b = starts[0]
    torch.testing.assert_close(w[:2], seen["merged"]["head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(b[:2], seen["merged"]["head.bias"], rtol=0, atol=0)
    torch.testing.assert_close(w[2:], seen["f1"]["head.weight"][2:] * learner.head.weight[2:], rtol=0, atol=0)
    torch.testing.assert_close(b[2:], seen["f1"]["head.bias"][2:] * learner.head.bias[2:], rtol=0, atol=0)
    assert not torch.equal(learner.aligned.weight, w)  # the alignment retrains them
    assert learner._merged_head is None and learner._previous is None  # nothing held between tasks
    aligned = learner.aligned.weight.detach().clone()
    assert not torch.equal(aligned, learner.head.weight)
    run_task(learner, sc.tasks[2])
    assert torch.equal(seen["th0"]["head.weight"], aligned)


def test_without_fisher_weighting_the_merge_is_the_plain_weighted_average(tmp_path, monkeypatch):
    learner, sc = make(tmp_path, **{"method.fisher_weighting": "false", "method.wt_lambda": 0.3,
                                    "method.ca_epochs": 0})
    assert not learner.fisher.as_dict() and not any(k.startswith("fisher.") for k in learner.state_dict())
    run_task(learner, sc.tasks[0])
    seen = capture_merge(learner, monkeypatch)
    run_task(learner, sc.tasks[1])
    assert seen["f1"] is None
    th0, th1 = seen["th0"], seen["th1"]
    for n, p in learner.backbone.named_parameters():
        k = f"backbone.{n}"
        torch.testing.assert_close(p.detach(), 0.7 * th0[k] + 0.3 * th1[k], msg=n)
    torch.testing.assert_close(learner.aligned.weight[:2], 0.7 * th0["head.weight"] + 0.3 * th1["head.weight"])


def test_frozen_backbone_merges_the_heads_only(tmp_path, monkeypatch):
    learner, sc = make(tmp_path, **{"method.backbone_lr_scale": 0, "method.ca_epochs": 0})
    assert set(learner.fisher.as_dict()) == {"head.weight", "head.bias"}
    before = clone(learner.backbone.state_dict())
    run_task(learner, sc.tasks[0])
    seen = capture_merge(learner, monkeypatch)
    run_task(learner, sc.tasks[1])
    assert all(torch.equal(v, learner.backbone.state_dict()[k]) for k, v in before.items())
    assert set(seen["merged"]) == {"head.weight", "head.bias"}
    assert torch.isfinite(learner.aligned.weight).all()


# -- cost and state ---------------------------------------------------------------------------
def test_inference_cost_is_constant_apart_from_the_head(tmp_path):
    learner, sc = make(tmp_path)
    x = learner.ctx.data.images("test", range(2))[0][0].unsqueeze(0)
    d = learner.backbone.feature_dim

    def cost():
        learner.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            learner.predict(x)
        return learner.inference_cost(), counter.get_total_flops()

    run_task(learner, sc.tasks[0])
    (c0, flops0), end0 = cost(), sc.tasks[0].end
    run_task(learner, sc.tasks[1])
    run_task(learner, sc.tasks[2])
    (c2, flops2), end2 = cost(), sc.tasks[2].end
    extra = end2 - end0
    assert c0["backbone_passes"] == c2["backbone_passes"] == 1 and c2["experts_run"] == 1
    assert c2["parameters"] - c0["parameters"] == 2 * (d + 1) * extra  # heads as trained + aligned heads
    assert flops2 - flops0 == 2 * d * extra  # one backbone pass; only the head's matmul grows
    buffers = sum(v.numel() for k, v in learner.state_dict().items() if k.startswith("fisher."))
    assert buffers == sum(p.numel() for p in learner.backbone.parameters()) + (d + 1) * end2


def test_fisher_is_checkpointed_and_restored(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    state = learner.checkpoint_state()
    assert "fisher.backbone__model__blocks__0__attn__qkv__weight" in state
    fresh, _ = make(tmp_path)
    fresh.before_task(sc.tasks[0])
    fresh.load_checkpoint_state(state)
    for k, v in learner.fisher.as_dict().items():
        assert torch.equal(fresh.fisher[k], v), k


def test_end_to_end_run(tmp_path):
    over = tiny_overrides("cofima", **{"method.epochs": 1, "method.batch_size": 8, "method.ca_epochs": 1,
                                       "method.ca_samples": 8, "method.ca_batch_size": 8,
                                       "scenario.increment": 4, "keep_all_checkpoints": "true"})
    out = run(None, over, out=tmp_path / "run", quiet=True)
    assert out["finished"] and len(out["rows"]) == 3
    params = [r["inference"]["parameters"] for r in out["rows"]]
    assert params[2] - params[1] == params[1] - params[0] == 2 * (32 + 1) * 4
    ck = load_tensors(tmp_path / "run" / "checkpoints" / "task_002.safetensors")
    assert ck["fisher.head__weight"].shape == (10, 32)
    assert not torch.equal(ck["fisher.head__weight"], torch.zeros(10, 32))


@pytest.mark.parametrize("opts", [["method.backbone_lr_scale=0", "method.merge_head=false"],
                                  ["method.scale_new_head=true", "method.merge_head=false"],
                                  ["method.scale_new_head=true", "method.fisher_weighting=false"],
                                  ["method.wt_lambda=1.5"], ["method.fisher_max=0"]])
def test_bad_config(opts):
    with pytest.raises(ConfigError):
        build_config(None, ["method.name=cofima", *opts])

"""The experts layer: merge rules on small hand-checked tensors, state checks, and the keyed
container (activation, training block, per-expert feature cache, checkpoint names)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_learner

from ptcl.experts import (
    ExpertForward,
    Experts,
    average,
    check_states,
    ema,
    ema_,
    expert_fingerprint,
    expert_name,
    fisher_average,
    task_arithmetic,
)
from ptcl.experts.ensemble import (
    free_energy,
    max_softmax,
    scatter_selected,
    select_by_energy,
    self_refined_retrieval,
    subspace_reweight,
)
from ptcl.experts.merge import FISHER_EPS


def st(**tensors: list) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


A = st(w=[[1.0, 2.0], [3.0, 4.0]], b=[0.5, -1.0])
B = st(w=[[3.0, 0.0], [1.0, 8.0]], b=[1.5, 1.0])
C = st(w=[[-1.0, 1.0], [2.0, 0.0]], b=[0.0, 3.0])


# -- merge rules ------------------------------------------------------------------------------
def test_average_plain_and_weighted():
    out = average([A, B, C])
    torch.testing.assert_close(out["w"], torch.tensor([[1.0, 1.0], [2.0, 4.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([2.0 / 3, 1.0]))
    out = average([A, B], weights=[3.0, 1.0])
    torch.testing.assert_close(out["w"], torch.tensor([[1.5, 1.5], [2.5, 5.0]]))  # (3A + B) / 4
    torch.testing.assert_close(out["b"], torch.tensor([0.75, -0.5]))
    assert average([A], weights=[2.0])["w"] is not A["w"]  # a new state
    assert torch.equal(average([A, B])["w"], torch.stack([A["w"], B["w"]]).mean(0))  # MOS's mean, bit for bit


def test_ema_pure_and_in_place():
    out = ema(A, B, 0.75)
    torch.testing.assert_close(out["w"], 0.75 * A["w"] + 0.25 * B["w"])
    torch.testing.assert_close(out["b"], torch.tensor([0.75, -0.5]))
    assert torch.equal(A["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # inputs untouched
    live = {k: v.clone().requires_grad_() for k, v in A.items()}  # like trainable parameters
    ids = {k: id(v) for k, v in live.items()}
    assert ema_(live, B, 0.75) is None
    assert {k: id(v) for k, v in live.items()} == ids
    for k in A:
        torch.testing.assert_close(live[k].detach(), out[k], rtol=0, atol=0)
    assert torch.equal(ema(A, B, 1.0)["w"], A["w"]) and torch.equal(ema(A, B, 0.0)["w"], B["w"])


@pytest.mark.parametrize("m", [0.1, 0.05, 0.3])
def test_ema_in_place_is_mos_merge_bit_for_bit(m):
    """MOS's ``A <- (1 - m) A + m mean`` as ``ema_(A, mean, 1 - m)`` gives the same float32 bits."""
    g = torch.Generator().manual_seed(0)
    a, mean = torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g)
    want = a.clone().mul_(1 - m).add_(mean, alpha=m)
    got = {"a": a.clone()}
    ema_(got, {"a": mean}, 1 - m)
    assert torch.equal(got["a"], want)


def test_fisher_average_matches_hand_computation():
    fa = st(w=[[1.0, 0.0], [4.0, 1.0]], b=[2.0, 0.0])
    fb = st(w=[[1.0, 3.0], [0.0, 1.0]], b=[1.0, 0.0])
    a = 0.4  # CoFiMA: ((1-a) F0 th0 + a F1 th1) / ((1-a) F0 + a F1)
    out = fisher_average([A, B], [fa, fb], [1 - a, a])
    for k in ("w", "b"):
        f0, f1 = fa[k] + FISHER_EPS, fb[k] + FISHER_EPS  # the eps guard
        want = ((1 - a) * f0 * A[k] + a * f1 * B[k]) / ((1 - a) * f0 + a * f1)
        torch.testing.assert_close(out[k], want)
    # where one Fisher is 0 the other model's value wins; where both are 0, the weighted average
    assert out["w"][0, 1] == pytest.approx(B["w"][0, 1].item(), abs=1e-6)
    assert out["w"][1, 0] == pytest.approx(A["w"][1, 0].item(), abs=1e-6)
    assert out["b"][1] == pytest.approx((1 - a) * -1.0 + a * 1.0)
    same = fisher_average([A, B], [fa, fa], [0.5, 0.5])  # equal Fishers: the plain average
    torch.testing.assert_close(same["w"], average([A, B])["w"])


def test_task_arithmetic():
    out = task_arithmetic(A, [B, C], scale=0.5)
    for k in A:
        torch.testing.assert_close(out[k], A[k] + 0.5 * ((B[k] - A[k]) + (C[k] - A[k])))
    torch.testing.assert_close(task_arithmetic(A, [B], 1.0)["w"], B["w"])
    assert torch.equal(task_arithmetic(A, [], 3.0)["w"], A["w"])


@pytest.mark.parametrize(
    "states, match",
    [
        ([], "no states"),
        ([A, {"w": A["w"]}], r"states\[1\] has other keys.*missing \['b'\]"),
        ([A, {**B, "extra": B["b"]}], r"unexpected \['extra'\]"),
        ([A, {**B, "w": torch.zeros(3, 2)}], r"states\[1\]\['w'\] is \(3, 2\)"),
        ([A, {**B, "w": B["w"].double()}], r"torch.float64"),
        ([{"n": torch.tensor([1, 2])}, {"n": torch.tensor([3, 4])}], "only floating-point"),
    ],
)
def test_mismatched_states_raise(states, match):
    with pytest.raises(ValueError, match=match):
        check_states(states)
    with pytest.raises(ValueError, match=match):
        average(states)


def test_every_rule_checks_its_inputs():
    bad = {**B, "w": torch.zeros(3, 2)}
    for call in (lambda: ema(A, bad, 0.5), lambda: ema_(dict(A), bad, 0.5),
                 lambda: fisher_average([A, bad], [A, A], [0.5, 0.5]), lambda: task_arithmetic(A, [bad])):
        with pytest.raises(ValueError, match=r"\['w'\]"):
            call()
    with pytest.raises(ValueError, match=r"old\['w'\]|new\['w'\]"):
        ema(A, bad, 0.5)
    with pytest.raises(ValueError, match=r"base\['w'\]|states\[0\]\['w'\]"):
        task_arithmetic(A, [bad])
    with pytest.raises(ValueError, match="alpha"):
        ema(A, B, 1.5)
    with pytest.raises(ValueError, match="weights"):
        average([A, B], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        average([A, B], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        average([A, B], weights=[-1.0, 2.0])
    with pytest.raises(ValueError, match="fishers"):
        fisher_average([A, B], [A], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"fishers\[1\]\['b'\]"):
        fisher_average([A, B], [A, {**A, "b": torch.zeros(3)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="finite and >= 0"):
        fisher_average([A, B], [A, {**A, "b": torch.tensor([-1.0, 1.0])}], [0.5, 0.5])
    with pytest.raises(ValueError, match="scale"):
        task_arithmetic(A, [B], float("nan"))


# -- the container ----------------------------------------------------------------------------
@pytest.fixture
def experts(tmp_path):
    learner, _ = make_learner(tmp_path, "simplecil")
    ex = Experts(learner.backbone, learner.ctx.data)
    g = torch.Generator().manual_seed(0)
    for key in (0, 1, "online"):
        h = ex.add(key, "adapter", bottleneck=4)
        with torch.no_grad():  # distinct, non-zero adapters (the "lora" init has zero up-weights)
            for p in h.module.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return ex


def images(ex: Experts, n: int = 5) -> torch.Tensor:
    ds = ex.data.images("test", range(2))
    return torch.stack([ds[i][0] for i in range(n)])


def test_keys_names_frozen_and_checkpoint_keys(experts):
    assert list(experts) == [0, 1, "online"] and len(experts) == 3 and 1 in experts
    assert (expert_name(0), expert_name("online")) == ("task0", "online")
    assert experts[0].name == "task0" and experts["online"].name == "online"
    assert not any(p.requires_grad for k in experts for p in experts[k].parameters())
    keys = set(experts.backbone.state_dict())
    assert any(k.startswith("model.tuning_task0.") for k in keys)
    assert any(k.startswith("model.tuning_online.") for k in keys)
    assert set(experts.parameters_of(1)) == {k.removeprefix("model.tuning_task1.") for k in keys
                                             if k.startswith("model.tuning_task1.")}
    with pytest.raises(ValueError, match="already"):
        experts.add(1, "adapter", bottleneck=4)


def test_only_and_activate_bypass_every_other_expert(experts):
    x, bb = images(experts), experts.backbone.eval()
    with torch.no_grad():
        with experts[1].disabled(), experts["online"].disabled():
            want0 = bb(x)
        with experts[0].disabled():
            want_pair = bb(x)
        with experts.only(0):
            torch.testing.assert_close(bb(x), want0, rtol=0, atol=0)
        with experts.activate([1, "online"]):
            torch.testing.assert_close(bb(x), want_pair, rtol=0, atol=0)
        torch.testing.assert_close(ExpertForward(bb, experts, [0])(x), want0, rtol=0, atol=0)
        with experts.activate([]):
            with bb.pretrained(check=False):
                plain = bb(x)
            torch.testing.assert_close(bb(x), plain, rtol=0, atol=0)
    assert all(experts[k].module.enabled for k in experts)  # restored after the blocks
    with pytest.raises(KeyError, match="no expert"):
        with experts.only(7):
            pass


def test_training_block(experts):
    with experts.training(1) as h:
        assert h is experts[1]
        assert all(p.requires_grad for p in h.parameters())
        assert not experts[0].module.enabled and not experts["online"].module.enabled
        assert experts[1].module.enabled
    assert not any(p.requires_grad for p in experts[1].parameters())
    assert all(experts[k].module.enabled for k in experts)


def test_features_are_extracted_once_per_expert_and_dropped_after_training(experts):
    cache = experts.data.cache
    f0 = experts.split_features("test", 0)
    assert experts.split_features("test", 0) is f0 and cache.misses == 1
    pos01 = torch.from_numpy(experts.data.positions("test", range(2)))
    x = images(experts, len(pos01))
    with torch.no_grad(), experts.only(0):
        torch.testing.assert_close(f0[pos01], experts.backbone.eval()(x), rtol=1e-5, atol=1e-5)
    feats, labels = experts.features("test", [1], [0, 1])
    pos = torch.from_numpy(experts.data.positions("test", [1]))
    assert torch.equal(feats, torch.cat([f0[pos], experts.split_features("test", 1)[pos]], 1))
    assert labels.tolist() == experts.data.labels("test", [1]).tolist()
    assert experts.features("test", [1])[0].shape[1] == 3 * f0.shape[1]  # all experts by default
    with experts.training(0):
        pass
    assert experts.split_features("test", 0) is not f0  # re-read (here from the disk cache)
    assert cache.hits >= 1


def test_fingerprint_is_the_weights_not_the_name(experts):
    fp = experts.fingerprint(0)
    assert fp == expert_fingerprint(experts.backbone.fingerprint(), experts[0])
    assert fp != experts.fingerprint(1)
    experts[1].load_state_dict(experts[0].state_dict())
    assert experts.fingerprint(1) == fp


# -- ensemble rules -----------------------------------------------------------------------------
def test_max_softmax_is_the_classwise_max_of_the_probabilities():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, -1.0]])
    e = torch.exp
    pa = torch.stack([e(a[0]) / e(a[0]).sum(), e(a[1]) / e(a[1]).sum()])
    pb = torch.stack([e(b[0]) / e(b[0]).sum(), e(b[1]) / e(b[1]).sum()])
    want = torch.where(pa > pb, pa, pb)
    torch.testing.assert_close(max_softmax([a, b]), want)
    assert max_softmax([a, b]).argmax(1).tolist() == [1, 0]  # row 0: b's confident class 1 wins
    with pytest.raises(ValueError, match="same classes"):
        max_softmax([a, b[:, :2]])
    with pytest.raises(ValueError, match="no experts"):
        max_softmax([])


def test_free_energy_matches_hand_computation():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    for t in (1.0, 0.5):
        want = torch.tensor([-t * math.log(math.exp(1 / t) + math.exp(2 / t)),
                             -t * math.log(math.exp(0.0) + math.exp(-1 / t))])
        torch.testing.assert_close(free_energy(x, t), want)
    with pytest.raises(ValueError, match="temperature"):
        free_energy(x, 0.0)


def test_select_by_energy_picks_the_lowest_energy_expert_and_votes_over_temperatures():
    # expert 0 scores 2 classes, expert 1 three; sample 0 is confident under expert 1,
    # sample 1 under expert 0
    e0 = torch.tensor([[0.0, 0.1], [5.0, 0.0]])
    e1 = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    sel = select_by_energy([e0, e1], [1.0])
    assert sel.tolist() == [1, 0]
    energies = torch.stack([free_energy(e0), free_energy(e1)], 1)
    assert sel.tolist() == energies.argmin(1).tolist()
    # a sample whose choice depends on the temperature: at T=0.01 the max logit decides
    # (expert 0: 1.0 > 0.9), at T=10 the many small logits of expert 1 give it the lower energy
    f0 = torch.tensor([[1.0, -50.0]])
    f1 = torch.tensor([[0.9, 0.9, 0.9]])
    assert select_by_energy([f0, f1], [0.01]).tolist() == [0]
    assert select_by_energy([f0, f1], [10.0]).tolist() == [1]
    assert select_by_energy([f0, f1], [0.01, 10.0, 10.0]).tolist() == [1]  # majority
    assert select_by_energy([f0, f1], [0.01, 0.01, 10.0]).tolist() == [0]
    assert select_by_energy([f0, f1], [0.01, 10.0]).tolist() == [0]  # a tie: the lowest index
    with pytest.raises(ValueError, match="temperature"):
        select_by_energy([f0, f1], [])


def test_scatter_selected_places_the_selected_block():
    e0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    e1 = torch.tensor([[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]])
    out = scatter_selected([e0, e1], torch.tensor([1, 0]), fill=-1.0)
    assert out.tolist() == [[-1.0, -1.0, 5.0, 6.0, 7.0], [3.0, 4.0, -1.0, -1.0, -1.0]]
    assert scatter_selected([e0, e1], torch.tensor([1, 0])).argmax(1).tolist() == [4, 1]
    with pytest.raises(ValueError, match="outside"):
        scatter_selected([e0, e1], torch.tensor([2, 0]))


# -- inference cost in metrics.json --------------------------------------------------------------
def test_metrics_report_the_inference_cost_per_task(tmp_path):
    """An ensemble (EASE: one adapter set per task) runs one more expert and backbone pass per
    task; a single model (SimpleCIL) one; the parameters counted are the learner's."""
    from helpers import tiny_overrides

    import ptcl

    got = {}
    for name in ("ease", "simplecil"):
        m = ptcl.run(None, tiny_overrides(name), out=tmp_path / name, quiet=True)
        got[name] = m["inference_per_task"]
        assert all(r["eval_s"] >= 0 for r in m["rows"])
        assert all(c["test_images"] > 0 for c in got[name])
    n = len(got["ease"])
    assert n >= 2
    assert [c["experts_run"] for c in got["ease"]] == list(range(1, n + 1))
    assert [c["backbone_passes"] for c in got["ease"]] == list(range(1, n + 1))
    assert [c["experts_run"] for c in got["simplecil"]] == [1] * n
    ease_params = [c["parameters"] for c in got["ease"]]
    assert all(b > a for a, b in zip(ease_params, ease_params[1:]))  # one adapter set more per task
    # a single model grows only by its head: SimpleCIL's 2 new prototypes of the tiny ViT's
    # 32 dims per task, while EASE adds a whole adapter set
    simple = [c["parameters"] for c in got["simplecil"]]
    assert [b - a for a, b in zip(simple, simple[1:])] == [2 * 32] * (n - 1)
    assert all(e - d > 2 * 32 for d, e in zip(ease_params, ease_params[1:]))


def test_subspace_reweight_matches_hand_computation():
    scores = torch.tensor([[[0.5, 0.1, 0.2], [0.3, 0.9, 0.0]]])  # 1 sample, 2 classes, 3 sub-spaces
    own = torch.tensor([0, 1])
    a = 0.1
    want = torch.tensor([[0.5 + a / 2 * (0.1 + 0.2), 0.9 + a / 2 * (0.3 + 0.0)]])
    torch.testing.assert_close(subspace_reweight(scores, own, a), want)
    with pytest.raises(ValueError, match="outside"):
        subspace_reweight(scores, torch.tensor([0, 3]), a)


def test_self_refined_retrieval_follows_the_predicted_task_until_stable():
    # 2 samples, 3 experts, 1-d features; class c belongs to expert c; the head is the identity
    # on one-hot class scores held in the features
    feats = torch.tensor([
        [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],  # expert 0 says class 1 -> expert 1 says 2 -> 2 says 2
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],  # expert 0 says 0: stable at once
    ])
    out = self_refined_retrieval(feats, torch.tensor([0, 0]), lambda f: f, lambda lg: lg.argmax(1), steps=5)
    assert out.argmax(1).tolist() == [2, 0]
    assert torch.equal(out[0], feats[0, 2]) and torch.equal(out[1], feats[1, 0])
    one = self_refined_retrieval(feats, torch.tensor([0, 0]), lambda f: f, lambda lg: lg.argmax(1), steps=1)
    assert torch.equal(one, feats[:, 0])  # one step: the first guess's logits

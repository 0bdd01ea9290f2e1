"""MOS: properties of the algorithm on the tiny random ViT and synthetic features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner, run_task

from ptcl.config import build_config
from ptcl.data.scenario import Scenario
from ptcl.errors import ConfigError
from ptcl.experts import average, ema_
from ptcl.methods.mos import MOS, flatten, orth_loss, unflatten

D = 32  # vit_tiny_test feature dim
L = 2  # vit_tiny_test blocks, each with an adapter


def make(tmp_path, **extra) -> tuple[MOS, Scenario]:
    opts = {"method.epochs": 2, "method.batch_size": 4, "method.lr": 0.05, "method.ca_epochs": 2, **extra}
    return make_learner(tmp_path, "mos", opts)  # type: ignore[return-value]


def test_config_defaults_and_validation():
    cfg = build_config(None, ["method.name=mos"]).method
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.bottleneck) == (20, 0.03, 48, 5e-4, 16)
    assert (cfg.adapter_momentum, cfg.reg, cfg.ensemble, cfg.ca_epochs, cfg.ca_lr) == (0.1, 0.1, True, 30, 0.005)
    assert cfg.merge == "per_step"
    with pytest.raises(ConfigError, match="adapter_momentum"):
        build_config(None, ["method.name=mos", "method.adapter_momentum=2"])
    with pytest.raises(ConfigError, match="merge"):
        build_config(None, ["method.name=mos", "method.merge=every_block"])


def test_adapter_merge_equals_the_formula_on_stored_weights(tmp_path):
    learner, sc = make(tmp_path)
    experts = learner.experts
    g = torch.Generator().manual_seed(0)
    for task in sc.tasks[:3]:
        learner.before_task(task)
        with torch.no_grad():
            for p in experts[task.index].module.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    h0, h1, h2 = (experts[k].state_dict() for k in range(3))
    ema_(experts.parameters_of(2), average([experts.parameters_of(0), experts.parameters_of(1)]), 1 - 0.1)
    for k, v in experts[2].state_dict().items():
        torch.testing.assert_close(v, 0.9 * h2[k] + 0.1 * (h0[k] + h1[k]) / 2)
        # bit for bit the update MOS made before the experts layer: A.mul_(1 - m).add_(mean, alpha=m)
        assert torch.equal(v, h2[k].clone().mul_(0.9).add_((h0[k] + h1[k]) / 2, alpha=0.1)), k
    for k, before in zip(range(2), (h0, h1)):
        assert all(torch.equal(v, before[n]) for n, v in experts[k].state_dict().items())  # stored sets untouched


def test_training_merges_continues_from_previous_adapter_and_freezes_old(tmp_path, monkeypatch):
    learner, sc = make(tmp_path)
    calls = []
    import ptcl.methods.mos as mos

    real_merge = mos.ema_
    monkeypatch.setattr(mos, "ema_", lambda old, new, a: (calls.append((bool(new), a)), real_merge(old, new, a)))
    run_task(learner, sc.tasks[0])
    assert calls == []  # first task: nothing to merge
    first = learner.experts[0].state_dict()
    run_task(learner, sc.tasks[1])
    n_steps = 2 * 3  # 2 epochs x 3 batches (12 images, batch 4)
    assert len(calls) == n_steps and all(tgt for tgt, _ in calls)  # merged with the old adapter after every step
    assert all(a == pytest.approx(0.9) for _, a in calls)
    assert all(torch.equal(v, first[k]) for k, v in learner.experts[0].state_dict().items())
    feats, _ = learner.features("test", range(4))
    assert feats.shape == (12, 2 * D)


def test_orth_loss_pushes_features_from_old_means():
    f = torch.zeros(4, 8)
    f[:, :4] = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    assert orth_loss(f, torch.zeros(0, 8)).item() == pytest.approx(
        F.cross_entropy(f @ f.T / 0.8, torch.arange(4)).item(), rel=1e-5)
    near = orth_loss(f, f[:2].clone())  # features on the old means: high loss
    far = orth_loss(f, 3 * torch.eye(8)[4:6])  # old means orthogonal to the features
    assert near > far + 0.3


def retrieval_learner(tmp_path) -> MOS:
    learner, sc = make(tmp_path)
    for task in sc.tasks[:2]:  # classes 0,1 -> task 0; 2,3 -> task 1
        learner.before_task(task)
    with torch.no_grad():
        learner.head.weight.copy_(torch.eye(4, D))  # the head reads class c from coordinate c
        learner.head.bias.zero_()
    return learner


def onehot(c: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(c), D).float()


def test_self_refined_retrieval_follows_the_predicted_task(tmp_path):
    learner = retrieval_learner(tmp_path)
    feats = torch.stack([
        torch.stack([onehot(3), onehot(2)]),  # adapter 0 says task 1; adapter 1 agrees: stop there
        torch.stack([onehot(1), onehot(3)]),  # adapter 0 says task 0: stay
        torch.stack([onehot(2), onehot(0)]),  # oscillates 0 -> 1 -> 0 -> 1: capped at 4 steps
    ])
    final = learner.retrieve(feats, torch.tensor([0, 0, 0]))
    head = learner.head
    torch.testing.assert_close(final[0], head(feats[0, 1:2])[0])
    torch.testing.assert_close(final[1], head(feats[1, 0:1])[0])
    torch.testing.assert_close(final[2], head(feats[2, 1:2])[0])  # 4th evaluation: adapter 1
    learner.cfg.refine_steps = 3
    torch.testing.assert_close(learner.retrieve(feats, torch.tensor([0, 0, 0]))[2], head(feats[2, 0:1])[0])


def test_predict_starts_from_the_prototype_task_and_ensembles(tmp_path):
    learner = retrieval_learner(tmp_path)
    learner.protos.copy_(torch.eye(4, D) + 0.5)
    x = torch.cat([onehot(2) + 0.5, onehot(2)]).unsqueeze(0)  # prototypes say class 2 (task 1)
    learner.cfg.ensemble = False
    torch.testing.assert_close(learner.predict(x), learner.head(onehot(2).unsqueeze(0)))
    learner.cfg.ensemble = True
    orig = F.normalize(x[:, :D], dim=1) @ F.normalize(learner.protos, dim=1).T
    want = F.softmax(learner.head(onehot(2).unsqueeze(0)), 1) + F.softmax(2 * orig, 1)
    torch.testing.assert_close(learner.predict(x), want)


def test_classifier_alignment_trains_on_sampled_old_class_features(tmp_path):
    learner, sc = make(tmp_path, **{"method.ca_epochs": 3, "method.ca_lr": 0.5})
    for task in sc.tasks[:2]:
        learner.before_task(task)
    centers = 5 * torch.eye(4, D)
    learner.means.copy_(centers)
    learner.covs.copy_(0.01 * torch.eye(D).expand(4, D, D))
    with torch.no_grad():
        learner.head.weight.zero_()
        learner.head.weight[2:] = torch.eye(4, D)[2:]  # knows only the new classes
        learner.head.bias.zero_()
    seen = []
    learner.head.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    learner.align_classifier(sc.tasks[1])
    x = torch.cat(seen)
    nearest = torch.cdist(x, centers).argmin(1)
    assert torch.cdist(x, centers).min(1).values.max() < 1.5  # samples lie around the class means
    counts = torch.bincount(nearest, minlength=4)
    per_class = learner.cfg.batch_size * 5 * 3
    assert counts.tolist() == [per_class] * 4  # old classes 0, 1 are sampled as often as new ones
    assert (learner.head(centers).argmax(1) == torch.arange(4)).all()  # old classes now recognised


# -- merge=official: the official code's merge timing ---------------------------------------


def record_merges(learner: MOS, monkeypatch) -> list[str]:
    """Events in order: "F" a backbone forward, "M" one merge (``ema_`` or ``ema``), "fit" /
    "/fit" the start / end of :meth:`MOS.fit`."""
    import ptcl.methods.mos as mos

    events: list[str] = []
    for name in ("ema_", "ema"):
        real = getattr(mos, name)
        monkeypatch.setattr(mos, name, lambda *a, real=real: (events.append("M"), real(*a))[1])
    learner.backbone.register_forward_pre_hook(lambda *_: events.append("F"))
    real_fit = learner.fit

    def fit(*args, **kwargs):
        events.append("fit")
        out = real_fit(*args, **kwargs)
        events.append("/fit")
        return out

    monkeypatch.setattr(learner, "fit", fit)
    return events


@pytest.mark.parametrize("merge", ["per_step", "official"])
def test_merges_per_optimiser_step_and_per_forward(tmp_path, monkeypatch, merge):
    learner, sc = make(tmp_path, **{"method.merge": merge})
    events = record_merges(learner, monkeypatch)
    run_task(learner, sc.tasks[0])
    assert "M" not in events  # task 0: nothing to merge towards
    events.clear()
    run_task(learner, sc.tasks[1])
    end = events.index("/fit")
    train, stats = events[1:end], events[end + 1 : events.index("fit", end)]
    n_steps = 2 * 3  # 2 epochs x 3 batches (12 images, batch 4)
    if merge == "per_step":
        assert train == ["F", "M"] * n_steps  # once, after the optimiser step
        assert "M" not in stats
    else:  # before each of the L blocks of every forward, then once after the step
        assert train == ["F", *["M"] * L, "M"] * n_steps
        assert stats == ["F", *["M"] * L] * 2  # 2 classes, one batch of 3 x 4 each


@pytest.mark.parametrize("merge", ["per_step", "official"])
def test_stored_adapters_drift_at_test_forwards_only_in_official_mode(tmp_path, merge):
    learner, sc = make(tmp_path, **{"method.merge": merge})
    for task in sc.tasks[:2]:
        run_task(learner, task)
    a0, a1 = (learner.experts[k].state_dict() for k in range(2))
    f1, _ = learner.features("test", range(4))  # 12 images: 3 batches of 4
    f2, _ = learner.features("test", range(4))
    b0, b1 = (learner.experts[k].state_dict() for k in range(2))
    assert all(torch.equal(v, a0[k]) for k, v in b0.items())  # adapter 0 never merges
    assert torch.equal(f1[:, :D], f2[:, :D])
    if merge == "per_step":
        assert all(torch.equal(v, a1[k]) for k, v in b1.items())
        assert torch.equal(f1, f2)
        return
    keep = 0.9 ** (L * 6)  # L merges per batch, 6 batches: A_1 -> A_0 + 0.9^(L n) (A_1 - A_0)
    for k, v in b1.items():
        torch.testing.assert_close(v, a0[k] + keep * (a1[k] - a0[k]), rtol=1e-4, atol=1e-6)
    assert not torch.equal(f1[:, D:], f2[:, D:])  # the second evaluation saw other weights: no cache


def test_official_statistics_drift_the_next_tasks_start_not_the_stored_adapter(tmp_path, monkeypatch):
    learner, sc = make(tmp_path, **{"method.merge": "official"})
    for task in sc.tasks[:2]:
        run_task(learner, task)
    experts = learner.experts
    a0, a1 = (experts.parameters_of(k) for k in range(2))
    for k in range(2):
        torch.testing.assert_close(learner.snapshots[k], flatten(experts.parameters_of(k)), rtol=0, atol=0)
    keep = 0.9 ** (L * 2)  # statistics: one batch per class, 2 classes
    want = {n: a0[n] + keep * (a1[n] - a0[n]) for n in a1}
    for n, v in unflatten(learner.carry, a1).items():
        torch.testing.assert_close(v, want[n], rtol=1e-4, atol=1e-6)
    starts = []
    real_fit = learner.fit
    monkeypatch.setattr(learner, "fit", lambda *a, **k: (starts.append(flatten(experts.parameters_of(2))),
                                                        real_fit(*a, **k))[1])
    carry = learner.carry.clone()
    run_task(learner, sc.tasks[2])
    torch.testing.assert_close(starts[0], carry, rtol=0, atol=0)  # task 2 starts from the drifted adapter


def test_official_state_round_trips(tmp_path):
    learner, sc = make(tmp_path, **{"method.merge": "official"})
    for task in sc.tasks[:2]:
        run_task(learner, task)
    learner.features("test", range(4))  # drift the stored adapter
    state = learner.checkpoint_state()
    assert {"snapshots", "carry"} <= set(state)
    fresh, _ = make(tmp_path, **{"method.merge": "official"})
    for task in sc.tasks[:2]:
        fresh.before_task(task)
    fresh.load_checkpoint_state(state)
    torch.testing.assert_close(fresh.features("test", range(4))[0], learner.features("test", range(4))[0],
                               rtol=0, atol=0)

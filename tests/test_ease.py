"""EASE: properties of the algorithm on the tiny random ViT and synthetic prototypes."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_learner, run_task

from ptcl.config import build_config
from ptcl.data.scenario import Scenario
from ptcl.errors import ConfigError
from ptcl.methods.ease import EASE, complement

D = 32  # vit_tiny_test feature dim


def make(tmp_path, **extra) -> tuple[EASE, Scenario]:
    opts = {"method.epochs": 2, "method.batch_size": 4, "method.lr": 0.05, **extra}
    return make_learner(tmp_path, "ease", opts)  # type: ignore[return-value]


def test_config_defaults_and_validation():
    cfg = build_config(None, ["method.name=ease"]).method
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.weight_decay) == (20, 0.025, 48, 5e-4)
    assert (cfg.bottleneck, cfg.alpha, cfg.recalc_sim) == (64, 0.1, True)
    with pytest.raises(ConfigError, match="alpha"):
        build_config(None, ["method.name=ease", "method.alpha=-1"])


def test_one_adapter_set_per_task_old_sets_frozen_and_subspace_features(tmp_path):
    learner, sc = make(tmp_path)
    run_task(learner, sc.tasks[0])
    first = learner.experts[0].state_dict()
    assert any(v.abs().sum() > 0 for k, v in first.items() if "up.weight" in k)  # it trained
    run_task(learner, sc.tasks[1])
    assert len(learner.experts) == 2 and list(learner.experts) == [0, 1]
    for k, v in learner.experts[0].state_dict().items():
        assert torch.equal(v, first[k]), k  # bit-identical after the next task
    second = learner.experts[1].state_dict()
    assert any(not torch.equal(second[k], first[k]) for k in first)  # a new, separate set

    feats, labels = learner.features("test", range(4))
    assert feats.shape == (12, 2 * D) and labels.tolist() == learner.ctx.data.labels("test", range(4)).tolist()
    # sub-space t = the backbone run with only adapter set t active
    ds = learner.ctx.data.images("test", range(4))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    learner.eval()
    with torch.no_grad():
        with learner.experts[1].disabled():
            f0 = learner.backbone(x)
        with learner.experts[0].disabled():
            f1 = learner.backbone(x)
    torch.testing.assert_close(feats[:, :D], f0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[:, D:], f1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(f0, f1)


def test_each_subspace_is_extracted_once(tmp_path):
    learner, sc = make(tmp_path, **{"method.epochs": 1})
    cache = learner.ctx.data.cache
    for task in sc.tasks[:2]:
        run_task(learner, task)
        learner.features("test", range(task.end))
        learner.features("test", range(task.end))
    assert cache.misses == 4  # 2 adapters x (train, test), never the old adapter again
    fresh, _ = make(tmp_path, **{"method.epochs": 1})
    for task in sc.tasks[:2]:
        fresh.before_task(task)
    fresh.load_checkpoint_state(learner.checkpoint_state())
    torch.testing.assert_close(fresh.features("test", range(4))[0], learner.features("test", range(4))[0])
    assert fresh.ctx.data.cache.hits >= 1  # served from the disk cache


def hand_complement(old_i, ref_i, ref_d):
    """The official double loop: cosine matrix, row softmax, weighted sum."""
    out = torch.zeros(len(old_i), ref_d.shape[1], dtype=torch.float64)
    for a in range(len(old_i)):
        sims = [float(torch.cosine_similarity(old_i[a], ref_i[b], dim=0)) for b in range(len(ref_i))]
        z = sum(math.exp(s) for s in sims)
        for b in range(len(ref_i)):
            out[a] += math.exp(sims[b]) / z * ref_d[b].double()
    return out.float()


def test_complement_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    old_i, ref_i, ref_d = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    torch.testing.assert_close(complement(old_i, ref_i, ref_d), hand_complement(old_i, ref_i, ref_d))


@pytest.mark.parametrize("recalc", [True, False])
def test_after_task_fills_real_and_synthesised_prototypes(tmp_path, recalc):
    learner, sc = make(tmp_path, **{"method.recalc_sim": recalc})
    g = torch.Generator().manual_seed(1)
    fake = {(s, c): torch.randn(3, D, generator=g) for s in range(3) for c in range(6)}

    def features(split, classes, keys):  # synthetic per-sub-space train features, 3 samples per class
        (s,) = keys
        assert split == "train"
        return torch.cat([fake[s, c] for c in classes]), torch.tensor(classes).repeat_interleave(3)

    learner.experts.features = features
    history = []
    for task in sc.tasks[:3]:
        learner.before_task(task)
        learner.after_task(task)
        history.append(learner.protos.clone())
    p = learner.protos
    real = {(c, s): fake[s, c].mean(0) for c in range(6) for s in range(3) if s <= c // 2}  # own + earlier sub-spaces
    for (c, s), v in real.items():
        torch.testing.assert_close(p[c, s], v)
    cls = {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    for i, d in [(0, 1), (0, 2), (1, 2)]:
        if not recalc and d == 1:  # filled at task 1 from task 1's classes, kept since
            ref = cls[1]
        else:
            ref = [c for t in range(d, 3) for c in cls[t]]
        want = hand_complement(torch.stack([real[c, i] for c in cls[i]]),
                               torch.stack([real[r, i] for r in ref]), torch.stack([real[r, d] for r in ref]))
        torch.testing.assert_close(p[cls[i], d], want, rtol=1e-5, atol=1e-6)
    # with recalc the (task 0, sub-space 1) prototypes change at task 2 (more reference classes)
    assert recalc != torch.allclose(history[1][:2, 1], history[2][:2, 1])


def test_predict_is_the_reweighted_per_subspace_cosine(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:3]:
        learner.before_task(task)
    g = torch.Generator().manual_seed(2)
    learner.protos.copy_(torch.randn(6, 3, D, generator=g))
    x = torch.randn(5, 3 * D, generator=g)
    logits = learner.predict(x)
    alpha = learner.cfg.alpha
    for b in range(5):
        for c in range(6):
            want = 0.0
            for s in range(3):
                cos = float(torch.cosine_similarity(x[b, s * D : (s + 1) * D], learner.protos[c, s], dim=0))
                want += cos * (1.0 if s == c // 2 else alpha / 2)
            assert logits[b, c].item() == pytest.approx(want, abs=1e-5)


def test_head_scale_option(tmp_path, monkeypatch):
    import ptcl.methods.ease as ease

    seen: list[float] = []
    real = ease.temporary_head
    monkeypatch.setattr(ease, "temporary_head", lambda d, n, s: seen.append(s) or real(d, n, s))
    learner, sc = make(tmp_path, **{"method.head_scale": 5.0})
    run_task(learner, sc.tasks[0])
    assert seen == [5.0]
    assert build_config(None, ["method.name=ease"]).method.head_scale == 1.0
    with pytest.raises(ConfigError, match="head_scale"):
        build_config(None, ["method.name=ease", "method.head_scale=-2"])

"""LAE (ptcl.methods.lae): online/offline PET, per-step EMA, frozen calibration epochs, max-softmax."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import make_learner, run_task, tiny_overrides
from torch.utils.data import DataLoader

from ptcl.config import build_config
from ptcl.engine.evaluate import eval_dataset
from ptcl.engine.runner import run, seed_everything
from ptcl.errors import ConfigError
from ptcl.peft import AdapterSet, disabled
from ptcl.train import Callback

FAST = {"method.pet_blocks": [0, 1], "method.epochs": 2, "method.batch_size": 4, "method.num_freeze_epochs": 1}
ADAPTER_OPTIONS = "site" in inspect.signature(AdapterSet.__init__).parameters


def make(tmp_path, **extra):
    return make_learner(tmp_path, "lae", {**FAST, **{f"method.{k}": v for k, v in extra.items()}})


class Recorder(Callback):
    """Snapshots of the online and offline PET and the head: at the start, after every step
    (after the learner's own callbacks: the EMA) and after every epoch."""

    def __init__(self, learner) -> None:
        self.learner = learner
        self.start, self.steps, self.epochs = None, [], []

    def snap(self) -> dict[str, dict[str, torch.Tensor]]:
        ex = self.learner.experts
        return {
            **{k: {n: p.detach().clone() for n, p in ex.parameters_of(k).items()} for k in ("online", "offline")},
            "head": {"weight": self.learner.head.weight.detach().clone()},
        }

    def on_epoch_start(self, state) -> None:
        if state.epoch == 0:
            self.start = self.snap()

    def after_step(self, state) -> None:
        self.steps.append(self.snap())

    def on_epoch_end(self, state) -> None:
        self.epochs.append(self.snap())


@pytest.fixture
def record(monkeypatch):
    """``record(learner)`` -> a list that gets one :class:`Recorder` per ``fit`` of the learner."""
    recs: list[Recorder] = []

    def start(learner):
        fit = learner.fit

        def recorded_fit(*args, callbacks=(), **kwargs):
            recs.append(Recorder(learner))
            return fit(*args, callbacks=[*callbacks, recs[-1]], **kwargs)

        monkeypatch.setattr(learner, "fit", recorded_fit)
        return recs

    return start


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def images(learner, classes: int, n: int) -> torch.Tensor:
    return next(iter(DataLoader(eval_dataset(learner, range(classes)), batch_size=n)))[0]


@pytest.mark.parametrize("pet", ["prefix", "lora"])
def test_offline_moves_by_one_minus_alpha_towards_online_every_step(pet, tmp_path, record):
    alpha = 0.8
    learner, sc = make(tmp_path, pet=pet, ema_decay=alpha, num_freeze_epochs=0)
    recs = record(learner)
    run_task(learner, sc.tasks[0])
    t0 = recs[0]
    assert all(same(s["offline"], t0.start["offline"]) for s in t0.steps)  # official: no offline in task 0
    assert not same(t0.steps[-1]["online"], t0.start["online"])
    run_task(learner, sc.tasks[1])
    t1 = recs[1]
    assert same(t1.start["offline"], t0.steps[-1]["online"])  # a copy of the online module when task 1 starts
    prev = t1.start["offline"]
    assert len(t1.steps) == 6  # 2 epochs x 12 images / batch 4
    for s in t1.steps:
        for name, new in s["offline"].items():
            torch.testing.assert_close(new - prev[name], (1 - alpha) * (s["online"][name] - prev[name]),
                                       rtol=1e-5, atol=1e-7)
        assert not same(s["offline"], prev)
        prev = s["offline"]
    gap = max(float((s["online"][n] - s["offline"][n]).abs().max()) for s in t1.steps[-1:] for n in s["online"])
    assert gap > 1e-4  # the pair diverges
    live = learner.experts.parameters_of("offline")
    assert same({n: p.detach() for n, p in live.items()}, t1.steps[-1]["offline"])


def test_pet_is_frozen_in_the_first_epochs_of_later_tasks_only(tmp_path, record):
    learner, sc = make(tmp_path, epochs=3, num_freeze_epochs=2, ema_decay=0.5)
    recs = record(learner)
    for task in sc.tasks[:3]:
        run_task(learner, task)
    assert not same(recs[0].epochs[0]["online"], recs[0].start["online"])  # task 0 trains it from epoch 0
    for t in (1, 2):
        r = recs[t]
        for e in (0, 1):  # only the head trains
            before = r.epochs[e - 1] if e else r.start
            assert same(r.epochs[e]["online"], r.start["online"])
            assert not same(r.epochs[e]["head"], before["head"])
            # the offline module follows the frozen online one: it starts as its copy in task 1
            assert same(r.epochs[e]["offline"], before["offline"]) == (t == 1)
        assert not same(r.epochs[2]["online"], r.epochs[1]["online"])
    assert all(p.requires_grad is False for p in learner.experts.parameters_of("online").values())


def test_pilot_options_freeze_the_first_task_and_start_the_offline_module_at_once(tmp_path, record):
    learner, sc = make(tmp_path, freeze_first_task=True, offline_start="first_task", ema_decay=0.5)
    recs = record(learner)
    run_task(learner, sc.tasks[0])
    t0 = recs[0]
    assert same(t0.start["offline"], t0.start["online"])  # a copy of the initial module
    assert same(t0.epochs[0]["online"], t0.start["online"])  # frozen in epoch 0 of the first task
    assert not same(t0.epochs[1]["online"], t0.start["online"])
    assert not same(t0.steps[-1]["offline"], t0.start["offline"])  # EMA from the first step
    assert learner.inference_keys() == ["online", "offline"]
    assert learner.inference_cost()["backbone_passes"] == 2


def test_prediction_is_the_max_of_the_two_softmaxes(tmp_path):
    learner, sc = make(tmp_path, ema_decay=0.5, num_freeze_epochs=0)
    x = images(learner, 4, 6)
    run_task(learner, sc.tasks[0])
    learner.eval()
    with torch.no_grad(), learner.experts.only("online"):
        only_online = learner.head(learner.backbone(x)).softmax(1)
    with torch.no_grad():
        torch.testing.assert_close(learner.predict(x), only_online, rtol=0, atol=0)  # task 0: online only
    assert learner.inference_cost()["experts_run"] == 1
    run_task(learner, sc.tasks[1])
    learner.eval()
    with torch.no_grad():
        by_hand = {}
        for key in ("online", "offline"):
            with learner.experts.only(key):
                by_hand[key] = torch.softmax(learner.head(learner.backbone(x)), dim=1)
        expected = torch.where(by_hand["online"] >= by_hand["offline"], by_hand["online"], by_hand["offline"])
        got = learner.predict(x)
    assert got.shape == (6, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (by_hand["offline"] > by_hand["online"]).any() and (by_hand["online"] > by_hand["offline"]).any()
    assert learner.inference_cost()["backbone_passes"] == learner.inference_cost()["experts_run"] == 2
    for mode in ("online", "offline"):
        learner.cfg.inference = mode
        with torch.no_grad():
            torch.testing.assert_close(learner.predict(x), by_hand[mode], rtol=0, atol=0)
        assert learner.inference_cost()["backbone_passes"] == 1


@pytest.mark.parametrize("pet", ["lora", "prefix"])
def test_attached_pet_and_head_init(pet, tmp_path):
    learner, sc = make(tmp_path, pet=pet)
    seed_everything(0)
    learner.before_task(sc.tasks[0])
    x = images(learner, 2, 4)
    learner.eval()
    with torch.no_grad():
        with learner.experts.only("online"):
            on = learner.backbone(x)
        with disabled(learner.backbone):
            plain = learner.backbone(x)
    assert torch.equal(on, plain) == (pet == "lora")  # LoRA's B = 0; LAE's prefixes start non-zero
    assert learner.head.weight.std() < 0.002 and torch.equal(learner.head.bias, torch.zeros(2))  # N(0, 0.001^2)
    names = set(learner.checkpoint_state())
    assert any(k.startswith("backbone.model.tuning_online.") for k in names)
    assert any(k.startswith("backbone.model.tuning_offline.") for k in names)


def test_three_task_run_end_to_end(tmp_path):
    over = tiny_overrides("lae", **FAST, **{"method.pet": "lora", "scenario.init_cls": 4, "scenario.increment": 3})
    result = run(None, over, out=tmp_path / "run", quiet=True)
    assert result["finished"] and result["tasks_done"] == 3  # 10 classes: 4 + 3 + 3
    cost = [r["inference"] for r in result["rows"]]
    assert [c["backbone_passes"] for c in cost] == [1, 2, 2] and [c["experts_run"] for c in cost] == [1, 2, 2]
    assert len(result["accuracy_matrix"]) == 3


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="pet_blocks"):
        make(tmp_path, pet_blocks=[0, 1, 2, 3, 4])  # the tiny ViT has 2 blocks
    with pytest.raises(ConfigError, match="distinct"):
        build_config(None, tiny_overrides("lae", **{"method.pet_blocks": [1, 1]}))
    with pytest.raises(ConfigError, match="ema_decay"):
        build_config(None, tiny_overrides("lae", **{"method.ema_decay": 1.5}))
    if not ADAPTER_OPTIONS:
        with pytest.raises(ConfigError, match="pet=adapter"):
            build_config(None, tiny_overrides("lae", **{"method.pet": "adapter"}))


@pytest.mark.skipif(not ADAPTER_OPTIONS, reason="ptcl.peft.adapter lacks LAE's options (site, activation, ...)")
def test_adapter_variant_is_lae_adapter(tmp_path, record):
    learner, sc = make(tmp_path, pet="adapter", ema_decay=0.5)
    seed_everything(0)
    learner.before_task(sc.tasks[0])
    ad = learner.experts["online"].module
    assert ad.site == "attn" and ad.block_ids == [0, 1] and len(ad.adapters) == 2
    a = ad.adapters[0]
    assert a.down.out_features == 5 and isinstance(a.act, torch.nn.GELU) and isinstance(a.scale, torch.nn.Parameter)
    x = images(learner, 2, 4)
    learner.eval()
    with torch.no_grad():
        with learner.experts.only("online"):
            on = learner.backbone(x)
        with disabled(learner.backbone):
            assert torch.equal(on, learner.backbone(x))  # zero up-projection
    learner.train_task(sc.tasks[0])
    assert not torch.equal(a.up.weight, torch.zeros_like(a.up.weight))
    block, h = learner.backbone.model.blocks[0], torch.randn(2, 5, learner.backbone.feature_dim)
    with torch.no_grad(), learner.experts.only("online"):  # parallel to the attention, on its normed input
        out = block(h)
        with disabled(learner.backbone):
            n1 = block.norm1(h)
            mid = h + block.attn(n1) + a.scale * a.up(torch.nn.functional.gelu(a.down(n1)))
            manual = mid + block.mlp(block.norm2(mid))
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6)

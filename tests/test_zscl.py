"""ZSCL (ptcl.methods.zscl) on the tiny random CLIP: weight ensembling, the frozen initial
teacher, the loss terms, the lr schedule, class names, reference sets and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CPU, make_learner, run_task
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import ptcl.methods.zscl as zscl
from ptcl.backbones import build_backbone
from ptcl.backbones.clip import TextTower
from ptcl.config import BackboneConfig, TrainConfig
from ptcl.engine.runner import run
from ptcl.errors import ConfigError, DataError
from ptcl.io import load_tensors
from ptcl.methods.zscl import WeightEnsemble, distillation, warmup_cosine
from ptcl.train import AfterStep, Callback, fit

FAST = {"method.batch_size": 4, "method.lr": 1e-3}  # 12 train images per task: 3 batches + 1 iteration


def initial_clip():
    """The tiny CLIP as built (seeded: identical to every learner's initial backbone)."""
    return build_backbone(BackboneConfig(name="clip_tiny_test"))


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class Record(Callback):
    """Records the trainable weights after every step and the lr of every step."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params, self.weights, self.lrs = params, [], []

    def on_epoch_start(self, state) -> None:
        self.weights.append({k: v.detach().clone() for k, v in self.params.items()})

    def after_backward(self, state) -> None:
        self.lrs.append(state.optimizer.param_groups[0]["lr"])

    def after_step(self, state) -> None:
        self.weights.append({k: v.detach().clone() for k, v in self.params.items()})


def recording(monkeypatch, learner) -> Record:
    """Make the learner's train loop also run a :class:`Record` (after its own callbacks)."""
    rec = Record(learner.trainable())
    real = zscl.fit

    def fit_and_record(*args, **kwargs):
        args = list(args)
        args[-1] = [*args[-1], rec]
        return real(*args, **kwargs)

    monkeypatch.setattr(zscl, "fit", fit_and_record)
    return rec


# --------------------------------------------------------------------------- weight ensemble


def test_weight_ensemble_callback_is_the_official_running_mean():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(7, 3), torch.tensor([0, 1, 0, 1, 1, 0, 1])
    loader = [(x[i : i + 1], y[i : i + 1]) for i in range(7)]
    snaps = [params_of(lin)]
    we = WeightEnsemble(dict(lin.named_parameters()), every=3)
    fit(lin, loader, lambda a, b: F.cross_entropy(lin(a), b), lin.parameters(),
        TrainConfig(epochs=1, lr=0.5, scheduler="constant"), CPU, quiet=True,
        callbacks=[we, AfterStep(lambda s: snaps.append(params_of(lin)))])
    # samples: the start, then after the steps of iterations 0, 3, 6 (snaps[k]: after k steps)
    by_hand = snaps[0]
    for n, k in enumerate((1, 4, 7), start=1):
        by_hand = {p: (by_hand[p] * n + snaps[k][p]) / (n + 1) for p in by_hand}
    assert we.count == 3
    for p in by_hand:
        assert torch.equal(we.mean[p], by_hand[p]), p  # the official formula, bit for bit
        torch.testing.assert_close(we.mean[p], torch.stack([snaps[k][p] for k in (0, 1, 4, 7)]).mean(0))
    we.apply()
    assert torch.equal(lin.weight.detach(), by_hand["weight"])
    assert (snaps[7]["weight"] - by_hand["weight"]).abs().max() > 1e-3  # not the last weights


def test_task_ends_with_the_mean_of_the_weights_every_avg_freq_iterations(tmp_path, monkeypatch):
    learner, sc = make_learner(tmp_path, "zscl", {**FAST, "method.avg_freq": 2})
    rec = recording(monkeypatch, learner)
    run_task(learner, sc.tasks[0])
    assert len(rec.weights) == 1 + 4  # start + 4 iterations (3 batches + the official extra one)
    final = learner.trainable()
    for k, v in final.items():
        want = torch.stack([rec.weights[i][k] for i in (0, 1, 3)]).mean(0)  # start, iterations 0 and 2
        torch.testing.assert_close(v.detach(), want, rtol=0, atol=1e-6)
    moved = max(float((final[k] - rec.weights[0][k]).abs().max()) for k in final)
    last = max(float((final[k] - rec.weights[-1][k]).abs().max()) for k in final)
    assert moved > 1e-5 and last > 1e-5  # trained, and not the last step's weights
    assert float(learner.backbone.model.head.bias.abs().max()) == 0  # CLIP's proj has no bias


# --------------------------------------------------------------------------- distillation


def test_distillation_target_is_the_frozen_initial_clip(tmp_path):
    learner, sc = make_learner(tmp_path, "zscl", FAST)
    task = sc.tasks[0]
    learner.before_task(task)
    prompts, per = learner.reference_texts(task)
    names = learner.ctx.class_names[: task.end]
    assert prompts == [f"a photo of a {c}." for c in names] and per == 1  # the default reference
    ref_x = next(iter(DataLoader(learner.reference_images(task), batch_size=5)))[0]
    clip = initial_clip()
    with torch.no_grad():
        want_text = F.normalize(clip.text.encode(clip.text.tokenize(prompts)), dim=-1)
        want = clip.text.logit_scale.exp() * F.normalize(clip(ref_x), dim=-1) @ want_text.T
    text0 = learner.teacher_text(prompts, per)
    teacher0, student0 = learner.kd_logits(ref_x, text0)
    torch.testing.assert_close(text0, want_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher0, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student0, teacher0, rtol=0, atol=0)  # before training: one model

    learner.train_task(task)
    learner.after_task(task)
    assert (learner.backbone.text.token_embedding.weight - clip.text.token_embedding.weight).abs().max() > 1e-5
    text1 = learner.teacher_text(prompts, per)
    teacher1, student1 = learner.kd_logits(ref_x, text1)
    assert torch.equal(text1, text0) and torch.equal(teacher1, teacher0)  # the target did not move
    assert (student1 - teacher1).abs().max() > 1e-4  # the student did
    initial = clip.state_dict()
    for k, v in learner.teacher.module.state_dict().items():
        assert torch.equal(v, initial[k]), k


def test_loss_terms_equal_a_hand_computation(tmp_path):
    learner, sc = make_learner(tmp_path, "zscl", FAST)
    task = sc.tasks[0]
    learner.before_task(task)
    x, y = next(iter(DataLoader(learner.ctx.data.images("train", task.classes), batch_size=6)))
    names = learner.ctx.class_names[task.start : task.end]
    tokens = learner.text.tokenize([f"a bad photo of a {c}." for c in names])  # the default template
    got = learner.ce_loss(x, y - task.start, tokens)
    text, bb = learner.text, learner.backbone
    with torch.no_grad():
        logits = text.logit_scale.exp() * F.normalize(bb(x), dim=-1) @ F.normalize(text.encode(tokens), dim=-1).T
    logp = logits.log_softmax(1)
    t = y - task.start
    by_hand = (0.8 * -logp[torch.arange(len(t)), t] + 0.2 * -logp.mean(1)).mean()
    torch.testing.assert_close(got.detach(), by_hand, rtol=1e-5, atol=1e-6)
    assert abs(float(got) - float(F.cross_entropy(logits, t))) > 1e-4  # the smoothing matters

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 3, generator=g) * 4, torch.randn(5, 3, generator=g) * 4
    kd = -(F.softmax(teacher / 2, 1) * F.log_softmax(student / 2, 1)).sum(1).mean() * 4
    torch.testing.assert_close(distillation(teacher, student, 2.0), kd)
    ref_text = F.normalize(torch.randn(7, 32, generator=g), dim=-1)
    t_logits, s_logits = learner.kd_logits(x, ref_text)
    want = 5 * distillation(t_logits, s_logits, 2.0) + 5 * distillation(t_logits.T, s_logits.T, 2.0)
    torch.testing.assert_close(learner.kd_loss(x, ref_text), want)


def test_lr_follows_the_official_warmup_cosine(tmp_path, monkeypatch):
    assert warmup_cosine(0, 100, 30) == 1 / 30 and warmup_cosine(29, 100, 30) == 1.0
    assert warmup_cosine(30, 100, 30) == 1.0 and warmup_cosine(100, 100, 30) == 0.0
    assert math.isclose(warmup_cosine(65, 100, 30), 0.5)
    assert warmup_cosine(3, 3, 30) == 4 / 30 and warmup_cosine(5, 5, 5) == 0.0  # no division by zero
    learner, sc = make_learner(tmp_path, "zscl", {**FAST, "method.warmup_steps": 2})
    rec = recording(monkeypatch, learner)
    run_task(learner, sc.tasks[0])
    assert rec.lrs == pytest.approx([1e-3 * f for f in (0.5, 1.0, 1.0, 0.0)])  # 3 iterations + 1 at lr 0


# --------------------------------------------------------------------------- texts and references


def test_class_names_reach_the_text_tower_in_class_order(tmp_path, monkeypatch):
    seen: list[str] = []
    tokenize = TextTower.tokenize
    monkeypatch.setattr(TextTower, "tokenize", lambda self, texts: (seen.extend(texts), tokenize(self, texts))[1])
    learner, sc = make_learner(tmp_path, "zscl", {**FAST, "method.templates": "[\"a {} digit.\"]"})
    assert sc.order != sorted(sc.order)
    names = [str(c) for c in sc.order]  # mnist_demo's names are its digits
    assert learner.ctx.class_names == names
    for task in sc.tasks[:2]:
        run_task(learner, task)

    def digit(a, b):
        return [f"a {n} digit." for n in names[a:b]]

    def photo(a, b):
        return [f"a photo of a {n}." for n in names[a:b]]

    # task t: its classes' training texts, its reference texts, then every seen class to predict
    assert seen == digit(0, 2) + photo(0, 2) + digit(0, 2) + digit(2, 4) + photo(2, 4) + digit(0, 4)
    text = learner.text
    with torch.no_grad():
        want = F.normalize(text.encode(text.tokenize(digit(0, 4))), dim=-1)
    torch.testing.assert_close(learner.classifier, want, rtol=1e-5, atol=1e-6)
    x, _ = next(iter(DataLoader(learner.eval_dataset(range(4)), batch_size=5)))
    with torch.no_grad():  # logits: the scaled cosine with each seen class's text
        image = F.normalize(learner.backbone(x), dim=-1)
        torch.testing.assert_close(learner.predict(x), text.logit_scale.exp() * image @ want.T, rtol=1e-5, atol=1e-5)


def _folder(root, classes, names=None):
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / c / "0.png")
    if names:
        (root / "classnames.txt").write_text("".join(f"{c}\t{n}\n" for c, n in zip(classes, names)))
    return root


def test_reference_folder_and_sentences(tmp_path):
    root = _folder(tmp_path / "ref", ["n01", "n02", "n03"], ["tabby cat", "golden retriever", "goldfish"])
    over = {**FAST, "method.reference_root": str(root), "method.reference_templates": "[\"itap of a {}.\"]"}
    learner, sc = make_learner(tmp_path, "zscl", over)
    task = sc.tasks[0]
    assert learner.reference_texts(task) == (["itap of a tabby cat.", "itap of a golden retriever.",
                                              "itap of a goldfish."], 1)
    assert len(learner.reference_images(task)) == 3
    run_task(learner, task)  # trains with the folder as reference

    sentences = tmp_path / "captions.txt"
    sentences.write_text("a dog running on the beach\n\nthe skyline of a city at night\n")
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\nthree\n")
    learner, _ = make_learner(tmp_path, "zscl", {**over, "method.reference_texts": str(sentences),
                                                  "method.reference_class_names": str(names)})
    assert learner.reference_texts(task) == (["a dog running on the beach", "the skyline of a city at night"], 1)
    learner, _ = make_learner(tmp_path, "zscl", {**over, "method.reference_class_names": str(names),
                                                  "method.reference_templates": "imagenet_simple"})
    prompts, per = learner.reference_texts(task)
    assert per == 7 and len(prompts) == 21 and prompts[0] == "itap of a one." and prompts[7] == "itap of a two."
    assert learner.teacher_text(prompts, per, batch=8).shape == (3, 32)  # batches of whole classes

    with pytest.raises(ConfigError, match="reference_root"):
        make_learner(tmp_path, "zscl", {"method.reference_class_names": str(names)})
    with pytest.raises(ConfigError, match="method.reference_templates"):
        make_learner(tmp_path, "zscl", {"method.reference_templates": "nonsense"})
    learner, _ = make_learner(tmp_path, "zscl", {"method.reference_root": str(tmp_path / "missing")})
    with pytest.raises(DataError, match="does not exist"):
        learner.reference_images(task)


def test_needs_a_text_tower(tmp_path):
    with pytest.raises(ConfigError, match="text tower"):
        make_learner(tmp_path, "zscl", {"backbone.name": "vit_tiny_test"})


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_holds_the_trained_towers_but_not_the_teacher(tmp_path):
    learner, sc = make_learner(tmp_path, "zscl", FAST)
    for task in sc.tasks[:2]:
        run_task(learner, task)
    state = learner.checkpoint_state()
    backbone_keys = {f"backbone.{k}" for k in learner.backbone.state_dict()}
    assert set(state) == backbone_keys | {"classifier"}  # one copy of CLIP: no teacher
    initial = initial_clip().state_dict()
    for tower in ("backbone.text.", "backbone.model."):
        keys = [k for k in state if k.startswith(tower)]
        assert keys and any(not torch.equal(state[k], initial[k[len("backbone."):]]) for k in keys), tower

    fresh, _ = make_learner(tmp_path, "zscl", FAST)
    for task in sc.tasks[:2]:
        fresh.before_task(task)  # replayed on resume before the checkpoint loads
    fresh.load_checkpoint_state(state)
    for k, v in fresh.backbone.state_dict().items():
        assert torch.equal(v, state[f"backbone.{k}"]), k
    for k, v in fresh.teacher.module.state_dict().items():  # the teacher is still the initial CLIP
        assert torch.equal(v, initial[k]), k


@pytest.mark.slow
def test_cifar10_end_to_end_and_resume(cifar10_archive, tmp_path):
    """The tiny CLIP on real CIFAR-10 images and names, 3 tasks, with the archive's test split
    as reference set: resumed after task 0 equals uninterrupted; the checkpoint holds the
    trained towers and no teacher."""
    over = ["method.name=zscl", "backbone.name=clip_tiny_test", "dataset.name=imagefolder",
            f"dataset.root={cifar10_archive}", "dataset.train_per_class=3", "dataset.test_per_class=2",
            "scenario.init_cls=4", "scenario.increment=3", "method.batch_size=4", "method.lr=1e-4",
            "method.avg_freq=2", f"method.reference_root={cifar10_archive}", "method.reference_split=test"]
    full = run(None, over, out=tmp_path / "full", quiet=True)
    part = run(None, over, out=tmp_path / "part", quiet=True, max_tasks=1)
    resumed = run(resume=tmp_path / "part", quiet=True)
    assert full["num_tasks"] == 3 and part["tasks_done"] == 1 and resumed["finished"]
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    state = load_tensors(tmp_path / "full" / "checkpoints" / "task_002.safetensors")
    again = load_tensors(tmp_path / "part" / "checkpoints" / "task_002.safetensors")
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    bb = initial_clip()
    assert set(state) == {f"backbone.{k}" for k in bb.state_dict()} | {"classifier"}
    assert state["classifier"].shape == (10, 32)
    emb = "backbone.text.token_embedding.weight"
    assert not torch.equal(state[emb], bb.state_dict()[emb[len("backbone."):]])

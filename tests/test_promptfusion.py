"""PromptFusion: the mixing weight, the two prompted branches against a hand computation, the
official weighted NLL and its gradients, frozen old contexts, class names in label order, the
exemplar budget, and an end-to-end run on real CIFAR-10 images and names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner, run_task

from ptcl.backbones.clip import TextTower
from ptcl.data.memory import herding
from ptcl.engine.runner import run
from ptcl.errors import ConfigError
from ptcl.io import load_tensors
from ptcl.methods.promptfusion import PromptFusion, mix_logits, weight_mask

FAST = {"method.epochs": 1, "method.batch_size": 4, "method.vit_backbone": "vit_tiny_test", "method.memory_size": 7,
        "method.n_ctx": 2, "method.clip_prompt_length": 3, "method.vpt_prompt_length": 2}


def make(tmp_path, **opts) -> tuple[PromptFusion, object]:
    return make_learner(tmp_path, "promptfusion", {**FAST, **opts})  # type: ignore[return-value]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_mixing_weight_is_sigmoid_lambda_in_open_unit_interval(tmp_path):
    learner, _ = make(tmp_path)
    assert learner.lambda_.item() == 1.0  # official init: ones(1)
    zeros, ones = torch.zeros(2, 3), torch.ones(2, 3)
    for lam in (-6.0, -1.0, 0.0, 1.0, 6.0):
        w = mix_logits(zeros, ones, torch.tensor([lam]))  # clip 0, vpt 1: the output is the weight
        assert torch.all((w > 0) & (w < 1))
        torch.testing.assert_close(w, torch.full((2, 3), torch.sigmoid(torch.tensor(lam)).item()))
    clip, vpt = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(mix_logits(clip, vpt, torch.tensor([0.0])), (clip + vpt) / 2)


def _hand_clip_image(learner: PromptFusion, x: torch.Tensor) -> torch.Tensor:
    """[cls, prompts, patches] after ln_pre, blocks, mean of the prompt outputs, ln_post, proj."""
    m = learner.backbone.model
    t = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    p = learner.image_prompt.expand(len(x), -1, -1)
    t = m.blocks(torch.cat([t[:, :1], p, t[:, 1:]], 1))
    return m.head(m.norm(t[:, 1 : 1 + p.shape[1]].mean(1)))


def _hand_vit(learner: PromptFusion, x: torch.Tensor) -> torch.Tensor:
    """[cls, prompts + CLS position, patches] (+ positions), blocks, norm, mean of the prompts, head."""
    m = learner.vit.model
    t = m._pos_embed(m.patch_embed(x))
    p = (learner.vpt_prompt + m.pos_embed[0, 0]).expand(len(x), -1, -1)
    t = m.norm(m.blocks(torch.cat([t[:, :1], p, t[:, 1:]], 1)))
    return learner.head(t[:, 1 : 1 + p.shape[1]].mean(1))


def _hand_text(learner: PromptFusion, names: list[str]) -> torch.Tensor:
    """'X X X X name.' with the first n_ctx placeholders replaced by the contexts."""
    text = learner.text
    tokens = text.tokenize([f"X X X X {n}." for n in names])
    ctx = torch.cat([learner.contexts[k] for k in sorted(learner.contexts, key=int)])
    emb = text.token_embedding(tokens).clone()
    emb[:, 1:3] = ctx
    return F.normalize(text.encode_embeddings(emb, tokens), dim=-1)


@torch.no_grad()
def test_mixed_logits_equal_hand_computation(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:2]:
        learner.before_task(task)
    learner.lambda_.fill_(-0.4)
    x = images(3)
    text = _hand_text(learner, [str(c) for c in sc.order[:4]])  # mnist_demo's names are its digits
    clip = learner.text.logit_scale.exp() * F.normalize(_hand_clip_image(learner, x), dim=-1) @ text.T
    vpt = _hand_vit(learner, x)[:, :4]
    w = torch.sigmoid(torch.tensor(-0.4))
    got = learner.predict(x)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, (1 - w) * clip + w * vpt, rtol=1e-5, atol=1e-5)
    # the branches differ from their unprompted forwards (the prompts act)
    assert (learner.clip_image_features(x) - learner.backbone(x)).abs().max() > 1e-3


def test_loss_is_the_weighted_nll_and_reaches_every_trainable_parameter(tmp_path):
    learner, sc = make(tmp_path)
    t0, t1 = sc.tasks[:2]
    run_task(learner, t0)
    learner.before_task(t1)
    learner.zero_grad(set_to_none=True)  # the last step of task 0 left its gradients
    x, y = images(4, 1), torch.tensor([0, 2, 3, 1])
    with torch.no_grad():
        old = learner.tasks_text(1)
    beta = torch.nn.Parameter(torch.randn(4, t1.start))
    with torch.no_grad():
        learner.alpha.normal_()
    loss = learner.task_loss(x, y, t1, old, beta)
    # by hand: -mean_i W[i, y_i] log p[i, y_i], W = [theta / sigmoid(beta), sigmoid(alpha)], theta = 1/2
    with torch.no_grad():
        logp = F.log_softmax(learner.logits(x, learner.seen_text()), 1)
        w = torch.cat([0.5 / torch.sigmoid(beta), torch.sigmoid(learner.alpha)], 1)
        torch.testing.assert_close(w, weight_mask(0.5, beta, learner.alpha))
        hand = -(w * logp)[torch.arange(4), y].mean()
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    loss.backward()
    trained = {"contexts.1": learner.contexts["1"], "image_prompt": learner.image_prompt,
               "vpt_prompt": learner.vpt_prompt, "head.weight": learner.head.weight, "lambda_": learner.lambda_,
               "alpha": learner.alpha, "beta": beta}
    for name, p in trained.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not learner.contexts["0"].requires_grad and learner.contexts["0"].grad is None
    assert all(p.grad is None for p in [*learner.backbone.parameters(), *learner.vit.parameters()])
    assert learner.head.weight.grad[t1.end :].abs().sum() == 0  # unseen classes' rows: no gradient


def test_old_contexts_stay_bit_identical_and_new_ones_train(tmp_path):
    learner, sc = make(tmp_path, **{"method.epochs": 2})
    t0, t1 = sc.tasks[:2]
    run_task(learner, t0)
    old = learner.contexts["0"].detach().clone()
    learner.before_task(t1)
    new_init = learner.contexts["1"].detach().clone()
    prompt = learner.image_prompt.detach().clone()
    learner.train_task(t1)
    learner.after_task(t1)
    assert torch.equal(learner.contexts["0"], old)
    assert not torch.equal(learner.contexts["1"], new_init)
    assert not torch.equal(learner.image_prompt, prompt)  # the shared image prompt trains in every task
    assert new_init.std().item() == pytest.approx(0.01, rel=0.5)


def test_class_names_reach_the_text_tower_in_label_order(tmp_path, monkeypatch):
    seen: list[str] = []
    tokenize = TextTower.tokenize
    monkeypatch.setattr(TextTower, "tokenize", lambda self, texts: (seen.extend(texts), tokenize(self, texts))[1])
    learner, sc = make(tmp_path)
    assert sc.order != sorted(sc.order)  # shuffled: label order != dataset order
    for task in sc.tasks[:2]:
        learner.before_task(task)
    assert seen == [f"X X X X {c}." for c in sc.order[:4]]  # 2 n_ctx: 2M placeholders (official)
    x_id = tokenize(learner.text, ["X"])[0, 1]
    assert (learner.tokens[:, 1:5] == x_id).all() and (learner.tokens[:, 0] == 49406).all()
    seen.clear()
    plain, sc = make(tmp_path, **{"method.keep_placeholders": "false"})
    plain.before_task(sc.tasks[0])
    assert seen == [f"X X {c}." for c in sc.order[:2]]


def test_memory_keeps_its_total_budget_of_herded_exemplars(tmp_path):
    learner, sc = make(tmp_path)  # memory_size 7, 2 classes a task, 6 train images a class
    data = learner.ctx.data
    for task in sc.tasks[:3]:
        learner.before_task(task)
        if task.index:
            ds = learner.train_dataset(task)  # the task's images and the exemplars
            assert len(ds) == 6 * task.num_new + len(learner.memory)
            assert sorted({y for _, y in ds}) == list(range(task.end))
        learner.after_task(task)
        m = 7 // task.end
        mem = learner.memory
        assert len(mem) <= 7 and sorted(mem.classes()) == list(range(task.end))
        assert all(int((mem.labels == c).sum()) == m for c in range(task.end)), (task.index, mem.labels)
        # herding on the frozen CLIP image embeddings of the class
        c = task.start
        feats, labels = data.features("train", [c])
        expect = torch.from_numpy(data.positions("train", [c]))[herding(feats, m)]
        assert mem.positions[mem.labels == c].tolist() == expect.tolist()


def test_checkpoint_holds_no_frozen_weights_and_round_trips(tmp_path):
    learner, sc = make(tmp_path)
    for task in sc.tasks[:2]:
        run_task(learner, task)
    state = learner.checkpoint_state()
    assert not [k for k in state if k.startswith(("backbone.", "vit."))], sorted(state)[:5]
    assert {"image_prompt", "vpt_prompt", "lambda_", "alpha", "head.weight", "contexts.1", "memory.positions"} <= set(state)
    assert learner.vit.model.pos_embed.device == learner.lambda_.device
    fresh, _ = make(tmp_path)
    for task in sc.tasks[:2]:
        fresh.before_task(task)
    fresh.load_checkpoint_state(state)
    x = images(2)
    torch.testing.assert_close(fresh.predict(x), learner.predict(x), rtol=0, atol=0)
    assert learner.inference_cost()["backbone_passes"] == 2


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="text tower"):
        make(tmp_path, **{"backbone.name": "vit_tiny_test"})
    with pytest.raises(ConfigError, match="n_ctx"):
        make(tmp_path, **{"method.n_ctx": 40})
    with pytest.raises(ConfigError, match="vit_backbone"):
        make(tmp_path, **{"method.vit_backbone": " "})


@pytest.mark.slow
def test_cifar10_end_to_end_resumes_and_checkpoints_no_tower(cifar10_archive, tmp_path, monkeypatch):
    """The tiny CLIP and tiny ViT on real CIFAR-10 images and names: 3 tasks, resumed after task 0
    equals uninterrupted, the text sees CIFAR's names in label order, checkpoints hold neither
    frozen backbone."""
    seen: list[str] = []
    tokenize = TextTower.tokenize
    monkeypatch.setattr(TextTower, "tokenize", lambda self, texts: (seen.extend(texts), tokenize(self, texts))[1])
    over = ["method.name=promptfusion", "backbone.name=clip_tiny_test", "dataset.name=imagefolder",
            f"dataset.root={cifar10_archive}", "dataset.train_per_class=3", "dataset.test_per_class=2",
            "scenario.init_cls=4", "scenario.increment=3", "method.epochs=1", "method.batch_size=4",
            "method.vit_backbone=vit_tiny_test", "method.memory_size=8", "method.n_ctx=2",
            "method.clip_prompt_length=2", "method.vpt_prompt_length=2"]
    full = run(None, over, out=tmp_path / "full", quiet=True)
    part = run(None, over, out=tmp_path / "part", quiet=True, max_tasks=1)
    resumed = run(resume=tmp_path / "part", quiet=True)
    assert full["num_tasks"] == 3 and resumed["finished"] and part["tasks_done"] == 1
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    a = load_tensors(tmp_path / "full" / "checkpoints" / "task_002.safetensors")
    b = load_tensors(tmp_path / "part" / "checkpoints" / "task_002.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a and not [k for k in a if k.startswith(("backbone.", "vit."))], sorted(a)[:5]
    assert a["head.weight"].shape == (10, 32) and a["contexts.2"].shape == (3, 2, 32)
    names = [full["class_names"][i].replace("_", " ") for i in range(10)]  # folder names, label order
    assert seen[:10] == [f"X X X X {n}." for n in names]
    assert "X X X X airplane." in seen

"""PROOF (ptcl.methods.proof) on the tiny random CLIP: the fusion layer, per-task projections
(old ones frozen, outputs summed), the three logits and their sum, the loss, prototypes,
class names in label order, the exemplar memory, and an end-to-end run on real CIFAR-10."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner, run_task

from ptcl.backbones.clip import TextTower
from ptcl.engine.runner import run
from ptcl.errors import ConfigError
from ptcl.io import load_tensors
from ptcl.methods.proof import FusionAttention

FAST = {"method.epochs": 1, "method.batch_size": 8}
TOL = dict(rtol=1e-5, atol=1e-5)


def proof(tmp_path, **opts):
    return make_learner(tmp_path, "proof", {**FAST, **{f"method.{k}": v for k, v in opts.items()}})


def sum_proj(projs, x):
    out = 0
    for p in projs:
        out = out + x @ p.weight.T + p.bias
    return out


def hand_text(learner, num_classes: int) -> torch.Tensor:
    """Per class: normalised mean over the templates of the normalised projected text."""
    text = learner.text
    rows = []
    for c in range(num_classes):
        prompts = [t.format(learner.ctx.class_names[c]) for t in learner.templates]
        raw = text.encode(text.tokenize(prompts))
        rows.append(F.normalize(F.normalize(sum_proj(learner.text_projs, raw), dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def hand_fusion(learner, image, text):
    """The official forward_transformer: the layer on the expanded tokens, text and
    prototype outputs averaged over the batch."""
    b, c = image.shape[0], text.shape[0]
    protos = F.normalize(sum_proj(learner.image_projs, learner.prototypes[:c]), dim=-1)
    ctx = torch.cat(list(learner.context))
    tokens = torch.cat([image[:, None], text.expand(b, -1, -1), protos.expand(b, -1, -1), ctx.expand(b, -1, -1)], 1)
    out = learner.fusion(tokens)
    return out[:, 0], out[:, 1 : c + 1], out[:, c + 1 : 2 * c + 1]


# --------------------------------------------------------------------------- fusion layer


def test_fusion_layer_is_the_official_one_head_attention_and_the_shared_form_equals_it():
    m = FusionAttention(16, 0.1, torch.Generator().manual_seed(0))
    assert m.w_q.bias is None and m.fc.bias is not None and m.norm.normalized_shape == (16,)
    x, shared = torch.randn(5, 16), torch.randn(7, 16)
    tokens = torch.cat([x[:, None], shared.expand(5, -1, -1)], 1)
    m.eval()
    with torch.no_grad():
        q, k, v = tokens @ m.w_q.weight.T, tokens @ m.w_k.weight.T, tokens @ m.w_v.weight.T
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), -1)
        want = F.layer_norm((attn @ v) @ m.fc.weight.T + m.fc.bias + tokens, (16,), m.norm.weight, m.norm.bias)
        got = m(tokens)
        torch.testing.assert_close(got, want, **TOL)
        first, rest = m.forward_shared(x, shared)  # closed form (no attention dropout)
        torch.testing.assert_close(first, got[:, 0], **TOL)
        torch.testing.assert_close(rest, got[:, 1:], **TOL)
    m.train()  # with dropout: the same draws as the expanded form
    torch.manual_seed(3)
    got = m(tokens)
    torch.manual_seed(3)
    first, rest = m.forward_shared(x, shared)
    torch.testing.assert_close(first, got[:, 0], **TOL)
    torch.testing.assert_close(rest, got[:, 1:], **TOL)
    assert (got - want).abs().max() > 1e-3  # dropout is active in training


# --------------------------------------------------------------------------- projections


@pytest.mark.parametrize("freeze_text", [False, True])
def test_old_projections_stay_and_new_ones_are_summed(tmp_path, freeze_text):
    learner, sc = proof(tmp_path, freeze_old_text_projections=str(freeze_text).lower(), lr=0.05)
    run_task(learner, sc.tasks[0])
    after0 = {k: v.clone() for k, v in learner.state_dict().items() if not k.startswith("backbone.")}
    learner.before_task(sc.tasks[1])
    init1 = {k: v.clone() for k, v in learner.state_dict().items() if k.startswith(("image_projs.1", "context.1"))}
    learner.train_task(sc.tasks[1])
    learner.after_task(sc.tasks[1])
    now = learner.state_dict()
    for k in ("image_projs.0.weight", "image_projs.0.bias", "context.0"):
        assert torch.equal(now[k], after0[k]), k  # the old image projection and prompts are frozen
    for k, v in init1.items():
        assert not torch.equal(now[k], v), k  # the new ones trained
    assert not torch.equal(now["logit_scale"], after0["logit_scale"])  # trained as its own parameter
    text_same = torch.equal(now["text_projs.0.weight"], after0["text_projs.0.weight"])
    assert text_same == freeze_text  # official: old text projections keep training; paper: fixed
    f = torch.randn(3, 32)
    with torch.no_grad():
        p0, p1 = learner.image_projs
        torch.testing.assert_close(learner.project(learner.image_projs, f), p0(f) + p1(f), rtol=0, atol=1e-6)
        t0, t1 = learner.text_projs
        torch.testing.assert_close(learner.project(learner.text_projs, f),
                                   f @ t0.weight.T + t0.bias + f @ t1.weight.T + t1.bias, **TOL)


# --------------------------------------------------------------------------- logits and loss


def _trained(tmp_path, tasks: int = 2, **opts):
    learner, sc = proof(tmp_path, templates='["a photo of a {}.", "art of the {}."]', **opts)
    for task in sc.tasks[:tasks]:
        run_task(learner, task)
    learner.eval()
    return learner, sc


def test_three_logits_and_their_sum_equal_a_hand_computation(tmp_path):
    learner, sc = _trained(tmp_path)
    torch.set_grad_enabled(False)
    try:
        _check_logits(learner, sc)
    finally:
        torch.set_grad_enabled(True)


def _check_logits(learner, sc):
    c = sc.tasks[1].end
    f, _ = learner.ctx.data.features("test", range(c))
    f = f[:6]
    text = hand_text(learner, c)
    image = sum_proj(learner.image_projs, f)  # official: not normalised at test time
    fi, ft, fp = hand_fusion(learner, image, text)
    want = (image @ text.T, fi @ ft.mean(0).T, fi @ fp.mean(0).T)
    got = learner.logit_terms(f)
    for g, w in zip(got, want):
        assert g.shape == (6, c)
        torch.testing.assert_close(g, w, **TOL)
    torch.testing.assert_close(learner.predict(f), sum(want), **TOL)
    # official: the fused text is averaged over the test batch, so a prediction depends on its batch
    assert (learner.predict(f[:1]) - learner.predict(f)[:1]).abs().max() > 1e-4
    assert learner.eval_protocol == "batch_mean_fusion_class_order"
    batches = learner.eval_batches(range(c), 999)
    labels = learner.ctx.data.labels("test", range(c))
    order = [i for b in batches for i in b]
    assert [len(b) for b in batches][0] == 8 and labels[order].tolist() == sorted(labels.tolist())
    # per image: each image's own fused tokens (a batch of one)
    learner.cfg = dataclasses.replace(learner.cfg, eval_batch_mean=False)
    per = learner.predict(f)
    torch.testing.assert_close(per, torch.cat([learner.predict(f[i : i + 1]) for i in range(6)]), **TOL)
    i = 2
    torch.testing.assert_close(per[i], image[i] @ text.T + fi[i] @ ft[i].T + fi[i] @ fp[i].T, **TOL)
    assert learner.eval_protocol == "per_image" and learner.eval_batches(range(c), 8) is None
    learner.cfg = dataclasses.replace(learner.cfg, eval_normalize_image=True)
    n = F.normalize(image, dim=-1)
    torch.testing.assert_close(learner.logit_terms(f)[0], n @ text.T, **TOL)


def test_training_loss_equals_a_hand_computation(tmp_path):
    learner, sc = _trained(tmp_path, tasks=1, fusion_dropout=0.0)
    learner.before_task(sc.tasks[1])
    c = sc.tasks[1].end
    f, y = learner.ctx.data.features("train", range(c))
    f, y = f[::3], y[::3]
    text = learner.text
    with torch.no_grad():  # the first template only
        raw = text.encode(text.tokenize([f"a photo of a {learner.ctx.class_names[k]}." for k in range(c)]))
        image = F.normalize(sum_proj(learner.image_projs, f), dim=-1)
        t = F.normalize(sum_proj(learner.text_projs, raw), dim=-1)
        fi, ft, fp = hand_fusion(learner, image, t)
        s = learner.logit_scale.exp()
        target = torch.arange(len(y))
        clip = (F.cross_entropy(s * image @ t[y].T, target) + F.cross_entropy(s * t[y] @ image.T, target)) / 2
        want = F.cross_entropy(fi @ ft.mean(0).T, y) + clip + F.cross_entropy(fi @ fp.mean(0).T, y)
        learner.train()
        got = learner.loss(f, y, learner.raw_text(range(c))[:, 0])
    torch.testing.assert_close(got, want, **TOL)


# --------------------------------------------------------------------------- prototypes, names, memory


def test_prototypes_are_class_means_of_normalised_frozen_features(tmp_path):
    learner, sc = _trained(tmp_path, tasks=2)
    data = learner.ctx.data
    assert learner.prototypes.shape == (sc.tasks[1].end, 32)
    for c in range(sc.tasks[1].end):
        feats, _ = data.features("train", [c])
        torch.testing.assert_close(learner.prototypes[c], F.normalize(feats, dim=-1).mean(0), rtol=0, atol=1e-6)
    feats, _ = data.features("train", [0])
    assert (learner.prototypes[0] - feats.mean(0)).abs().max() > 1e-3  # normalised before the mean


def test_class_names_reach_the_text_tower_in_label_order(tmp_path, monkeypatch):
    seen: list[str] = []
    tokenize = TextTower.tokenize
    monkeypatch.setattr(TextTower, "tokenize", lambda self, texts: (seen.extend(texts), tokenize(self, texts))[1])
    learner, sc = proof(tmp_path, templates='["a {} digit.", "art of the {}."]')
    assert sc.order != sorted(sc.order)
    for task in sc.tasks[:2]:
        run_task(learner, task)
    names = [str(c) for c in sc.order[: sc.tasks[1].end]]  # mnist_demo's names are its digits
    assert learner.ctx.class_names[: len(names)] == names
    assert seen == [t.format(n) for n in names for t in ("a {} digit.", "art of the {}.")]


@pytest.mark.parametrize(("opts", "per_class"), [
    ({"memory_per_class": 4}, [4, 4]),
    ({"memory_size": 6}, [3, 1]),  # 6 // 2 seen classes, then 6 // 4
])
def test_memory_holds_the_budget_per_class_and_joins_the_training_data(tmp_path, opts, per_class):
    learner, sc = proof(tmp_path, **opts)
    data = learner.ctx.data
    for task, m in zip(sc.tasks[:2], per_class):
        learner.before_task(task)
        ds = learner.train_dataset(task)
        held = len(learner.memory)
        assert len(ds) == len(data.positions("train", task.classes)) + held
        learner.train_task(task)
        learner.after_task(task)
        counts = [int((learner.memory.labels == c).sum()) for c in range(task.end)]
        assert counts == [m] * task.end
        # each exemplar is a training sample of its own class
        assert torch.equal(torch.from_numpy(data.label["train"][learner.memory.positions.numpy()]), learner.memory.labels)
    none, sc = proof(tmp_path, memory_per_class=0)
    assert none.memory is None
    none.before_task(sc.tasks[0])
    assert len(none.train_dataset(sc.tasks[0])) == len(data.positions("train", sc.tasks[0].classes))


def test_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="template"):
        proof(tmp_path, templates="nonsense")
    with pytest.raises(ConfigError, match="text tower"):
        make_learner(tmp_path, "proof", {"backbone.name": "vit_tiny_test"})
    with pytest.raises(ConfigError, match="fusion_dropout"):
        proof(tmp_path, fusion_dropout=1.0)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cifar10_end_to_end_resume_and_no_frozen_weights_in_checkpoints(cifar10_archive, tmp_path):
    """The tiny CLIP on real CIFAR-10 images and names: 3 tasks, resumed after task 0 equals
    uninterrupted, checkpoints hold the projections, prompts, fusion and memory but no CLIP."""
    over = ["method.name=proof", "backbone.name=clip_tiny_test", "dataset.name=imagefolder",
            f"dataset.root={cifar10_archive}", "dataset.train_per_class=5", "dataset.test_per_class=3",
            "scenario.init_cls=4", "scenario.increment=3", "method.epochs=2", "method.batch_size=8",
            "method.memory_per_class=2", "method.templates=cifar"]
    full = run(None, over, out=tmp_path / "full", quiet=True)
    part = run(None, over, out=tmp_path / "part", quiet=True, max_tasks=1)
    resumed = run(resume=tmp_path / "part", quiet=True)
    assert full["num_tasks"] == 3 and resumed["finished"] and part["tasks_done"] == 1
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert full["eval_protocol"] == "batch_mean_fusion_class_order"
    state = load_tensors(tmp_path / "full" / "checkpoints" / "task_002.safetensors")
    assert not [k for k in state if k.startswith("backbone.")], list(state)[:5]
    assert state["prototypes"].shape == (10, 32) and state["memory.labels"].shape == (20,)
    assert {"image_projs.2.weight", "text_projs.2.weight", "context.2", "fusion.w_q.weight", "logit_scale"} <= set(state)

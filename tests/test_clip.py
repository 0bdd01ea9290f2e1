"""CLIP backbones (ptcl.backbones.clip), class names, prompt templates and zeroshot_clip.

The tiny CLIP (``clip_tiny_test``, random, seeded) is compared against open_clip itself: the
timm image tower must compute ``encode_image``, the text tower ``encode_text``.
"""

from __future__ import annotations

import copy
import functools
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import make_learner, tiny_overrides
from PIL import Image

from ptcl import peft
from ptcl.backbones import build_backbone
from ptcl.backbones.clip import TINY_CONFIG, CLIPBackbone, TextTower, build_clip
from ptcl.config import BackboneConfig, DatasetConfig, build_config
from ptcl.data.class_names import default_names, read_name_map
from ptcl.data.datasets import load_dataset, read_image_folder
from ptcl.data.templates import TEMPLATE_SETS, resolve_templates, template_set, text_classifier
from ptcl.engine.rundir import ResumeError
from ptcl.engine.runner import run
from ptcl.errors import BackboneError, ConfigError, DataError
from ptcl.io import load_tensors

TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _tiny(quick_gelu: bool = False) -> CLIPBackbone:
    bb = build_clip("ViT-B-16", None, name="clip_tiny_test", seed=0, quick_gelu=quick_gelu,
                    **copy.deepcopy(TINY_CONFIG))
    bb.fingerprint()  # as build_backbone does: hash the pre-trained weights before tuning attaches
    return bb


def tiny() -> CLIPBackbone:
    return copy.deepcopy(_tiny())


def reference(quick_gelu: bool = False) -> torch.nn.Module:
    """open_clip's own tiny CLIP with the same seeded init as ``clip_tiny_test``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return open_clip.create_model("ViT-B-16", pretrained=None, quick_gelu=quick_gelu,
                                      **copy.deepcopy(TINY_CONFIG)).eval()


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- towers


@pytest.mark.parametrize("quick_gelu", [False, True])
@torch.no_grad()
def test_timm_image_tower_equals_open_clip_encode_image(quick_gelu):
    bb, ref = _tiny(quick_gelu), reference(quick_gelu)
    assert type(bb.model).__name__ == "VisionTransformer" and bb.feature_dim == 32 and bb.kind == "vit"
    assert not hasattr(bb.text, "visual")
    x = images()
    out = bb(x)
    assert out.shape == (3, 32) and out.std() > 0
    torch.testing.assert_close(out, ref.encode_image(x), **TOL)
    other = _tiny(not quick_gelu)(x)  # the activation matters: the check can fail
    assert (other - out).abs().max() > 1e-4


def test_quick_gelu_follows_the_pretrained_tag():
    from ptcl.backbones.clip import _needs_quick_gelu, timm_image_tower

    assert _needs_quick_gelu(open_clip, "ViT-B-16", "openai")  # open_clip 3.x only warns
    assert not _needs_quick_gelu(open_clip, "ViT-B-16", "laion400m_e32")
    assert not _needs_quick_gelu(open_clip, "ViT-B-16-quickgelu", "metaclip_400m")  # already QuickGELU
    assert not _needs_quick_gelu(open_clip, "ViT-B-16", None)
    vit = timm_image_tower(copy.deepcopy(TINY_CONFIG), quick_gelu=True)
    assert type(vit.blocks[0].mlp.act).__name__ == "QuickGELU" and vit.head.out_features == 32


def test_registered_tiny_backbone_and_preprocess():
    bb = build_backbone(BackboneConfig(name="clip_tiny_test"))
    assert isinstance(bb, CLIPBackbone) and isinstance(bb.text, TextTower)
    assert bb.preprocess.mean == open_clip.OPENAI_DATASET_MEAN and bb.preprocess.std == open_clip.OPENAI_DATASET_STD
    assert bb.preprocess.image_size == 32 and bb.preprocess.interpolation == "bicubic"
    # the text tower is a frozen part of the backbone: its keys are the backbone's
    assert any(k.startswith("text.") for k in bb.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bb(images()), _tiny()(images()), rtol=0, atol=0)  # seeded: identical


@torch.no_grad()
def test_text_tower_equals_open_clip_encode_text():
    text, ref = tiny().text, reference()
    assert (text.embed_dim, text.width, text.context_length) == (32, 32, 77)
    tok = text.tokenize(["a photo of a cat.", "a bad photo of a truck.", "x"])
    assert tok.shape == (3, 77) and tok.dtype == torch.long
    torch.testing.assert_close(tok, open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat.", "a bad photo of a truck.", "x"]))
    out = text.encode(tok)
    torch.testing.assert_close(out, ref.encode_text(tok), **TOL)
    torch.testing.assert_close(text.encode(tok, normalize=True), F.normalize(out, dim=-1), **TOL)
    assert (out[0] - out[1]).abs().max() > 1e-3
    torch.testing.assert_close(text.logit_scale, ref.logit_scale)


def test_encode_embeddings_on_token_embeddings_equals_encode_and_is_differentiable():
    text = tiny().text
    tok = text.tokenize(["X X X cat.", "X X X aquarium fish."])
    emb = text.token_embedding(tok).detach().requires_grad_(True)
    out = text.encode_embeddings(emb, tok)
    torch.testing.assert_close(out, text.encode(tok), rtol=0, atol=0)
    out.sum().backward()
    assert emb.grad is not None and emb.grad[:, 1:4].abs().sum() > 0  # the context positions
    ctx = emb.detach().clone()
    ctx[:, 1:4] = torch.randn(3, text.width, generator=torch.Generator().manual_seed(0))  # CoOp-style
    assert (text.encode_embeddings(ctx, tok) - out).abs().max() > 1e-4


# --------------------------------------------------------------------------- templates


def test_template_sets_and_validation():
    assert template_set("simple") == ("a photo of a {}.",)
    assert len(template_set("cifar")) == 18 and len(template_set("imagenet_simple")) == 7
    assert len(template_set("imagenet_openai")) == 80
    assert template_set("imagenet_simple")[0] == "itap of a {}."
    assert template_set("bad_photo") == ("a bad photo of a {}.",)
    for name in TEMPLATE_SETS:
        assert all(t.count("{}") == 1 for t in template_set(name))
    assert resolve_templates(["a {} here."]) == ["a {} here."]
    for bad in ("no_such_set", [], ["no placeholder"], ["{} and {}"]):
        with pytest.raises(ConfigError, match="method.templates"):
            resolve_templates(bad)


@torch.no_grad()
def test_text_classifier_is_the_normalised_mean_of_normalised_template_embeddings():
    text = tiny().text
    names, templates = ["cat", "aquarium fish", "truck"], ["a photo of a {}.", "art of the {}."]
    rows = []
    for n in names:
        e = F.normalize(text.encode(text.tokenize([t.format(n) for t in templates])), dim=-1)
        rows.append(F.normalize(e.mean(0), dim=0))
    want = torch.stack(rows)
    got = text_classifier(text, names, templates, batch_classes=2)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, want, **TOL)
    single = text_classifier(text, names, "simple")  # a set name; one template: plain normalised rows
    torch.testing.assert_close(single, F.normalize(text.encode(text.tokenize([f"a photo of a {n}." for n in names])), dim=-1), **TOL)


# --------------------------------------------------------------------------- zeroshot_clip


def test_zeroshot_sees_class_names_in_label_order_and_predicts_nearest_text(tmp_path, monkeypatch):
    seen: list[str] = []
    tokenize = TextTower.tokenize
    monkeypatch.setattr(TextTower, "tokenize", lambda self, texts: (seen.extend(texts), tokenize(self, texts))[1])
    learner, sc = make_learner(tmp_path, "zeroshot_clip", {"method.templates": "[\"a {} digit.\"]"})
    assert sc.order != sorted(sc.order)  # the order is shuffled: label order != dataset order
    assert learner.ctx.class_names == [str(c) for c in sc.order]  # mnist_demo's names are its digits
    for task in sc.tasks[:2]:
        learner.before_task(task)
        learner.after_task(task)
    assert seen == [f"a {c} digit." for c in sc.order[: sc.tasks[1].end]]
    t = learner.classifier
    assert t.shape == (4, 32)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(4))
    logits = learner.predict(3.0 * t)  # an image embedding equal to a class's text is that class
    assert logits.argmax(1).tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(logits, learner.text.logit_scale.exp() * t @ t.T)


def test_zeroshot_needs_a_text_tower(tmp_path):
    with pytest.raises(ConfigError, match="text tower"):
        make_learner(tmp_path, "zeroshot_clip", {"backbone.name": "vit_tiny_test"})


def test_config_checks():
    with pytest.raises(ConfigError, match="backbone.name=clip"):
        build_config(None, ["backbone.name=vit_tiny_test", "backbone.clip_model=ViT-B-16"])
    with pytest.raises(ConfigError, match="replaces"):
        build_config(None, ["backbone.name=clip", "backbone.clip_pretrained=openai", "backbone.weights=/x.pt"])
    with pytest.raises(ConfigError, match="template"):
        build_config(None, tiny_overrides("zeroshot_clip", **{"method.templates": "nonsense"}))
    cfg = build_config(None, ["backbone.name=clip", "backbone.clip_model=ViT-B-16",
                              "backbone.clip_pretrained=laion400m_e32"])
    assert (cfg.backbone.clip_model, cfg.backbone.clip_pretrained) == ("ViT-B-16", "laion400m_e32")


# --------------------------------------------------------------------------- tuning modules


@torch.no_grad()
def test_adapter_and_vpt_attach_to_the_clip_image_tower():
    x = images(2)
    for method, opts in (("adapter", {"bottleneck": 4}), ("vpt_shallow", {"num_prompts": 3})):
        bb = tiny()
        plain = bb(x)
        handle = peft.attach(bb.model, method, **opts)
        for p in handle.parameters():  # as training would move them (the adapter's up-projection starts at 0)
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        tuned = bb(x)
        assert tuned.shape == plain.shape and (tuned - plain).abs().max() > 1e-4, method
        with peft.disabled(bb.model):
            torch.testing.assert_close(bb(x), plain, rtol=0, atol=0)


# --------------------------------------------------------------------------- weights


def test_local_checkpoint_loads_through_backbone_weights(tmp_path):
    ref = reference()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(1.5)
    path = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), path)
    bb = build_backbone(BackboneConfig(name="clip_tiny_test", weights=str(path)))
    with torch.no_grad():
        torch.testing.assert_close(bb(images()), ref.encode_image(images()), **TOL)
        tok = bb.text.tokenize(["a cat"])
        torch.testing.assert_close(bb.text.encode(tok), ref.encode_text(tok), **TOL)


def test_missing_weights_offline_fail_fast_with_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    t0 = time.perf_counter()
    with pytest.raises(BackboneError) as e:
        build_backbone(BackboneConfig(name="clip", clip_model="ViT-B-16", clip_pretrained="laion400m_e32"))
    msg = str(e.value)
    assert time.perf_counter() - t0 < 30
    assert "\n" not in msg and "ViT-B-16/laion400m_e32" in msg and "internet" in msg, msg
    with pytest.raises(BackboneError, match="valid: openai"):
        build_backbone(BackboneConfig(name="clip", clip_pretrained="no_such_tag"))
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        build_backbone(BackboneConfig(name="clip", clip_model="ViT-Q-99"))


# --------------------------------------------------------------------------- class names


def _folder(root: Path, classes: list[str], extra: dict[str, str] | None = None) -> Path:
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(root / split / c / "0.png")
    for name, text in (extra or {}).items():
        (root / name).write_text(text)
    return root


def test_default_names_are_readable_folder_names(tmp_path):
    assert default_names(["aquarium_fish", "001.Black_footed_Albatross", "7"]) == [
        "aquarium fish", "Black footed Albatross", "7"]
    splits = read_image_folder(_folder(tmp_path / "d", ["pickup_truck", "apple"]))
    assert splits.train.classes == ["apple", "pickup_truck"] and splits.class_names == ["apple", "pickup truck"]


@pytest.mark.parametrize("text", [
    "n02\tgolden retriever\nn01\ttabby cat\nn09\tunused\n",  # id<TAB>name, extra ids ignored
    "# a comment\nn01 tabby cat\n\nn02 golden retriever\n",  # id name
    "tabby cat\ngolden retriever\n",  # one name per line, in class-index order
])
def test_classnames_txt_beside_the_data(tmp_path, text):
    splits = read_image_folder(_folder(tmp_path / "d", ["n01", "n02"], {"classnames.txt": text}))
    assert splits.class_names == ["tabby cat", "golden retriever"]


def test_words_txt_inside_an_archive_gives_the_first_synonym(tmp_path):
    root = _folder(tmp_path / "src" / "tiny-imagenet", ["n01443537", "n01629819"], {
        "words.txt": "n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\n"
                     "n01629819\tEuropean fire salamander, Salamandra salamandra\n"})
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="tiny-imagenet")
    splits = read_image_folder(archive)
    assert splits.class_names == ["goldfish", "European fire salamander"]


def test_name_map_errors_and_explicit_option(tmp_path):
    data = _folder(tmp_path / "d", ["n01", "n02", "n03"])
    bad = tmp_path / "map.txt"
    bad.write_text("n01\tcat\nn03\tfish\n")
    with pytest.raises(DataError, match=r"lacks 1 of the 3 class ids.*n02"):
        read_name_map(bad, ["n01", "n02", "n03"])
    with pytest.raises(DataError, match="lacks 1"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(data), class_names=str(bad)))
    bad.write_text("cat\ndog\n")
    with pytest.raises(DataError, match="2 names for 3 classes"):
        read_name_map(bad, ["n01", "n02", "n03"])
    good = tmp_path / "names.txt"
    good.write_text("n01\tcat\nn02\tdog\nn03\tfish\n")
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(data), class_names=str(good)))
    assert splits.class_names == ["cat", "dog", "fish"]
    mnist = load_dataset(DatasetConfig(name="mnist_demo", class_names=str(_digits(tmp_path))))
    assert mnist.class_names[:2] == ["zero", "one"]


def _digits(tmp_path: Path) -> Path:
    p = tmp_path / "digits.txt"
    p.write_text("\n".join(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]))
    return p


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cifar10_end_to_end_zeroshot_and_simplecil_resume(cifar10_archive, tmp_path, monkeypatch):
    """The tiny CLIP on real CIFAR-10 images and names: 3 tasks, resumed after task 0 equals
    uninterrupted, the text sees CIFAR's names in label order, checkpoints hold no tower."""
    seen: list[str] = []
    tokenize = TextTower.tokenize
    monkeypatch.setattr(TextTower, "tokenize", lambda self, texts: (seen.extend(texts), tokenize(self, texts))[1])
    for method in ("zeroshot_clip", "simplecil"):
        over = [f"method.name={method}", "backbone.name=clip_tiny_test", "dataset.name=imagefolder",
                f"dataset.root={cifar10_archive}", "dataset.train_per_class=3", "dataset.test_per_class=2",
                "scenario.init_cls=4", "scenario.increment=3"]
        full = run(None, over, out=tmp_path / method / "full", quiet=True)
        part = run(None, over, out=tmp_path / method / "part", quiet=True, max_tasks=1)
        resumed = run(resume=tmp_path / method / "part", quiet=True)
        assert full["num_tasks"] == 3 and resumed["finished"]
        assert resumed["accuracy_matrix"] == full["accuracy_matrix"] and part["tasks_done"] == 1
        state = load_tensors(tmp_path / method / "full" / "checkpoints" / "task_002.safetensors")
        assert state and not [k for k in state if k.startswith("backbone.")], list(state)[:5]
        if method == "zeroshot_clip":
            names = [full["class_names"][i].replace("_", " ") for i in range(10)]  # folder names, label order
            assert seen[:10] == [f"a photo of a {n}." for n in names]
            assert "a photo of a airplane." in seen and state["classifier"].shape == (10, 32)


TOKEN_METHODS = {
    "l2p": {},
    "dualprompt": {"method.g_layers": "[0]", "method.e_layers": "[1]"},
    "coda_prompt": {"method.pool_size": 10, "method.layers": "[0,1]"},
    "dap": {},
    "esn": {},
    "lae": {"method.pet_blocks": "[0,1]"},
}


@pytest.mark.parametrize("name", sorted(TOKEN_METHODS))
def test_token_methods_run_on_the_clip_image_tower(name, tmp_path):
    """Methods that read the ViT's tokens (prompts, class attention, prefixes) work on CLIP's
    image tower, whose token width (64) differs from its feature (projection) width (32):
    prompt keys live in the query's width, prompted features pass CLIP's projection."""
    over = tiny_overrides(name, **{"backbone.name": "clip_tiny_test", "method.epochs": 1, "method.batch_size": 8,
                                   **TOKEN_METHODS[name]})
    m = run(None, over, out=tmp_path / "run", quiet=True, max_tasks=1)
    assert m["tasks_done"] == 1


def test_resume_refuses_changed_class_names(tmp_path):
    """The class names are part of the stream: a resume after the name map changed is refused."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c in range(4):
            d = root / split / f"n{c:04d}"
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((32, 32, 3), 40 * c + i, np.uint8)).save(d / f"{i}.png")
    names = root / "names.txt"
    names.write_text("".join(f"n{c:04d}\tclass {c}\n" for c in range(4)))
    over = tiny_overrides("zeroshot_clip", **{"dataset.name": "imagefolder", "dataset.root": root,
                                              "dataset.class_names": names, "dataset.train_per_class": 3,
                                              "dataset.test_per_class": 3})
    m = run(None, over, out=tmp_path / "run", quiet=True, max_tasks=1)
    header = m.get("class_names") or []
    assert sorted(header) == [f"class {c}" for c in range(4)]
    names.write_text("".join(f"n{c:04d}\tother {c}\n" for c in range(4)))
    with pytest.raises(ResumeError, match="class names changed"):
        run(resume=tmp_path / "run", quiet=True)

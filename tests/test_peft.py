"""Tests for ptcl.peft: attach / disable / train / detach on tiny random timm models (CPU)."""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import timm
import torch
from torch import nn

from ptcl import peft
from ptcl.backbones.base import Backbone, Preprocess
from ptcl.errors import ConfigError
from ptcl.peft import PEFT_METHODS, TuningModule, disabled, tuning_parameters

MODELS = {  # name -> (timm name, kwargs, input size)
    "vit_tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    "dinov2_s": ("vit_small_patch14_dinov2", dict(img_size=56, depth=2), 56),
    "vit_b16": ("vit_base_patch16_224", dict(img_size=32, depth=1), 32),
    "effnet": ("tf_efficientnet_lite0", {}, 32),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2), 56),
}
VIT_METHODS = ["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"]
CNN_METHODS = ["ssf", "finetune"]
CASES = [(m, k) for k in list(MODELS)[:4] for m in (CNN_METHODS if k == "effnet" else VIT_METHODS)]
VPT = ("vpt_shallow", "vpt_deep")


@functools.cache
def _pristine(key: str) -> nn.Module:
    name, kwargs, _ = MODELS[key]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def _model(key: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return copy.deepcopy(_pristine(key)), torch.randn(2, 3, MODELS[key][2], MODELS[key][2])


def _train(model: nn.Module, x: torch.Tensor, cnn: bool, steps: int = 2) -> None:
    """A few SGD steps on a random target; all parameters are given to the optimizer."""
    peft.mark_only_tuning_trainable(model)
    model.train(not cnn)  # CNNs: eval mode keeps the frozen BN statistics fixed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    model.eval()


@torch.no_grad()
def _perturb(model: nn.Module) -> None:
    """Move every tuning parameter, as training would (cheaper than backward passes)."""
    for p in tuning_parameters(model):
        p.add_(torch.randn_like(p) * 0.01)


def _tree(model: nn.Module) -> tuple:
    modules = [(n, type(m), id(m)) for n, m in model.named_modules()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return modules, [(n, id(p)) for n, p in model.named_parameters()], repr(model), hooks


@torch.no_grad()
def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


@pytest.mark.parametrize("method,key", CASES)
def test_attach_keeps_output(method: str, key: str) -> None:
    model, x = _model(key)
    y0 = _out(model, x)
    peft.attach(model, method)
    if method in VPT:  # prompts change the output by construction
        assert not torch.allclose(_out(model, x), y0, atol=1e-6)
        with disabled(model):
            assert torch.equal(_out(model, x), y0)
    else:
        assert torch.equal(_out(model, x), y0)


@pytest.mark.parametrize("method,key", CASES)
def test_training_moves_only_tuning_params_and_disabled_stays_pretrained(
    method: str, key: str
) -> None:
    model, x = _model(key)
    y0 = _out(model, x)
    peft.attach(model, method)
    tuning = {id(p) for p in tuning_parameters(model)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, x, cnn=key == "effnet")
    # (c) every non-tuning parameter and buffer is bit-identical; most trained tensors moved
    params = dict(model.named_parameters())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    frozen = {k for k in before if k not in params or id(params[k]) not in tuning}
    assert not (changed & frozen), sorted(changed & frozen)[:5]
    assert len(changed) > (len(before) - len(frozen)) / 2
    assert all(p.requires_grad == (id(p) in tuning) for p in model.parameters())
    # (b) disabled() gives the pre-trained output exactly, with the trained modules in place
    y1 = _out(model, x)
    if method == "finetune":  # weights changed in place: nothing to bypass
        with pytest.raises(ConfigError, match="copy"), disabled(model):
            pass
        return
    with disabled(model):
        assert torch.equal(_out(model, x), y0)
    assert not torch.equal(y1, y0) and torch.equal(_out(model, x), y1)  # re-enabled on exit


@pytest.mark.parametrize("method,key", CASES)
def test_detach_restores_module_tree(method: str, key: str) -> None:
    model, x = _model(key)
    y0 = _out(model, x)
    tree = _tree(model)
    handle = peft.attach(model, method)
    _perturb(model)
    handle.detach()
    assert _tree(model) == tree  # same modules, parameter objects, repr and no hooks left
    if method != "finetune":  # finetune changed the weights themselves
        assert torch.equal(_out(model, x), y0)


@pytest.mark.parametrize("method,key", CASES)
def test_tuning_state_round_trips(method: str, key: str) -> None:
    model, x = _model(key)
    handle = peft.attach(model, method)
    _perturb(model)
    torch.save(peft.tuning_state_dict(model), buf := io.BytesIO())
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    other, _ = _model(key)
    torch.manual_seed(123)  # a different random init of the prompts
    other_handle = peft.attach(other, method)
    peft.load_tuning_state_dict(other, state)
    assert torch.equal(_out(other, x), _out(model, x))
    _perturb(other)
    other_handle.load_state_dict(handle.state_dict())
    assert torch.equal(_out(other, x), _out(model, x))
    with pytest.raises(ConfigError, match="does not match"):
        peft.load_tuning_state_dict(other, {"nope": torch.zeros(1)})


@pytest.mark.parametrize("key", ["vit_tiny", "dinov2_s", "vit_b16"])
@pytest.mark.parametrize("method", VPT)
def test_vpt_prompt_parameter_count(method: str, key: str) -> None:
    model, _ = _model(key)
    (p,) = peft.attach(model, method).parameters()  # default: 5 prompts
    dim = model.embed_dim
    assert p.shape == ((len(model.blocks) if method == "vpt_deep" else 1), 5, dim)
    assert p.abs().max() <= math.sqrt(6 / (3 * math.prod(model.patch_embed.patch_size) + dim))
    assert sum(q.numel() for q in tuning_parameters(model)) == p.numel()


@pytest.mark.parametrize("method", VPT)
def test_vpt_init_xavier_or_zeros(method: str) -> None:
    model, x = _model("vit_tiny")
    bound = math.sqrt(6 / (3 * math.prod(model.patch_embed.patch_size) + model.embed_dim))
    (p,) = peft.attach(model, method).parameters()  # default: the VPT paper's Xavier-uniform
    assert (p != 0).all() and p.abs().max() > bound / 2
    peft.detach(model, method)
    (z,) = peft.attach(model, method, init="zeros").parameters()  # APER's code
    assert torch.equal(z, torch.zeros_like(z))
    _train(model, x, cnn=False)
    assert z.abs().sum() > 0  # zero prompts are trained all the same
    with pytest.raises(ConfigError, match="init"):
        peft.attach(_model("vit_tiny")[0], method, init="normal")


@pytest.mark.parametrize("method", VPT)
def test_vpt_tokens_follow_prefix_tokens(method: str) -> None:
    model, x = _model("dinov2_reg")
    n_tok = model.forward_features(x).shape[1]
    s = model.num_prefix_tokens
    assert s == 5  # CLS + 4 registers
    (p,) = peft.attach(model, method, num_prompts=3).parameters()
    seen: list[torch.Tensor] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    assert model.forward_features(x).shape[1] == n_tok  # prompts stripped before the norm
    assert [t.shape[1] for t in seen] == [n_tok + 3] * 2
    # block i sees its own prompts right after the prefix (shallow: block 0's outputs at 1)
    own = [
        torch.equal(t[:, s : s + 3], p[min(i, len(p) - 1)].expand(2, -1, -1))
        for i, t in enumerate(seen)
    ]
    assert own == [True, method == "vpt_deep"]


def test_adapter_is_parallel_to_mlp_branch_on_residual_stream() -> None:
    model, _ = _model("dinov2_s")
    ad = peft.attach(model, "adapter", dropout=0.0).module.adapters[0]
    nn.init.normal_(ad.up.weight)
    block, x = model.blocks[0], torch.randn(2, 7, model.embed_dim)
    with torch.no_grad():
        out = block(x)
        with disabled(model):  # the sub-modules' hooks must not fire in the manual version
            h = x + block.ls1(block.attn(block.norm1(x)))
            plain = h + block.ls2(block.mlp(block.norm2(h)))
        assert torch.allclose(out, plain + 0.1 * ad.up(torch.relu(ad.down(h))), atol=1e-5)
        assert not torch.allclose(out, plain, atol=1e-3)


def test_ssf_sites_and_paper_init() -> None:
    model, x = _model("vit_tiny")
    y0 = _out(model, x)
    ssf = peft.attach(model, "ssf").module
    assert len(ssf.sites) == 6 * 2 + 2  # qkv proj fc1 fc2 norm1 norm2 per block; embed, norm
    peft.detach(model)
    peft.attach(model, "ssf", init="paper")
    assert not torch.equal(_out(model, x), y0)


def test_handles_backbone_autocast_and_deepcopy() -> None:
    model, x = _model("vit_tiny")
    bb = Backbone(model, "vit_tiny", 192, Preprocess(32, (0.5,) * 3, (0.5,) * 3))
    y0 = _out(bb, x)
    ad, vpt = peft.attach(bb, "adapter"), peft.attach(bb, "vpt_deep")  # unwraps to bb.model
    nn.init.normal_(ad.module.adapters[1].up.weight)
    y_both = _out(bb, x)
    with vpt.disabled():  # each handle bypasses only its own method
        y_ad = _out(bb, x)
    with ad.disabled(), vpt.disabled():
        assert torch.equal(_out(bb, x), y0)
    assert not torch.equal(y_ad, y0) and not torch.equal(y_ad, y_both)
    assert peft.mark_only_tuning_trainable(bb) == sum(p.numel() for p in tuning_parameters(bb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bb.train()(x).float().square().sum().backward()
    assert all(p.grad is not None for p in tuning_parameters(bb))
    twin = copy.deepcopy(bb)  # hooks of the copy call the copy's own modules
    assert torch.equal(_out(twin, x), y_both)
    with torch.no_grad():
        twin.model.tuning_vpt_deep.prompts.zero_()
    assert not torch.equal(_out(twin, x), y_both)
    peft.detach(twin)
    assert torch.equal(_out(twin, x), y0)
    assert torch.equal(_out(bb, x), y_both)  # the original keeps its modules and hooks


def test_errors() -> None:
    model, _ = _model("vit_tiny")
    with pytest.raises(ConfigError, match="adapter, finetune, lora, prefix, ssf, vpt_deep, vpt_shallow"):
        peft.attach(model, "ia3")
    with pytest.raises(ConfigError, match="bottleneck"):
        peft.attach(model, "adapter", bottlenek=8)
    peft.attach(model, "vpt_shallow")
    with pytest.raises(ConfigError, match="already attached"):
        peft.attach(model, "vpt_shallow")
    with pytest.raises(ConfigError, match="VPT"):
        peft.attach(model, "vpt_deep")
    with pytest.raises(ValueError, match="already registered"):
        PEFT_METHODS.register("ssf")(TuningModule)
    with pytest.raises(ConfigError, match="no tuning module"):
        peft.detach(model, "ssf")
    cnn, _ = _model("effnet")
    for method in ("adapter", "vpt_deep"):
        with pytest.raises(ConfigError, match="ViT"):
            peft.attach(cnn, method)
    assert all(s.channel_dim == 1 for s in peft.attach(cnn, "ssf").module.sites.values())


def test_backbone_pretrained_bypasses_every_member_of_an_attached_set() -> None:
    """``Backbone.pretrained()`` gives the plain output with an adapter set (whose per-block
    adapters check their own switch) and a LoRA set attached; before the fix it switched off
    only the sets themselves and returned adapted features."""
    model, x = _model("vit_tiny")
    bb = Backbone(model, "vit_tiny", 192, Preprocess(32, (0.5,) * 3, (0.5,) * 3))
    bb.fingerprint()  # of the pre-trained weights, as a build takes it
    y0 = _out(bb, x)
    ad, lora = peft.attach(bb, "adapter"), peft.attach(bb, "lora")
    _perturb(bb.model)
    y = _out(bb, x)
    assert not torch.equal(y, y0)
    with bb.pretrained():
        assert torch.equal(_out(bb, x), y0)
    assert torch.equal(_out(bb, x), y)  # every switch is back on
    assert all(m.enabled for h in (ad, lora) for m in h.module.modules() if hasattr(m, "enabled"))

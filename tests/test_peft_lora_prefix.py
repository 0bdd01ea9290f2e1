"""LoRA and prefix tuning (ptcl.peft.lora, ptcl.peft.prefix) on tiny random timm ViTs."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ptcl import peft
from ptcl.errors import ConfigError
from ptcl.peft import disabled, tuning_parameters
from ptcl.peft.prompting import attach_prompting

MODELS = {  # name -> (timm name, kwargs, input size)
    "vit_tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    "dinov2_s": ("vit_small_patch14_dinov2", dict(img_size=28, depth=2), 28),  # LayerScale, 6 heads
}
PETS = {"lora": {"learn_scale": True}, "lora_qkv": {"targets": "qkv", "rank": 3}, "prefix": {},
        "prefix_plain": {"compensatory": False}}


@functools.cache
def _pristine(key: str) -> nn.Module:
    name, kwargs, _ = MODELS[key]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def _model(key: str = "vit_tiny") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return copy.deepcopy(_pristine(key)), torch.randn(2, 3, MODELS[key][2], MODELS[key][2])


def _attach(model: nn.Module, pet: str, **extra) -> peft.TuningHandle:
    return peft.attach(model, pet.split("_")[0], **{**PETS[pet], **extra})


@torch.no_grad()
def _perturb(module: nn.Module, std: float = 0.3) -> None:
    for p in module.parameters():
        p.add_(torch.randn_like(p) * std)


@torch.no_grad()
def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


# ------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("key", MODELS)
@pytest.mark.parametrize("pet", ["lora", "lora_qkv"])
def test_lora_init_is_pretrained_output_bit_for_bit(key: str, pet: str) -> None:
    model, x = _model(key)
    y0 = _out(model, x)
    layer = _attach(model, pet).module.layers[0]
    assert torch.equal(_out(model, x), y0)  # B = 0
    assert torch.equal(layer.B, torch.zeros_like(layer.B))
    bound = 1 / math.sqrt(layer.A.shape[-1])  # kaiming-uniform a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > bound / 2
    assert torch.equal(layer.scale, torch.ones_like(layer.scale))  # alpha defaults to rank


@pytest.mark.parametrize("targets", ["kv", "qkv"])
def test_lora_is_the_merged_weight_update(targets: str) -> None:
    """qkv(x) = x (W + s_t B_t A_t on the targets' rows)^T + b: LAE's KVLoRA / HF peft maths."""
    model, _ = _model()
    lora = peft.attach(model, "lora", targets=targets, rank=3, alpha=6.0, blocks=[1]).module
    layer = lora.layers[0]
    assert torch.equal(layer.scale, torch.full((len(targets),), 2.0))  # alpha / rank
    _perturb(lora)
    qkv, x = model.blocks[1].attn.qkv, torch.randn(2, 5, model.embed_dim)
    a = qkv.out_features // 3
    w = qkv.weight.detach().clone()
    for t, slot in enumerate({"kv": [1, 2], "qkv": [0, 1, 2]}[targets]):
        w[slot * a : (slot + 1) * a] += layer.scale[t].detach() * layer.B[t].detach() @ layer.A[t].detach()
    with torch.no_grad():
        out = qkv(x)
        torch.testing.assert_close(out, F.linear(x, w, qkv.bias), rtol=1e-5, atol=1e-5)
        untuned = model.blocks[0].attn.qkv(x)
        with disabled(model):
            plain, plain0 = qkv(x), model.blocks[0].attn.qkv(x)
        assert torch.equal(out[..., :a], plain[..., :a]) == (targets == "kv")  # the query untouched by kv
        assert torch.equal(untuned, plain0)  # block 0 is not tuned


def test_lora_learn_scale_is_a_parameter_and_fixed_scale_is_not() -> None:
    model, _ = _model()
    fixed = peft.attach(model, "lora", name="a").module
    learned = peft.attach(model, "lora", name="b", learn_scale=True).module
    assert {n for n, _ in fixed.named_parameters()} == {f"layers.{i}.{p}" for i in range(2) for p in "AB"}
    assert {n for n, _ in learned.named_parameters()} >= {"layers.0.scale", "layers.1.scale"}
    assert "layers.0.scale" not in fixed.state_dict()


# ------------------------------------------------------------------------------ prefix


def lae_attention(attn: nn.Module, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, compensate: bool) -> torch.Tensor:
    """LAE's ``Attention.forward`` with a ``Prefix`` written out (libml/model/backbone/vit.py,
    libml/model/pet/prefix.py): prefixes inserted after the first key, softmax, then the
    prefix weights divided by their sum."""
    b, n, c = x.shape
    h, length = attn.num_heads, pk.shape[0]
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    k = torch.cat([k[:, :1], pk.expand(b, -1, -1), k[:, 1:]], dim=1)
    v = torch.cat([v[:, :1], pv.expand(b, -1, -1), v[:, 1:]], dim=1)
    q, k, v = (t.reshape(b, -1, h, c // h).permute(0, 2, 1, 3) for t in (q, k, v))
    w = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    if compensate:
        lamb = w[..., 1 : 1 + length].sum(dim=-1, keepdim=True)
        w = torch.cat([w[..., :1], w[..., 1 : 1 + length] / lamb.clamp(min=1e-12), w[..., 1 + length :]], dim=-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("compensatory", [True, False])
@pytest.mark.parametrize("key", MODELS)
def test_prefix_attention_equals_lae_hand_computation(key: str, compensatory: bool, fused: bool) -> None:
    model, _ = _model(key)
    pre = peft.attach(model, "prefix", length=4, compensatory=compensatory, blocks=[1]).module
    with torch.no_grad():  # well away from the U(0, 0.01) init, scales != 1
        pre.keys.normal_()
        pre.values.normal_()
        pre.key_scale.fill_(1.5)
        pre.value_scale.fill_(0.7)
    attn = model.blocks[1].attn
    attn.fused_attn = fused
    x = torch.randn(2, 6, model.embed_dim)
    with torch.no_grad():
        out = attn(x)
        ref = lae_attention(attn, x, pre.keys[0] * 1.5, pre.values[0] * 0.7, compensatory)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        untuned = model.blocks[0].attn(x)
        with disabled(model):
            plain, plain0 = attn(x), model.blocks[0].attn(x)
        assert not torch.allclose(out, plain, atol=1e-3)
        assert torch.equal(untuned, plain0)  # block 0 is not tuned


def test_plain_prefix_equals_prompt_injector_prefixes() -> None:
    """compensatory=False is DualPrompt's Pre-T: the injector's prefix rows give the same output."""
    model, x = _model()
    handle = peft.attach(model, "prefix", compensatory=False)
    _perturb(handle.module, 1.0)
    y = _out(model, x)
    inj = attach_prompting(model)
    pre = handle.module
    kv = {b: ((pre.keys[j] * pre.key_scale[j]).detach(), (pre.values[j] * pre.value_scale[j]).detach())
          for j, b in enumerate(pre.block_ids)}
    with handle.disabled(), inj.use(prefixes=kv):
        torch.testing.assert_close(_out(model, x), y, rtol=1e-5, atol=1e-5)


def test_prefix_init_and_it_is_not_the_pretrained_output() -> None:
    model, x = _model()
    y0 = _out(model, x)
    pre = peft.attach(model, "prefix", blocks=[0]).module
    for p in (pre.keys, pre.values):
        assert p.shape == (1, 10, model.embed_dim) and p.min() >= 0 and p.max() <= 0.01 and p.max() > 0.005
    assert torch.equal(pre.key_scale, torch.ones(1)) and isinstance(pre.key_scale, nn.Parameter)
    assert not torch.allclose(_out(model, x), y0, atol=1e-4)  # prefixes take lambda of the attention
    with disabled(model):
        assert torch.equal(_out(model, x), y0)


def test_prefix_reads_the_lora_adapted_queries_whatever_the_attach_order() -> None:
    model, x = _model()
    lora, pre = peft.attach(model, "lora"), peft.attach(model, "prefix")
    _perturb(lora.module)
    _perturb(pre.module)
    y = _out(model, x)
    other, _ = _model()
    pre2, lora2 = peft.attach(other, "prefix"), peft.attach(other, "lora")  # prefix first
    pre2.load_state_dict(pre.state_dict())
    lora2.load_state_dict(lora.state_dict())
    torch.testing.assert_close(_out(other, x), y, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ both


@pytest.mark.parametrize("pet", PETS)
def test_training_moves_only_the_pet_and_disabled_is_pretrained_bit_for_bit(pet: str) -> None:
    model, x = _model()
    y0 = _out(model, x)
    _attach(model, pet)
    peft.mark_only_tuning_trainable(model)
    tuning = {id(p) for p in tuning_parameters(model)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    target = torch.randn_like(y0)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    params = dict(model.named_parameters())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    frozen = {k for k in before if k not in params or id(params[k]) not in tuning}
    assert not changed & frozen
    assert changed == {k for k in params if id(params[k]) in tuning}  # every PET tensor moved
    y1 = _out(model, x)
    with disabled(model):
        assert torch.equal(_out(model, x), y0)
    assert not torch.allclose(y1, y0, atol=1e-5) and torch.equal(_out(model, x), y1)


@pytest.mark.parametrize("pet", PETS)
def test_detach_round_trip_and_deepcopy(pet: str) -> None:
    model, x = _model()
    y0 = _out(model, x)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    handle = _attach(model, pet)
    _perturb(handle.module)
    y1 = _out(model, x)
    twin = copy.deepcopy(model)  # its hooks call its own module
    assert torch.equal(_out(twin, x), y1)
    with torch.no_grad():
        next(twin.get_submodule(f"tuning_{handle.name}").parameters()).zero_()
    assert not torch.equal(_out(twin, x), y1) and torch.equal(_out(model, x), y1)
    other, _ = _model()
    _attach(other, pet).load_state_dict(handle.state_dict())
    assert torch.equal(_out(other, x), y1)
    handle.detach()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert torch.equal(_out(model, x), y0)


def test_errors() -> None:
    model, _ = _model()
    with pytest.raises(ConfigError, match="do not exist"):
        peft.attach(model, "lora", blocks=[0, 2])
    with pytest.raises(ConfigError, match="repeat"):
        peft.attach(model, "prefix", blocks=[1, 1])
    with pytest.raises(ConfigError, match="rank"):
        peft.attach(model, "lora", rank=0)
    with pytest.raises(ConfigError, match="targets"):
        peft.attach(model, "lora", targets="qv")
    with pytest.raises(ConfigError, match="length"):
        peft.attach(model, "prefix", length=0)
    with pytest.raises(ConfigError, match="valid"):
        peft.attach(model, "prefix", lenght=3)
    model.blocks[0].attn.attn_drop.p = 0.1
    with pytest.raises(ConfigError, match="dropout"):
        peft.attach(model, "prefix")
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    for pet in ("lora", "prefix"):
        with pytest.raises(ConfigError, match="ViT"):
            peft.attach(cnn, pet)
    vit, _ = _model()
    peft.attach(vit, "prefix")
    with pytest.raises(NotImplementedError, match="mask"):
        vit.blocks[0].attn(torch.randn(1, 5, vit.embed_dim), attn_mask=torch.zeros(5, 5, dtype=torch.bool))

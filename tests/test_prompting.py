"""Prompt tokens and attention prefixes on unmodified timm ViTs (ptcl.peft.prompting)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from ptcl.errors import ConfigError
from ptcl.peft import detach, disabled
from ptcl.peft.prompting import (
    PromptInjector,
    PromptPool,
    attach_prompting,
    cosine_similarity,
    select_topk,
    surrogate_pull,
)


def tiny_vit(depth: int = 3, reg: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
        embed_dim=32, depth=depth, num_heads=2, reg_tokens=reg,
    ).eval()


def dinov2_arch() -> torch.nn.Module:
    """ViT-S/14 DINOv2 blocks (LayerScale, 6 heads of 64), random weights, 3 of 12 blocks, 28 px."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, depth=3
    ).eval()


def reference_block(block, x, k=None, v=None):
    """A timm Block computed by hand, with optional prefix keys/values (B, Lp, D)."""
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    q, kk, vv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    if k is not None:
        def heads(t):
            return t.reshape(b, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        kk, vv = torch.cat([heads(k), kk], 2), torch.cat([heads(v), vv], 2)
    a = ((q * attn.scale) @ kk.transpose(-2, -1)).softmax(-1) @ vv
    x = x + block.ls1(attn.proj(a.transpose(1, 2).reshape(b, n, -1)))
    return x + block.ls2(block.mlp(block.norm2(x)))


@pytest.mark.parametrize("build", [tiny_vit, dinov2_arch])
def test_no_prompts_gives_the_pretrained_output_exactly(build):
    model = build()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        plain = model(x)
        inj = attach_prompting(model)
        assert torch.equal(model(x), plain)
        with inj.use():
            assert torch.equal(model(x), plain)
        k = torch.randn(2, 3, inj.attn_dim)
        with inj.use(tokens=torch.randn(2, 4, inj.dim), prefixes={0: (k, k)}):
            assert not torch.allclose(model(x), plain)
            with disabled(model):
                assert torch.equal(model(x), plain)
        assert torch.equal(model(x), plain)  # prompts are gone after the block
        detach(model, "prompting")
        assert not hasattr(model, "tuning_prompting")
        assert all(not b._forward_pre_hooks and not b.attn._forward_hooks for b in model.blocks)
        assert torch.equal(model(x), plain)


@pytest.mark.parametrize("build", [tiny_vit, dinov2_arch])
@pytest.mark.parametrize("fused", [True, False])
def test_prefix_equals_attention_over_concatenated_keys(build, fused):
    model = build()
    for b in model.blocks:
        b.attn.fused_attn = fused
    inj = attach_prompting(model)
    x = torch.randn(3, 9, inj.dim)
    k, v = torch.randn(3, 4, inj.attn_dim), torch.randn(3, 4, inj.attn_dim)
    block = model.blocks[1]
    with torch.no_grad(), inj.use(prefixes={1: (k, v)}):
        got = block(x)
    torch.testing.assert_close(got, reference_block(block, x, k, v), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), inj.use(prefixes={0: (k, v)}):  # other blocks are untouched
        torch.testing.assert_close(block(x), reference_block(block, x), atol=1e-5, rtol=1e-5)


def test_tokens_are_inserted_after_the_prefix_tokens_and_stripped():
    model = tiny_vit(depth=2, reg=2)  # CLS + 2 register tokens
    inj = attach_prompting(model)
    assert inj.start == 3
    img = torch.randn(2, 3, 32, 32)
    p = torch.randn(2, 5, 32)
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
        seq = torch.cat([x[:, :3], p, x[:, 3:]], 1)
        ref = model.norm(model.blocks[1](model.blocks[0](seq)))
        with inj.use(tokens=p, keep_tokens=True):
            kept = model.forward_features(img)
        torch.testing.assert_close(kept, ref, atol=1e-5, rtol=1e-5)
        assert inj.token_slice == slice(3, 8)
        with inj.use(tokens=p):
            stripped = model.forward_features(img)
        torch.testing.assert_close(stripped, torch.cat([ref[:, :3], ref[:, 8:]], 1), atol=1e-5, rtol=1e-5)
        # deep prompts: block 1 replaces block 0's prompts (VPT-deep layout)
        q = torch.randn(2, 3, 32)
        with inj.use(tokens={0: p, 1: q}, keep_tokens=True):
            deep = model.forward_features(img)
        h = model.blocks[0](seq)
        ref2 = model.norm(model.blocks[1](torch.cat([h[:, :3], q, h[:, 8:]], 1)))
        torch.testing.assert_close(deep, ref2, atol=1e-5, rtol=1e-5)


def test_prefix_blocks_and_gradients():
    model = tiny_vit(depth=4)
    inj = attach_prompting(model)
    seen: dict[int, int] = {}
    for i, b in enumerate(model.blocks):
        b.attn.qkv.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.shape[1]))
    k = torch.randn(2, 3, 32, requires_grad=True)
    v = torch.randn(3, 32, requires_grad=True)  # shared by the batch
    t = torch.randn(2, 2, 32, requires_grad=True)
    with inj.use(tokens=t, prefixes={1: (k, v), 3: (k, v)}):
        out = model(torch.randn(2, 3, 32, 32))
    n = 1 + 16 + 2
    assert seen == {0: n, 1: n + 3, 2: n, 3: n + 3}
    assert out.shape == (2, 32)
    out.sum().backward()
    assert all(g is not None and g.abs().sum() > 0 for g in (k.grad, v.grad, t.grad))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bad_shapes_and_blocks_raise():
    inj = attach_prompting(tiny_vit(depth=2))
    with pytest.raises(ValueError, match="shape"):
        with inj.use(tokens=torch.randn(2, 3, 31)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with inj.use(prefixes={5: (torch.randn(2, 32), torch.randn(2, 32))}):
            pass
    model = tiny_vit(depth=1)
    assert attach_prompting(model) is attach_prompting(model)  # attached once
    with pytest.raises(ConfigError, match="timm ViT"):
        attach_prompting(torch.nn.Linear(2, 2))


def test_deepcopy_hooks_call_the_copy():
    model = tiny_vit(depth=2)
    inj = attach_prompting(model)
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with twin.tuning_prompting.use(tokens=torch.randn(1, 2, 32)):
            assert torch.equal(model(x), plain)  # the original's injector is idle
            assert not torch.allclose(twin(x), plain)
    assert isinstance(twin.tuning_prompting, PromptInjector) and twin.tuning_prompting is not inj


def test_topk_by_cosine_not_dot_product():
    keys = torch.tensor([[10.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[0.5, 1.0]])  # closest in angle: key 1 then 2, key 0 wins the dot product
    sim = cosine_similarity(q, keys)
    assert select_topk(sim, 2)[0].tolist() == [1, 2]
    assert torch.allclose(surrogate_pull(q, keys, torch.tensor([[1, 2]])), sim[0, 1] + sim[0, 2])


def test_batchwise_selection_takes_the_batch_majority():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.1, 0.8], [0.9, 0.8, 0.0]])
    assert select_topk(sim, 2, batchwise=True).tolist() == [[0, 1]] * 3
    pool = PromptPool(3, (2, 4), 4)
    assert pool.prompts.shape == (3, 2, 4) and pool.keys.shape == (3, 4)
    assert 0 <= pool.prompts.min() and pool.prompts.max() <= 1


def test_l2_normalised_similarity_matches_torch():
    q, k = torch.randn(5, 8), torch.randn(7, 8)
    ref = F.cosine_similarity(q[:, None], k[None], dim=-1)
    torch.testing.assert_close(cosine_similarity(q, k), ref, atol=1e-6, rtol=1e-5)


def test_tokens_from_a_callable_see_the_block_input():
    model = tiny_vit(depth=2)
    inj = attach_prompting(model)
    proj = torch.nn.Linear(32, 32)
    seen = []

    def from_cls(x):  # an instance-level prompt generated from the current CLS token
        seen.append((x.shape[1], inj.num_inserted))
        return proj(x[:, :1]).repeat(1, 2, 1)

    with inj.use(tokens={0: torch.zeros(2, 3, 32), 1: from_cls}, keep_tokens=True):
        out = model.forward_features(torch.randn(2, 3, 32, 32))
    assert seen == [(1 + 3 + 16, 3)] and out.shape[1] == 1 + 2 + 16
    out.sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_none_removes_the_earlier_prompts_and_without_tokens_drops_them():
    model = tiny_vit(depth=3)
    inj = attach_prompting(model)
    lengths: list[int] = []
    for b in model.blocks:
        b.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    seen = []

    def gen(x):  # DAP-style: generated from the block input without the earlier prompts
        plain = inj.without_tokens(x)
        seen.append((x.shape[1], plain.shape[1]))
        return plain[:, :2]

    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), inj.use(tokens={0: torch.randn(2, 4, 32), 1: None, 2: gen}, keep_tokens=True):
        out = model.forward_features(img)
    n = 1 + 16
    assert lengths == [n + 4, n, n + 2]  # block 1 sees no prompts, block 2 two new ones
    assert seen == [(n, n)] and out.shape[1] == n + 2 and inj.token_slice == slice(1, 3)
    p = torch.randn(2, 4, 32)
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
        h = model.blocks[0](torch.cat([x[:, :1], p, x[:, 1:]], 1))
        ref = model.norm(model.blocks[2](model.blocks[1](torch.cat([h[:, :1], h[:, 5:]], 1))))
        with inj.use(tokens={0: p, 1: None}):
            got = model.forward_features(img)
    assert inj.num_inserted == 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

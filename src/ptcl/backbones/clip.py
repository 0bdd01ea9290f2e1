"""Vision-language backbones: CLIP models from open_clip, split into an image and a text tower.

``backbone.name: clip`` builds any open_clip ViT CLIP by model name and pretrained tag::

    backbone:
      name: clip
      clip_model: ViT-B-16          # open_clip.list_models(); null: ViT-B-16
      clip_pretrained: laion400m_e32  # open_clip.list_pretrained_tags_by_model(...); null: openai

The field's checkpoints: ``openai`` (OpenAI's CLIP ViT-B/16, Radford et al. 2021: ZSCL,
PromptFusion, Continual-CLIP), ``laion400m_e32`` (OpenCLIP on LAION-400M: PROOF's
``convnet_type: clip``) and ``laion2b_s34b_b88k`` (PROOF's ``clip_laion2b``).
``backbone.weights: PATH`` loads a local open_clip checkpoint of ``clip_model`` instead of a
tag (``clip_pretrained`` must then be null); ``backbone.pretrained: false`` gives random
weights (seeded). Weights are downloaded by open_clip on first use (from the Hugging Face
hub, cached in ``~/.cache/huggingface``); without internet only cached weights load, and a
missing one is one :class:`~ptcl.errors.BackboneError` line naming model and tag.

QuickGELU: OpenAI's weights were trained with QuickGELU, but open_clip 3.x builds
``ViT-B-16`` with GELU and only warns. When the tag's open_clip config says ``quick_gelu``
(``openai``, ``dfn2b``, the MetaCLIP tags, ...) the model is built with QuickGELU
(``force_quick_gelu``), so ``clip_model: ViT-B-16, clip_pretrained: openai`` is right. A
local ``backbone.weights`` file of OpenAI weights needs ``clip_model: ViT-B-16-quickgelu``.

The two towers (:class:`CLIPBackbone`):

* the image tower is an ordinary :class:`~ptcl.backbones.base.Backbone` whose ``model`` is a
  timm ``VisionTransformer`` (``pre_norm=True``: CLIP's ``ln_pre``; ``num_classes =
  embed_dim``: its ``head`` is CLIP's ``proj``, with a zero bias). The open_clip visual
  weights are converted with timm's own ``checkpoint_filter_fn`` (``_convert_openai_clip``;
  the position embedding is resampled for another ``backbone.image_size``). So
  ``forward(images)`` is open_clip's ``encode_image`` (unnormalised, ``(B, embed_dim)``),
  ``feature_dim = embed_dim``, the feature cache stores CLIP image embeddings, and every
  :mod:`ptcl.peft` module and prompt method attaches to its blocks unchanged (prompts enter
  after ``ln_pre``, where PromptFusion inserts them). ``forward_tokens`` returns the tokens
  after ``ln_post`` at the transformer width (768 for ViT-B), before ``proj``
  (``model.head``).
* the text tower, :class:`TextTower`, is ``backbone.text``: open_clip's own text modules
  and CLIP's ``logit_scale``. It is a submodule of the backbone, so it is frozen with it and
  its weights count as pre-trained: checkpoints do not store them (unless a method sets
  ``updates_backbone``). The open_clip ``visual`` is dropped after conversion (no second
  copy).

Input pipeline: the weights' own normalisation (open_clip's ``preprocess_cfg``; CLIP's
``OPENAI_DATASET_MEAN`` / ``STD`` for the field's checkpoints) and its evaluation transform,
resize of the short side to the input size (bicubic) and centre crop
(:mod:`ptcl.backbones.transforms` with ``crop_ratio`` 1); ``backbone.input_norm``,
``eval_crop_ratio`` and ``eval_interpolation`` apply as for every backbone.

``clip_tiny_test`` is a tiny randomly initialised CLIP (seeded, no download) for tests.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptcl.backbones.base import Backbone, Preprocess
from ptcl.backbones.timm_models import _hub_offline_if_unreachable, hub_reachable
from ptcl.config import BackboneConfig
from ptcl.errors import BackboneError, ConfigError
from ptcl.registry import BACKBONES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's input statistics (open_clip ``OPENAI_DATASET_MEAN`` / ``OPENAI_DATASET_STD``)."""

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""The open_clip config of ``clip_tiny_test`` (1.7M parameters, 1.6M of them the token embedding)."""

# vision_cfg options the timm conversion does not reproduce, with their plain-ViT values
_PLAIN_VIT = {
    "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "output_tokens": False, "act_kwargs": None,
    "norm_kwargs": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}


# --------------------------------------------------------------------------- text tower


class TextTower(nn.Module):
    """CLIP's text encoder (open_clip's modules, not copied) and its ``logit_scale``.

    ``encode(tokens)`` equals open_clip's ``encode_text``. Attributes: ``token_embedding``
    (``nn.Embedding(vocab, width)``), ``positional_embedding`` ``(context_length, width)``,
    ``transformer`` (open_clip's ``Transformer``), ``ln_final``, ``text_projection``
    (``(width, embed_dim)`` parameter or ``nn.Linear``), the causal ``attn_mask`` (a
    non-persistent buffer), ``logit_scale`` (a scalar parameter: logits are
    ``logit_scale.exp() * cos``; 100 for the OpenAI weights) and ``tokenizer`` (open_clip's).
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        src = getattr(clip_model, "text", clip_model)  # CustomTextCLIP keeps its text tower in .text
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        missing = [a for a in needed if not hasattr(src, a)]
        pool = getattr(src, "pool_type", getattr(clip_model, "text_pool_type", "argmax"))
        if missing or pool != "argmax" or getattr(src, "cls_emb", None) is not None:
            raise BackboneError(
                f"the text tower of {type(clip_model).__name__} is not a CLIP text transformer "
                f"(missing {missing}, pooling {pool!r}); only open_clip's CLIP text towers are supported"
            )
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.register_buffer("attn_mask", getattr(src, "attn_mask", None), persistent=False)
        self.logit_scale = clip_model.logit_scale
        self.tokenizer = tokenizer
        self._batch_first = getattr(self.transformer, "batch_first", True)  # open_clip 2.x: LND

    @property
    def context_length(self) -> int:
        """Tokens per text (77 for CLIP)."""
        return int(self.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        """Width of the token embeddings and the text transformer."""
        return int(self.token_embedding.embedding_dim)

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text embedding space."""
        p = self.text_projection
        if p is None:
            return self.width
        return int(p.out_features if isinstance(p, nn.Linear) else p.shape[1])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, context_length)`` token ids (CPU): start token, BPE tokens, end token (the
        highest id, so ``argmax`` finds it), zero padding; longer texts are truncated."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts), context_length=self.context_length)

    def encode(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(N, embed_dim)`` text embeddings of ``tokens`` ``(N, L)`` (open_clip's
        ``encode_text``); L2-normalised if ``normalize``."""
        tokens = tokens.to(self.token_embedding.weight.device)
        return self.encode_embeddings(self.token_embedding(tokens), tokens, normalize)

    def encode_embeddings(
        self, embeds: torch.Tensor, tokens: torch.Tensor, normalize: bool = False
    ) -> torch.Tensor:
        """The text transformer on given token embeddings ``embeds`` ``(N, L, width)``, e.g.
        CoOp's learned context vectors spliced into ``token_embedding(tokens)``: adds the
        position embedding, runs the causal transformer and ``ln_final``, takes the end
        token's output (position ``tokens.argmax(-1)``, ``tokens`` ``(N, L)``) and projects
        it. Returns ``(N, embed_dim)``, L2-normalised if ``normalize``. Differentiable in
        ``embeds``."""
        n, length = embeds.shape[:2]
        if length > self.context_length or tokens.shape[:2] != (n, length):
            raise ValueError(f"embeds {tuple(embeds.shape)} and tokens {tuple(tokens.shape)} must be "
                             f"(N, L, {self.width}) and (N, L) with L <= {self.context_length}")
        x = embeds + self.positional_embedding[:length].to(embeds.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        if self._batch_first:
            x = self.transformer(x, attn_mask=mask)
        else:
            x = self.transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        x = self.ln_final(x)
        eot = tokens.to(x.device).argmax(dim=-1)
        x = x[torch.arange(n, device=x.device), eot]
        p = self.text_projection
        if p is not None:
            x = p(x) if isinstance(p, nn.Linear) else x @ p
        return F.normalize(x, dim=-1) if normalize else x


class CLIPBackbone(Backbone):
    """A :class:`~ptcl.backbones.base.Backbone` (the image tower: a timm ViT whose output is
    CLIP's image embedding) with CLIP's text tower as ``text`` (:class:`TextTower`).

    ``clip_model`` / ``clip_pretrained``: the open_clip model name and pretrained tag (or
    checkpoint path; ``None``: random weights)."""

    def __init__(
        self, model: nn.Module, name: str, feature_dim: int, preprocess: Preprocess, text: TextTower,
        clip_model: str, clip_pretrained: str | None,
    ) -> None:
        super().__init__(model, name, feature_dim, preprocess, kind="vit")
        self.text = text
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained


def text_tower(backbone: nn.Module, what: str) -> TextTower:
    """``backbone.text``, or a :class:`ConfigError` saying that ``what`` (a method) needs a
    vision-language backbone."""
    text = getattr(backbone, "text", None)
    if not isinstance(text, TextTower):
        raise ConfigError(
            f"{what} needs a vision-language backbone with a text tower; {getattr(backbone, 'name', backbone)!r} "
            "has none: use backbone.name=clip (with backbone.clip_model / backbone.clip_pretrained) "
            "or clip_tiny_test"
        )
    return text


# --------------------------------------------------------------------------- building


@contextlib.contextmanager
def _quiet_root_errors() -> Iterator[None]:
    """open_clip logs a failed download (``logging.error``) and a random init
    (``logging.warning``) on the root logger, which also installs a stderr handler if none
    exists; ptcl raises a one-line error, or logs the random init itself."""
    root = logging.getLogger()

    def drop(record: logging.LogRecord) -> bool:
        ours = "open_clip" in record.pathname
        return not (ours and (record.levelno >= logging.ERROR or "No pretrained weights" in record.getMessage()))

    added = logging.NullHandler() if not root.handlers else None
    if added is not None:
        root.addHandler(added)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if added is not None:
            root.removeHandler(added)


def _needs_quick_gelu(open_clip: Any, model_name: str, pretrained: str | None) -> bool:
    if not pretrained or "quickgelu" in model_name.lower():
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def _missing_weights(model_name: str, tag: str, e: Exception) -> str:
    cause = ("they are not in the local cache and the Hugging Face hub is unreachable" if not hub_reachable()
             else str(e).splitlines()[0][:300])
    return (
        f"cannot load CLIP weights {model_name}/{tag}: {cause}; run once with internet (open_clip "
        "downloads and caches them in ~/.cache/huggingface), or pass backbone.weights=PATH to a local "
        "open_clip checkpoint, or backbone.pretrained=false"
    )


def load_open_clip(model_name: str, pretrained: str | None, **model_kwargs: Any) -> tuple[nn.Module, dict, bool]:
    """The open_clip model (fp32, CPU), its resolved config and whether it uses QuickGELU.

    ``pretrained``: a tag, a checkpoint path or ``None`` (random init). Raises
    :class:`BackboneError` for an unknown model or tag and for weights that cannot be had."""
    import open_clip

    if model_name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        raise BackboneError(f"unknown open_clip model backbone.clip_model={model_name!r}"
                            f"{f' (did you mean {close}?)' if close else ''}; see open_clip.list_models()")
    if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(model_name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise BackboneError(f"unknown pretrained tag {pretrained!r} for CLIP model {model_name}; "
                            f"valid: {', '.join(tags) or 'none (use backbone.weights=PATH)'}")
    quick = _needs_quick_gelu(open_clip, model_name, pretrained)
    if not pretrained:
        log.info("CLIP %s: random weights (no pretrained weights requested)", model_name)
    if quick:
        log.info("%s/%s: weights trained with QuickGELU; building with force_quick_gelu", model_name, pretrained)
    cfg = open_clip.get_model_config(model_name)
    cfg.update(copy.deepcopy(model_kwargs))
    try:
        with _hub_offline_if_unreachable(bool(pretrained)), _quiet_root_errors():
            model = open_clip.create_model(model_name, pretrained=pretrained, precision="fp32", device="cpu",
                                           force_quick_gelu=quick, **model_kwargs)
    except RuntimeError as e:
        if pretrained and "Failed to download" in str(e):
            raise BackboneError(_missing_weights(model_name, pretrained, e)) from e
        if pretrained and os.path.isfile(pretrained):
            first = " ".join(str(e).splitlines()[:2])[:300]
            raise BackboneError(f"backbone.weights {pretrained} is not an open_clip checkpoint of "
                                f"{model_name}: {first}") from e
        raise
    return model.eval(), cfg, quick or bool(cfg.get("quick_gelu", False))


def timm_image_tower(cfg: dict, quick_gelu: bool, image_size: int | None = None) -> nn.Module:
    """An (uninitialised) timm ``VisionTransformer`` with the architecture of the open_clip
    config ``cfg``'s ViT image tower, at ``image_size`` (default: the config's)."""
    from timm.layers import LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    v = cfg["vision_cfg"]
    unsupported = [k for k, plain in _PLAIN_VIT.items() if v.get(k, plain) != plain]
    if v.get("block_type") not in (None, "default"):
        unsupported.append("block_type")
    if not isinstance(v.get("layers", 12), int) or unsupported:
        what = "a ResNet image tower" if not isinstance(v.get("layers", 12), int) else f"options {unsupported}"
        raise BackboneError(f"this CLIP has {what}; ptcl converts only plain ViT image towers "
                            "(class-token pooling, ln_pre, learnable position embedding)")
    native = v.get("image_size", 224)
    native = native if isinstance(native, int) else native[0]
    size, patch = image_size or native, v.get("patch_size", 16)
    if size % patch:
        raise BackboneError(f"backbone.image_size={size} is not a multiple of the patch size {patch}")
    width = v.get("width", 768)
    return VisionTransformer(
        img_size=size, patch_size=patch, embed_dim=width, depth=v.get("layers", 12),
        num_heads=width // v.get("head_width", 64), mlp_ratio=v.get("mlp_ratio", 4.0), pre_norm=True,
        norm_layer=functools.partial(LayerNorm, eps=1e-5), act_layer="quick_gelu" if quick_gelu else "gelu",
        num_classes=cfg["embed_dim"], global_pool="token", init_values=v.get("ls_init_value"),
        patch_drop_rate=v.get("patch_dropout", 0.0), weight_init="skip",
    )


def convert_visual(visual: nn.Module, vit: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip ``visual`` weights as a state dict of timm ``vit`` (timm's converter)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = checkpoint_filter_fn({f"visual.{k}": v for k, v in visual.state_dict().items()}, vit)
    return {k.replace(".ls_1.", ".ls1.").replace(".ls_2.", ".ls2."): v for k, v in sd.items()}


def build_clip(
    model_name: str,
    pretrained: str | None,
    image_size: int | None = None,
    name: str | None = None,
    seed: int = 0,
    **model_kwargs: Any,
) -> CLIPBackbone:
    """A :class:`CLIPBackbone` of open_clip model ``model_name`` with ``pretrained`` weights
    (a tag, a checkpoint path, or ``None``: random init drawn from ``torch.manual_seed(seed)``).
    ``model_kwargs`` override the open_clip config (``embed_dim``, ``vision_cfg``, ...)."""
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, cfg, quick = load_open_clip(model_name, pretrained, **model_kwargs)
        vit = timm_image_tower(cfg, quick, image_size)
    try:
        vit.load_state_dict(convert_visual(model.visual, vit), strict=True)
    except RuntimeError as e:
        raise BackboneError(f"CLIP {model_name}: the image tower does not convert to timm: "
                            f"{' '.join(str(e).splitlines()[:2])[:300]}") from e
    pre_cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    interp = pre_cfg.get("interpolation", "bicubic")
    pre = Preprocess(
        vit.patch_embed.img_size[0],
        tuple(float(x) for x in pre_cfg.get("mean", OPENAI_MEAN)),
        tuple(float(x) for x in pre_cfg.get("std", OPENAI_STD)),
        interpolation=interp if interp in ("bicubic", "bilinear") else "bicubic",
    )
    if pre_cfg.get("resize_mode", "shortest") != "shortest":
        log.info("%s: open_clip resizes with %r; ptcl resizes the short side and centre-crops",
                 model_name, pre_cfg["resize_mode"])
    text = TextTower(model, open_clip.get_tokenizer(model_name))
    del model.visual  # the image tower lives on as the timm ViT only
    label = name or f"clip {model_name}/{pretrained if pretrained else 'random'}"
    return CLIPBackbone(vit.eval(), label, int(cfg["embed_dim"]), pre, text.eval(), model_name, pretrained)


@BACKBONES.register("clip")
def build_clip_backbone(cfg: BackboneConfig) -> CLIPBackbone:
    """CLIP from open_clip: backbone.clip_model (ViT-B-16) and clip_pretrained (openai) or weights.

    Needs the network once (open_clip caches the weights)."""
    model_name = cfg.clip_model or DEFAULT_MODEL
    if cfg.weights is not None:
        pretrained: str | None = cfg.weights
    elif cfg.pretrained:
        pretrained = cfg.clip_pretrained or DEFAULT_PRETRAINED
    else:
        pretrained = None
    return build_clip(model_name, pretrained, cfg.image_size)


@BACKBONES.register("clip_tiny_test")
def build_clip_tiny_test(cfg: BackboneConfig) -> CLIPBackbone:
    """A tiny randomly initialised CLIP (embed 32, ViT 2 x 64, text 2 x 32, 32 px) for unit tests.

    Its weights come from ``torch.manual_seed(0)``, so every build is identical; nothing is
    downloaded (the tokenizer's vocabulary ships with open_clip)."""
    return build_clip(DEFAULT_MODEL, cfg.weights, cfg.image_size, name="clip_tiny_test", seed=0,
                      **copy.deepcopy(TINY_CONFIG))

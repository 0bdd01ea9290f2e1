"""Zero-shot CLIP: classify by the similarity of an image to the text of each seen class.

Radford, Kim, Hallacy, Ramesh, Goh, Agarwal, Sastry, Askell, Mishkin, Clark, Krueger,
Sutskever. "Learning Transferable Visual Models From Natural Language Supervision."
ICML 2021 (arXiv:2103.00020). Official code: https://github.com/openai/CLIP.

The class-incremental papers on CLIP report it as their training-free baseline:

* PROOF (Zhou et al., "Learning without Forgetting for Vision-Language Models", TPAMI 2025;
  https://github.com/zhoudw-zdw/PROOF ``models/zs_clip.py``): OpenCLIP ViT-B/16
  ``laion400m_e32``, the dataset's template ensemble (18 for CIFAR: ``templates: cifar``; 7
  for ImageNet-R / ObjectNet: ``imagenet_simple``), scores ``normalize(image) @ T.T``;
* ZSCL (Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
  Vision-Language Models", ICCV 2023; https://github.com/Thunderbeee/ZSCL ``cil/``, built on
  https://github.com/vgthengane/Continual-CLIP): OpenAI ViT-B/16, one template
  (``bad_photo`` for CIFAR-100 / Tiny-ImageNet, ``good_photo`` for ImageNet).

Nothing is trained. After each task the text classifier of the task's new classes is added
(:func:`ptcl.data.templates.text_classifier`: per class, the mean over templates of the
normalised text embeddings, normalised again; the text tower is frozen, so the rows of
earlier classes would come out the same), in the scenario's label order from
``ctx.class_names``. A test image's logits over the seen classes are
``logit_scale.exp() * normalize(f) @ T.T`` with ``f`` its CLIP image embedding, read from the
feature cache (one backbone pass over the data for a whole run). ``logit_scale`` (100 for
the OpenAI weights) does not change the argmax; it makes the logits CLIP's (and
Continual-CLIP's softmax inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptcl.backbones.clip import TextTower, text_tower
from ptcl.config import MethodConfig
from ptcl.data.scenario import Task
from ptcl.data.templates import TEMPLATE_SETS, resolve_templates, text_classifier
from ptcl.errors import ConfigError
from ptcl.methods.base import FEATURES, Learner
from ptcl.options import option
from ptcl.registry import METHODS


@dataclass
class ZeroShotCLIPConfig(MethodConfig):
    name: str = option("zeroshot_clip")
    templates: str | list[str] = option(
        "simple", f"prompt templates: a set name ({', '.join(TEMPLATE_SETS)}; ptcl.data.templates) or a list "
        "of strings with one {} for the class name; the classifier averages over them",
        source="CLIP (Radford et al. 2021, Sec. 3.1.4): 'A photo of a {label}.'")
    text_batch_size: int = option(64, "class names encoded per text-tower batch (memory, not results)", ge=1,
                                  source="ptcl (open_clip build_zero_shot_classifier num_classes_per_batch)")

    def __post_init__(self) -> None:
        super().__post_init__()
        resolve_templates(self.templates)  # raises a ConfigError naming method.templates


@METHODS.register("zeroshot_clip")
class ZeroShotCLIP(Learner):
    """Zero-shot CLIP (Radford et al., ICML 2021): text classifier of the seen class names, no training."""

    config_cls = ZeroShotCLIPConfig
    inputs = FEATURES
    #: the backbone of the registry-generated tests (tests/helpers.py ``tiny_overrides``)
    test_backbone = "clip_tiny_test"

    def __init__(self, cfg: ZeroShotCLIPConfig, backbone, ctx) -> None:
        super().__init__(cfg, backbone, ctx)
        text_tower(backbone, "zeroshot_clip")  # a ConfigError without one
        self.templates = resolve_templates(cfg.templates)
        names = ctx.class_names
        if ctx.scenario is not None and len(names) != ctx.scenario.num_classes:
            raise ConfigError(f"zeroshot_clip needs the name of every class; the context has {len(names)} "
                              f"names for {ctx.scenario.num_classes} classes")
        #: (seen classes, embed_dim) normalised text embeddings, row i = label i
        self.register_buffer("classifier", torch.zeros(0, self.text.embed_dim))

    @property
    def text(self) -> TextTower:
        """The backbone's text tower (a property: a second registration would put its
        weights into the learner's checkpoints)."""
        return self.backbone.text

    def before_task(self, task: Task) -> None:
        grown = torch.zeros(task.end, self.classifier.shape[1], device=self.classifier.device)
        grown[: task.start] = self.classifier[: task.start]
        self.classifier = grown

    def after_task(self, task: Task) -> None:
        names = self.ctx.class_names[task.start : task.end]
        self.classifier[task.start : task.end] = text_classifier(self.text, names, self.templates,
                                                                      self.cfg.text_batch_size).to(
            self.classifier.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.text.logit_scale.exp()
        return scale * F.normalize(x, dim=-1) @ self.classifier.T

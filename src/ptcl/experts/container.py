"""A keyed set of tuning states (experts) on one frozen backbone.

Model-mixture methods keep several parameter-efficient modules on the same pre-trained
ViT: one per task (EASE's and MOS's adapter sets) or one per role (LAE's online and
offline modules). :class:`Experts` holds them by key and switches between them without
copying the backbone:

* each expert is a :class:`~ptcl.peft.TuningHandle` attached as the child
  ``tuning_<name>`` of the backbone's timm model (name ``task<i>`` for an integer key ``i``,
  the key itself for a string), so its tensors sit in the learner's ``state_dict`` under
  ``backbone.model.tuning_<name>.*`` exactly as a directly attached module's do;
* :meth:`Experts.activate` / :meth:`Experts.only` run a block with a chosen subset active
  and every other expert bypassed; :meth:`Experts.training` is the block that trains one;
* :meth:`Experts.split_features` extracts the features of a whole selected split under one
  expert once and caches them on disk (:meth:`ptcl.data.server.DataManager.cached_features`)
  under :func:`expert_fingerprint`, a hash of the pre-trained weights and of that expert's
  weights only: an expert must stay frozen once its features are read (training it again
  through :meth:`Experts.training` drops them).

The container is a plain object, not an ``nn.Module``: the experts' parameters are owned
(and checkpointed) by the backbone, once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from ptcl.backbones.base import Backbone
from ptcl.data.server import DataManager
from ptcl.peft import TuningHandle, attach

log = logging.getLogger(__name__)

Key = int | str
"""An expert's key: a task index or a role name (``"online"``, ``"offline"``)."""


def expert_name(key: Key) -> str:
    """Name of ``key``'s tuning child (``tuning_<name>``): ``task<i>`` for an integer key."""
    return f"task{key}" if isinstance(key, int) else key


def expert_fingerprint(base: str, handle: TuningHandle) -> str:
    """Identifies the features of the backbone (pre-trained hash ``base``) run with only
    ``handle``'s tuning module active: that module's class, options and weights, not its
    name or the other experts."""
    m = handle.module
    h = hashlib.sha256(f"{base}|{type(m).__name__}|{getattr(m, 'input', '')}".encode())
    variant = (getattr(m, "site", "mlp"), getattr(m, "activation", "relu"), getattr(m, "block_ids", None))
    if variant[:2] != ("mlp", "relu") or (variant[2] is not None and variant[2] != list(range(len(variant[2])))):
        h.update(repr(variant).encode())  # adapter variants (LAE's); the plain AdaptFormer keeps its key
    h.update(repr([getattr(a, "scale", None) for a in m.modules()]).encode())
    for k, v in sorted(handle.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ExpertForward(nn.Module):
    """``backbone`` with only the experts ``keys`` active (what the feature cache runs)."""

    def __init__(self, backbone: Backbone, experts: Experts, keys: Sequence[Key]) -> None:
        super().__init__()
        self.backbone, self.experts, self.keys = backbone, experts, list(keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.experts.activate(self.keys):
            return self.backbone(x)


class Experts(Mapping[Key, TuningHandle]):
    """Tuning states by key (insertion order) on one frozen ``backbone``; ``data`` serves
    the splits whose per-expert features :meth:`split_features` caches."""

    def __init__(self, backbone: Backbone, data: DataManager) -> None:
        self.backbone, self.data = backbone, data
        self._handles: dict[Key, TuningHandle] = {}
        self._features: dict[tuple[str, Key], torch.Tensor] = {}
        self._base = backbone.fingerprint()

    # -- the mapping ---------------------------------------------------------------------
    def __getitem__(self, key: Key) -> TuningHandle:
        return self._handles[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, key: Key, method: str, **opts: Any) -> TuningHandle:
        """Attach a new expert (tuning ``method`` of :data:`ptcl.peft.PEFT_METHODS` with
        ``opts``) under ``key``, frozen. Raises ``ValueError`` for a key already held and
        :class:`~ptcl.errors.ConfigError` for unknown options (:func:`ptcl.peft.attach`)."""
        if key in self._handles:
            raise ValueError(f"an expert with key {key!r} already exists; keys: {list(self._handles)}")
        handle = attach(self.backbone.model, method, name=expert_name(key), **opts)
        handle.module.requires_grad_(False)
        self._handles[key] = handle
        return handle

    # -- which experts are active ------------------------------------------------------------
    @contextmanager
    def activate(self, keys: Iterable[Key]) -> Iterator[None]:
        """Within the block only the experts ``keys`` are active; every other one is bypassed
        (tuning modules not held here are left as they are). Raises ``KeyError`` for an
        unknown key."""
        keep = set(keys)
        unknown = keep - set(self._handles)
        if unknown:
            raise KeyError(f"no expert {sorted(map(str, unknown))}; keys: {list(self._handles)}")
        with ExitStack() as stack:
            for key, handle in self._handles.items():
                if key not in keep:
                    stack.enter_context(handle.disabled())
            yield

    def only(self, key: Key) -> AbstractContextManager[None]:
        """Within the block only expert ``key`` is active."""
        return self.activate([key])

    @contextmanager
    def training(self, key: Key) -> Iterator[TuningHandle]:
        """Train expert ``key``: within the block it alone is active and its parameters
        require gradients; afterwards it is frozen again and its cached features dropped."""
        handle = self._handles[key]
        handle.module.requires_grad_(True)
        try:
            with self.only(key):
                yield handle
        finally:
            handle.module.requires_grad_(False)
            for split_key in [k for k in self._features if k[1] == key]:
                del self._features[split_key]

    # -- weights -----------------------------------------------------------------------------
    def parameters_of(self, key: Key) -> dict[str, nn.Parameter]:
        """Expert ``key``'s parameters by name (the live tensors: what an in-place merge such
        as :func:`ptcl.experts.merge.ema_` updates)."""
        return dict(self._handles[key].module.named_parameters())

    def fingerprint(self, key: Key) -> str:
        """:func:`expert_fingerprint` of expert ``key`` on this backbone."""
        return expert_fingerprint(self._base, self._handles[key])

    # -- features ----------------------------------------------------------------------------
    def split_features(self, split: str, key: Key) -> torch.Tensor:
        """Features (``N x D``) of the whole selected ``split`` with only expert ``key``
        active (eval transform): extracted once, cached on disk and kept in memory."""
        if (split, key) not in self._features:
            forward = ExpertForward(self.backbone, self, [key]).eval()
            self._features[split, key] = self.data.cached_features(split, forward, self.fingerprint(key))
        return self._features[split, key]

    def features(
        self, split: str, classes: Sequence[int] | range, keys: Sequence[Key] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the samples of ``classes`` in ``split`` under each expert of ``keys``
        (default: all, in order), concatenated -> ``(n, len(keys) * D)``, and their labels
        ``(n,)``."""
        keys = list(self) if keys is None else list(keys)
        pos = torch.from_numpy(self.data.positions(split, classes))
        feats = torch.cat([self.split_features(split, k)[pos] for k in keys], 1)
        return feats, self.data.labels(split, classes)

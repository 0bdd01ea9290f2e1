"""Per-run data access for learners: images and cached frozen features by task."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ptcl import dist
from ptcl.backbones.base import Backbone
from ptcl.backbones.transforms import DEFAULT_AUGMENT, Augment
from ptcl.data.base import DatasetSplits, ImageSet
from ptcl.data.features import FeatureCache, extract_features
from ptcl.data.loading import DeviceLoader, InputTimer, loader_workers, resolve_num_workers
from ptcl.data.scenario import Scenario, subset_per_class
from ptcl.errors import DataError
from ptcl.precision import cache_parts, check_precision
from ptcl.seeding import SeededItems, SeededSampler, isolated_rng

SPLITS = ("train", "test")


class TaskImages(Dataset):
    """Images of an :class:`ImageSet` at ``indices`` with remapped ``labels``."""

    def __init__(
        self, images: ImageSet, indices: np.ndarray, labels: np.ndarray, transform, augmented: bool = False
    ) -> None:
        self.images, self.indices, self.labels, self.transform = images, indices, labels, transform
        self.augmented = augmented  # the transform draws random numbers (train augmentation)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.load(int(self.indices[i]))), int(self.labels[i])


class _WithFeatures(Dataset):
    def __init__(self, images: TaskImages, feats: torch.Tensor) -> None:
        self.images, self.feats = images, feats
        self.augmented = images.augmented

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        x, y = self.images[i]
        return (x, self.feats[i]), y


class _Pretrained(torch.nn.Module):
    """The backbone's pre-trained forward (:meth:`Backbone.pretrained`), as a module."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.checked = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if not self.checked:  # the weights are hashed once
            if bb.state_fingerprint(skip_tuning=True) != bb.fingerprint():
                raise DataError(
                    f"the pre-trained features are not in the feature cache and the weights of "
                    f"{bb.name} have already changed (full fine-tuning), so they cannot be computed "
                    "again; resume with the original run's feature cache (PTCL_CACHE_DIR), or start "
                    "the run again"
                )
            self.checked = True
        with bb.pretrained(check=False):
            return bb(x)


class DataManager:
    """Selects samples by task and serves images or frozen features for them.

    Sample selection: the per-class subset of each split (``train_per_class``,
    ``test_per_class``, drawn with ``subset_seed``, default ``seed``) and labels remapped
    by the scenario's class order.
    Frozen features of the whole selected split are computed once (one backbone pass)
    and cached on disk; learners then slice them by task. ``precision`` (``fp32`` or
    ``bf16``, :mod:`ptcl.precision`) is that of the extraction's forwards; the features are
    stored as float32 either way, under keys that differ by precision.

    Images are decoded, cropped and resized in ``num_workers`` loader processes (an integer,
    or ``"auto"``: :func:`~ptcl.data.loading.resolve_num_workers`) into uint8 tensors and
    normalised on ``device`` (:class:`~ptcl.data.loading.DeviceLoader`).
    """

    on_device: bool = True
    """Serve uint8 images normalised on the device (bit-identical to the float transform;
    ``False``: ``ToTensor`` + ``Normalize`` per image in the loader, the path before issue 14,
    kept for ``benchmarks/bench_input_pipeline.py``)."""

    def __init__(
        self,
        splits: DatasetSplits,
        scenario: Scenario,
        per_class: dict[str, int | None],
        seed: int,
        backbone: Backbone,
        cache: FeatureCache,
        device: torch.device,
        batch_size: int = 64,
        num_workers: int | str = 0,
        quiet: bool = False,
        subset_seed: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self.splits, self.scenario, self.seed = splits, scenario, seed
        self.backbone, self.cache, self.device = backbone, cache, device
        self.batch_size, self.num_workers, self.quiet = batch_size, resolve_num_workers(num_workers), quiet
        self.timer = InputTimer()  # data wait vs compute of this task's fits and extractions (ptcl.data.loading)
        self.precision = check_precision(precision)  # of feature extraction (ptcl.precision)
        lm = scenario.label_map
        self.index: dict[str, np.ndarray] = {}
        self.label: dict[str, np.ndarray] = {}
        for s in SPLITS:
            imgs = self.imageset(s)
            idx = subset_per_class(imgs.targets, per_class.get(s), seed if subset_seed is None else subset_seed)
            self.index[s] = idx
            self.label[s] = lm[imgs.targets[idx]]
        self._frozen: dict[str, torch.Tensor] = {}
        self.augment: Augment = DEFAULT_AUGMENT
        """The train augmentation of :meth:`images` with ``train_transform`` (the runner sets
        the method's: ``method.augment``, ``crop_scale``, ``brightness``)."""

    def imageset(self, split: str) -> ImageSet:
        return getattr(self.splits, split)

    def positions(self, split: str, classes: Sequence[int] | range) -> np.ndarray:
        """Positions (within the selected subset) of samples whose label is in ``classes``."""
        return np.flatnonzero(np.isin(self.label[split], np.asarray(list(classes))))

    def images(self, split: str, classes: Sequence[int] | range, train_transform: bool = False) -> TaskImages:
        return self.images_at(split, self.positions(split, classes), train_transform)

    def images_at(self, split: str, positions: np.ndarray, train_transform: bool = False) -> TaskImages:
        """The samples at ``positions`` (within the selected subset of ``split``, as
        :meth:`positions` returns them, e.g. an exemplar memory's) with their remapped labels.
        Items are ``(uint8 (3, H, W) image, label)``, served for :meth:`loader` to normalise on
        the device (:attr:`on_device`; :meth:`Backbone.normalize` does it for a batch by hand)."""
        tf = self.backbone.transform(train=train_transform, augment=self.augment, on_device=self.on_device)
        return TaskImages(self.imageset(split), self.index[split][positions], self.label[split][positions], tf,
                          train_transform and self.augment.random)

    def images_with_features(
        self, split: str, classes: Sequence[int] | range, train_transform: bool = False
    ) -> Dataset:
        """Like :meth:`images`, but each item is ``((image, frozen_feature), label)``: the
        cached pre-trained feature of the same image (eval transform), e.g. the query of
        prompt-pool methods, so training needs no extra backbone pass."""
        pos = self.positions(split, classes)
        return _WithFeatures(self.images(split, classes, train_transform),
                             self.frozen_features(split)[torch.from_numpy(pos)])

    def labels(self, split: str, classes: Sequence[int] | range) -> torch.Tensor:
        return torch.from_numpy(self.label[split][self.positions(split, classes)])

    def frozen_features(self, split: str) -> torch.Tensor:
        """Pre-trained backbone features of the whole selected split (cached).

        On a cache miss they are computed with every attached tuning module bypassed; if
        the pre-trained weights themselves have changed (full fine-tuning), the true
        pre-trained features cannot be computed any more and this raises instead of
        caching wrong features under the pre-trained key.
        """
        if split not in self._frozen:
            self._frozen[split] = self.cached_features(
                split, _Pretrained(self.backbone), self.backbone.fingerprint()
            )
        return self._frozen[split]

    def cached_features(self, split: str, forward: torch.nn.Module, fingerprint: str) -> torch.Tensor:
        """Features of the selected split under ``forward`` (eval transform), cached on disk
        under ``fingerprint`` (which must identify ``forward``'s weights exactly)."""
        parts = {
            "model": fingerprint,
            "dataset": self.imageset(split).fingerprint,
            "split": split,
            "transform": repr(self.backbone.transform(train=False)),
            "subset": self.index[split],
            **cache_parts(self.precision),  # nothing for fp32: its keys stay as they were
        }
        ds = TaskImages(self.imageset(split), self.index[split], self.label[split],
                        self.backbone.transform(False, on_device=self.on_device))

        def compute() -> torch.Tensor:
            was_training = forward.training
            forward.eval()
            try:
                with isolated_rng():  # a cache miss must not advance the learner's random stream
                    return extract_features(
                        forward, ds, self.batch_size, self.num_workers, self.device,
                        desc=f"features[{split}]", quiet=self.quiet, precision=self.precision,
                        preprocess=self.backbone.preprocess, timer=self.timer,
                    )
            finally:
                forward.train(was_training)

        return self.cache.get_or_compute(parts, compute, write=dist.is_main())

    def features(self, split: str, classes: Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features and remapped labels of ``classes`` in ``split``."""
        pos = self.positions(split, classes)
        return self.frozen_features(split)[torch.from_numpy(pos)], torch.from_numpy(self.label[split][pos])

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
               shard: bool = True) -> DataLoader:
        """A DataLoader whose randomness comes from ``run seed + seed`` only.

        The order is drawn from its own generator. A dataset with random augmentation
        (``dataset.augmented``) is served through :class:`~ptcl.seeding.SeededSampler`: each
        item carries a seed from the same generator and is transformed with it, so the
        augmentation neither reads nor advances the global generators and is the same for
        any ``num_workers``. Batches arrive with their images on :attr:`device`, normalised
        (:class:`~ptcl.data.loading.DeviceLoader`); the loader carries the run's
        :attr:`timer` for :func:`~ptcl.train.loop.fit`.

        Under torchrun (several ranks) each rank serves its slice of every batch of the
        single-process order (:func:`ptcl.dist.loader_kwargs`): the training loaders, whose
        gradients :func:`~ptcl.train.loop.fit` averages. ``shard=False`` serves every rank
        the whole data (statistics a method computes itself from a loader).
        """
        g = torch.Generator().manual_seed(self.seed + seed)
        served = {"device": self.device, "preprocess": self.backbone.preprocess,
                  "num_workers": loader_workers(self.num_workers, len(dataset))}  # type: ignore[arg-type]
        if getattr(dataset, "augmented", False):
            loader = DeviceLoader(
                SeededItems(dataset), generator=g, **served,
                **dist.loader_kwargs(len(dataset), batch_size, drop_last, sampler=SeededSampler(dataset, shuffle, g),
                                     shard_=shard),
            )
        else:
            loader = DeviceLoader(dataset, generator=g, **served,
                                  **dist.loader_kwargs(len(dataset), batch_size, drop_last, shuffle, shard_=shard))
        loader.timer = self.timer  # fit adds its data wait / compute split (ptcl.train.loop)
        return loader

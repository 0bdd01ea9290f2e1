"""Classifier alignment shared by SLCA and MOS (:mod:`ptcl.methods.alignment`)."""

from __future__ import annotations

import dataclasses

import torch
from helpers import make_learner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptcl.heads.class_statistics import cholesky_factors
from ptcl.methods.alignment import ClassLabels, classifier_alignment, sampling_factors


def test_class_labels_serve_what_the_loop_reads():
    ds = ClassLabels.repeat(3, 2)
    assert len(ds) == 6 and [int(ds[i][0]) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert all(int(x) == int(y) for x, y in (ds[i] for i in range(6)))
    labels = torch.arange(3).repeat_interleave(2)  # the former TensorDataset(labels, labels)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    old = list(DataLoader(TensorDataset(labels, labels), batch_size=4, shuffle=True, generator=g1))
    new = list(DataLoader(ds, batch_size=4, shuffle=True, generator=g2))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for p, q in zip(old, new) for a, b in zip(p, q))


def test_sampling_factors_of_covariances_and_variances():
    var = torch.tensor([[1.0, 4.0], [9.0, 0.25]])
    torch.testing.assert_close(sampling_factors(var), torch.diag_embed(var.sqrt()))
    covs = torch.diag_embed(var) + 0.1
    assert torch.equal(sampling_factors(covs), cholesky_factors(covs))


def test_alignment_samples_every_class_from_its_stream_and_transforms_logits(tmp_path):
    learner, _ = make_learner(tmp_path, "mos", {"method.ca_epochs": 2})
    d = 8
    means, var = 4 * torch.eye(3, d), torch.full((3, d), 0.01)
    train = dataclasses.replace(learner.cfg, lr=0.5, epochs=2, batch_size=10)

    def run(stream: str) -> tuple[nn.Linear, list[torch.Tensor], list[int]]:
        torch.manual_seed(0)
        head, seen, transformed = nn.Linear(d, 3), [], []
        head.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
        classifier_alignment(learner, head, means, var, 20, train, stream=stream, task=1, seed=7,
                             desc="test", logits=lambda z: transformed.append(len(z)) or z)
        return head, seen, transformed

    head, seen, transformed = run("a")
    x = torch.cat(seen)
    assert len(x) == 2 * 3 * 20 and sum(transformed) == len(x)
    nearest = torch.cdist(x, means).argmin(1)
    assert torch.bincount(nearest, minlength=3).tolist() == [40, 40, 40]
    assert (head(means).argmax(1) == torch.arange(3)).all()
    again, seen_again, _ = run("a")
    assert torch.equal(again.weight, head.weight) and torch.equal(torch.cat(seen_again), x)
    _, other, _ = run("b")
    assert not torch.equal(torch.cat(other), x)  # another stream, other samples

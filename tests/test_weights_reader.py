"""One safe reader for local weight files (ptcl.io.read_state_dict), used by every backbone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ptcl.backbones import build_backbone
from ptcl.config import BackboneConfig
from ptcl.errors import BackboneError
from ptcl.io import read_state_dict


def test_reads_safetensors_and_unwraps_a_torch_state_dict(tmp_path):
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        got = read_state_dict(tmp_path / name)
        assert sorted(got) == ["a", "b"] and all(torch.equal(got[k], sd[k]) for k in sd)


def test_bad_files_are_one_backbone_error(tmp_path):
    with pytest.raises(BackboneError, match="backbone.weights .* does not exist"):
        read_state_dict(tmp_path / "nope.pt", "backbone.weights")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "ints.pt")
    with pytest.raises(BackboneError, match="state_dict of tensors"):
        read_state_dict(tmp_path / "ints.pt")


def test_timm_backbones_read_through_it(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read backbone.weights"):
        build_backbone(BackboneConfig(name="vit_tiny_test", weights=str(tmp_path / "junk.pt")))
    ref = build_backbone(BackboneConfig(name="vit_tiny_test"))
    torch.save({"state_dict": ref.model.state_dict()}, tmp_path / "w.pth")
    bb = build_backbone(BackboneConfig(name="vit_tiny_test", weights=str(tmp_path / "w.pth")))
    assert bb.fingerprint() == ref.fingerprint()

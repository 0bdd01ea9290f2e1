"""Refactors keep results: every registered method reproduces its golden checkpoint.

The golden files are written by ``python tests/golden/record_golden.py`` (see its docstring)
from the code before a refactor. On the platform that recorded them (CPU model, torch and
NumPy versions) every tensor of the final checkpoint must be bit-identical and the accuracy
matrix equal; elsewhere (another CPU may round differently) the tensors' sums and norms must
agree to 1e-3 relative. A result changed on purpose is re-recorded in the same commit, and
the commit says which and why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import ptcl
from ptcl.io import load_tensors

GOLDEN = Path(__file__).resolve().parent / "golden"

CHANGED_ON_PURPOSE = {
    "l2p": "issue 11: prompts and keys U(-1, 1) and batch-wise selection while training, as the "
           "official code (prompt_init=uniform01 batchwise_train=false reproduced the earlier record)",
    "slca": "issue 11: the official fresh final LayerNorm (fresh_norm; eps 1e-5, trained at the "
            "backbone lr); fresh_norm=false keeps the pre-trained one",
}
"""Methods whose golden record was re-recorded after a change of results on purpose (named in
the assertion message when the record differs again)."""
TINY = json.loads((GOLDEN / "tiny_methods.json").read_text())


def _record():
    import importlib.util

    spec = importlib.util.spec_from_file_location("record_golden", GOLDEN / "record_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RECORD = _record()
SAME_PLATFORM = RECORD.platform_key() == TINY["platform"]


def test_every_registered_method_has_a_golden_record():
    assert sorted(TINY["methods"]) == ptcl.METHODS.names()


@pytest.mark.parametrize("name", sorted(TINY["methods"]))
def test_method_reproduces_its_golden_checkpoint(name, tmp_path):
    want = TINY["methods"][name]
    m = ptcl.run(None, RECORD.tiny_overrides(name), out=tmp_path / "run", quiet=True)
    got = load_tensors(tmp_path / "run" / "checkpoints" / f"task_{m['num_tasks'] - 1:03d}.safetensors")
    assert sorted(got) == sorted(want["tensors"]), "the checkpoint holds other tensors"
    for key, w in want["tensors"].items():
        g = RECORD.tensor_digest(got[key])
        assert (g["shape"], g["dtype"]) == (w["shape"], w["dtype"]), key
        if SAME_PLATFORM:
            assert g["sha256"] == w["sha256"], (
                f"{name}: {key} differs (sum {g['sum']} vs {w['sum']}); last recorded change: "
                f"{CHANGED_ON_PURPOSE.get(name, 'none')}")
        else:
            for stat in ("sum", "norm"):
                assert math.isclose(g[stat], w[stat], rel_tol=1e-3, abs_tol=1e-4), (name, key, stat)
    if SAME_PLATFORM:
        assert m["accuracy_matrix"] == want["accuracy_matrix"]

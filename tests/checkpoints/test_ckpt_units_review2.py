"""Second review of checkpoint loading, units and distances: defects found, one test each.

1. A torch zip checkpoint whose pickle record was damaged on disk (bit rot, a bad copy) was
   refused as a file that "would run code": torch's weights-only unpickler stops at the broken
   GLOBAL and names what is left of it (`torch._utils.`), and that name was reported as the
   code the pickle asks for. The zip record's CRC-32 says the bytes are not what was written,
   so the message must say corrupt, not hostile (a user told "this file runs code" deletes a
   good run's directory, or worse, trusts a re-download blindly).
2. A model with tied weights saved with `safetensors.torch.save_model` (the way safetensors
   saves shared tensors: `save_file` refuses them and says to use `save_model`) holds each
   tied tensor under one of its names only. The checkpoint is complete, yet validation
   refused it ("missing keys: b.weight"): every name of one tensor must be served from the
   name the file has.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.distances import distances
from layerfast.errors import LayerfastError
from layerfast.units import make_units
from layerfast.variants import make_variants
from tests.checkpoints.test_checkpoints import Tiny, sd_at

# ------------------------------------------------------------------ 1. a damaged pickle record


def test_a_damaged_pickle_record_is_called_corrupt_not_code(tmp_path: Path) -> None:
    """Zeroed bytes inside `data.pkl` (the name of torch's own tensor-rebuild helper) are
    damage the record's CRC-32 detects, not a request for code."""
    torch.save(sd_at(0), tmp_path / "e0.pt")
    buf = io.BytesIO()
    torch.save(sd_at(1), buf)
    raw = bytearray(buf.getvalue())
    i = raw.index(b"_rebuild_tensor_v2")
    raw[i : i + len(b"_rebuild_tensor_v2")] = bytes(len(b"_rebuild_tensor_v2"))
    (tmp_path / "e1.pt").write_bytes(bytes(raw))
    with pytest.raises(LayerfastError) as info:
        CheckpointDir(tmp_path).validate(Tiny().state_dict())
    msg = str(info.value)
    assert "e1.pt" in msg and "corrupt" in msg, msg
    assert "run code" not in msg, msg


# ------------------------------------------------------------------ 2. tied weights, one name


class TiedPair(nn.Module):
    """`b` shares `a`'s weight (tied), as encoder/decoder embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _tied_dir(tmp_path: Path) -> tuple[Path, dict[int, TiedPair]]:
    models = {}
    for tau in (0, 1):
        torch.manual_seed(10 + tau)
        m = TiedPair()
        save_model(m, str(tmp_path / f"epoch_{tau}.safetensors"))
        models[tau] = m
    return tmp_path, models


def test_save_model_drops_one_name_of_a_tied_tensor(tmp_path: Path) -> None:
    """The premise: the file holds `a.weight` and not `b.weight`."""
    from safetensors import safe_open

    path, _ = _tied_dir(tmp_path)
    with safe_open(str(path / "epoch_0.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "a.weight" in keys and "b.weight" not in keys


def test_a_tied_checkpoint_saved_under_one_name_validates_and_loads(tmp_path: Path) -> None:
    path, models = _tied_dir(tmp_path)
    model = TiedPair()
    ck = CheckpointDir(path)
    ck.validate(model.state_dict())  # used to raise: missing keys (1): b.weight
    got = ck.tensors(1)
    assert torch.equal(got["b.weight"], models[1].a.weight.detach())
    assert torch.equal(got["a.weight"], models[1].a.weight.detach())
    model.load_state_dict(got)
    assert torch.equal(model.b.weight, models[1].a.weight)


def test_variants_and_distances_of_a_tied_checkpoint(tmp_path: Path) -> None:
    """The same directory through the Python API's own validation (shape-only references)."""
    path, models = _tied_dir(tmp_path)
    model = TiedPair()
    units = make_units(model)
    variants = make_variants(model, units, CheckpointDir(path), reset=("reinit",))
    (v,) = [v for v in variants if v.unit == "b" and v.checkpoint == 0]
    assert torch.equal(v.overrides()["b.weight"], models[0].a.weight.detach())
    table = distances(model, units, CheckpointDir(path))
    row = table[(table.unit == "b") & (table.checkpoint.astype(str) == "1")]
    d = torch.cat([
        (models[1].a.weight - models[0].a.weight).detach().double().flatten(),
        (models[1].b.bias - models[0].b.bias).detach().double().flatten(),
    ])
    assert float(row.l2.iloc[0]) == pytest.approx(float(d.norm()), rel=1e-12)

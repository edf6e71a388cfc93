"""A `CheckpointDir` that passed the NaN/Inf check against one model must check again against
a model of the same keys in a narrower dtype (session 25, from the checkpoint mutation review).

The check reads each tensor as the model will hold it: a float64 1e300 is finite for a float64
model and Inf once loaded into a float32 one. The files that passed were remembered by label
alone, so validating the same object against the float32 model reused the float64 verdict and
the Inf weight went through unreported (the key set, the only thing compared, was the same).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_the_same_object_checks_again_for_a_narrower_model(tmp_path: Path, suffix: str) -> None:
    from safetensors.torch import save_file

    sd = {"w": torch.tensor([1.0, 1e300], dtype=torch.float64)}
    path = tmp_path / f"e_0{suffix}"
    (save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path))
    ck = CheckpointDir(tmp_path)
    ck.validate({"w": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(LayerfastError, match=r"NaN or Inf weights: e_0"):
        ck.validate({"w": torch.zeros(2, dtype=torch.float32)})
    ck.validate({"w": torch.zeros(2, dtype=torch.float64)})  # and finite again for float64


def test_a_passed_file_is_not_read_again_for_the_same_model(tmp_path: Path, monkeypatch) -> None:
    """The memo still works: the same reference twice reads each tensor once."""
    torch.save({"w": torch.ones(3), "b": torch.ones(2)}, tmp_path / "e_0.pt")
    ck = CheckpointDir(tmp_path)
    ref = {"w": torch.zeros(3), "b": torch.zeros(2)}
    ck.validate(ref)
    opened = ck._open(0)
    calls: list[str] = []
    real = type(opened).all_finite

    def counting(self, key, dtype=None):
        calls.append(key)
        return real(self, key, dtype)

    monkeypatch.setattr(type(opened), "all_finite", counting)
    ck.validate(ref)
    assert calls == []

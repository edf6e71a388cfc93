"""`layerfast.train` trains in fp32, as its docstring says, whatever the caller's global default
dtype: a `torch.set_default_dtype(torch.float64)` earlier in a notebook built the model in
float64, which then trained and saved float64 checkpoints (the manifest records no dtype)."""

from __future__ import annotations

from pathlib import Path

import torch

from layerfast.train import train


def _run(out: Path) -> dict:
    return train("fcn1x4", "digits", 1, out, max_samples=40, progress=False, device="cpu")


def test_float64_default_still_trains_fp32(tmp_path):
    ref = _run(tmp_path / "ref")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        man = _run(tmp_path / "run")
        assert torch.get_default_dtype() is torch.float64  # the caller's default is put back
    finally:
        torch.set_default_dtype(before)
    for name in ("epoch_000.pt", "epoch_001.pt"):
        got = torch.load(tmp_path / "run" / name, weights_only=True)
        want = torch.load(tmp_path / "ref" / name, weights_only=True)
        assert {k: v.dtype for k, v in got.items()} == dict.fromkeys(got, torch.float32)
        assert all(torch.equal(got[k], want[k]) for k in want)  # the same run, bit for bit
    assert [c["test_error"] for c in man["checkpoints"]] == [
        c["test_error"] for c in ref["checkpoints"]]


def test_a_float64_factory_still_trains_in_float64(tmp_path):
    """The fix sets the default dtype only: a model its factory makes float64 keeps it (its
    inputs follow the model's dtype, as in analyze)."""
    def net(num_classes: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes)).double()

    train(net, "digits", 1, tmp_path / "run", max_samples=40, progress=False, device="cpu")
    sd = torch.load(tmp_path / "run" / "epoch_001.pt", weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.float64}

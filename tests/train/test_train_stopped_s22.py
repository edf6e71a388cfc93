"""A run that wrote checkpoints and then stopped on an exception other than a LayerfastError
(CUDA out of memory, a failing backward) left no `"stopped"` in its manifest: analysing its
checkpoints said only "interrupted or diverged". Any exception is now kept, as its type and
the first line of its message; a LayerfastError's message as it is."""

from __future__ import annotations

import json

import pytest
import torch

from layerfast.checkpoints import CheckpointDir
from layerfast.train import train


def _failing_step(monkeypatch, exc: Exception, at: int) -> None:
    """SGD's `at`-th step raises `exc` (200 samples are two steps an epoch: the 3rd step is in
    epoch 2, after epoch 1's checkpoint and manifest)."""
    real, calls = torch.optim.SGD.step, [0]

    def step(self, *a, **k):
        calls[0] += 1
        if calls[0] == at:
            raise exc
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)


@pytest.mark.parametrize("exc,stopped", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\n"
                            "If reserved but unallocated memory is large try setting ..."),
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."),
    (RuntimeError(""), "RuntimeError"),
])
def test_any_exception_is_kept_as_its_type_and_first_line(tmp_path, monkeypatch, exc,
                                                         stopped) -> None:
    _failing_step(monkeypatch, exc, 3)
    with pytest.raises(type(exc)):
        train("fcn2x16", "digits", 2, tmp_path, max_samples=200, progress=False)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["complete"] is False and [c["epoch"] for c in man["checkpoints"]] == [0, 1]
    assert man["stopped"] == stopped
    assert f"it stopped: {stopped}" in CheckpointDir(tmp_path).incomplete


def test_an_interrupt_is_left_to_the_default(tmp_path, monkeypatch) -> None:
    _failing_step(monkeypatch, KeyboardInterrupt(), 3)
    with pytest.raises(KeyboardInterrupt):
        train("fcn2x16", "digits", 2, tmp_path, max_samples=200, progress=False)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["complete"] is False and "stopped" not in man
    assert "it was interrupted or diverged" in CheckpointDir(tmp_path).incomplete

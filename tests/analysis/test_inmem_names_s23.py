"""Errors about in-memory inputs name them as the caller passed them (session 23, found by
running the README's notebook example as a new user).

Defect: `layerfast.analyze(Net, states, data=(x, y))` on test labels that miss a class (the
case the README answers with `data=(x, y, num_classes)`) failed with a shape mismatch between
"checkpoints in /tmp/layerfast-inputs-<uid>/<sha256>" and a model "built for 9 classes, the
largest label of '/tmp/layerfast-inputs-<uid>/<sha256>/data.npz' (test) + 1": temp files the
caller never made, and no word of the third element that fixes it. Now the message says
`data (x, y)` and "the in-memory state dicts", and names `data=(x, y, num_classes)`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import layerfast
from layerfast.errors import LayerfastError
from tests.analysis.test_inmem_s19 import _own_tempdir  # noqa: F401 - autouse: inputs under tmp_path

ARGS = {"device": "cpu", "progress": False, "figures": False, "quiet": True}


class Net(nn.Module):
    """The README's notebook model."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _states() -> dict[int, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {0: Net().state_dict(), 1: Net().state_dict()}


def test_labels_missing_a_class_name_the_fix_not_temp_files(tmp_path: Path) -> None:
    x = torch.randn(40, 64)
    y = torch.arange(40) % 9  # class 9 never appears: the head is built for 9 classes
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze(Net, _states(), data=(x, y), out=tmp_path / "a", **ARGS)
    msg = str(info.value)
    assert "built for 9 classes" in msg
    assert "layerfast-inputs" not in msg and "data.npz" not in msg, msg
    assert "the largest label of data (x, y)" in msg
    assert "checkpoints in the in-memory state dicts do not match" in msg
    assert "pass data=(x, y, num_classes)" in msg
    assert "\n" not in msg
    # the fix the message names works
    res = layerfast.analyze(Net, _states(), data=(x, y, 10), out=tmp_path / "b", **ARGS)
    assert res.run["num_classes"] == 10


def test_given_num_classes_is_not_advised_again(tmp_path: Path) -> None:
    """With num_classes given, a head mismatch is the state dicts' own: no advice to pass it.
    (Session 24: the 12 given was said to be "the largest label of data (x, y) (test) + 1";
    it is "passed as num_classes", test_class_count_s24.)"""
    x, y = torch.randn(40, 64), torch.arange(40) % 10
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze(Net, _states(), data=(x, y, 12), out=tmp_path / "a", **ARGS)
    msg = str(info.value)
    assert "layerfast-inputs" not in msg and "passed as num_classes" in msg, msg
    assert "pass data=(x, y, num_classes)" not in msg


def test_files_are_still_named_by_their_paths(tmp_path: Path) -> None:
    """Only in-memory inputs are renamed: a checkpoint directory the user made keeps its path."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for tau, sd in _states().items():
        torch.save(sd, folder / f"epoch_{tau}.pt")
    x, y = torch.randn(40, 64), torch.arange(40) % 9
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze(Net, folder, data=(x, y), out=tmp_path / "a", **ARGS)
    msg = str(info.value)
    assert f"checkpoints in {folder} do not match" in msg and "data (x, y)" in msg, msg
    assert "pass data=(x, y, num_classes)" in msg

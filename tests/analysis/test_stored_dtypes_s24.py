"""The stored-dtype warning judges each tensor against the model tensor it loads into
(session 24).

Defect: for a model that mixes bfloat16 and float32 tensors, the warning compared every stored
dtype with the model's widest (float32): bfloat16 files were said to be "cast to the model's
float32", untrue of the model's own bfloat16 tensors, which they feed as they are; and files
saved from that very model (float32 and bfloat16, each as the model holds it) were warned about
although nothing is rounded. Now the warning names the tensors that are rounded, and the dtype
they are cast to; a file that matches the model's dtypes is not warned about.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import layerfast

ARGS = {"device": "cpu", "progress": False, "figures": False, "reset": "reinit", "quiet": True}


class Mixed(nn.Module):
    """fc1 in float32, fc2 (the head) in bfloat16."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, num_classes).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))).bfloat16()).float()


def _run(tmp_path: Path, dtype: torch.dtype | None) -> list[str]:
    """The dtype warnings of an analysis of two Mixed checkpoints, stored in `dtype` (None:
    each tensor as the model holds it)."""
    torch.manual_seed(0)
    folder = tmp_path / "ck"
    folder.mkdir()
    for tau in (0, 1):
        sd = Mixed().state_dict()
        torch.save({k: v if dtype is None else v.to(dtype) for k, v in sd.items()},
                   folder / f"epoch_{tau}.pt")
    x, y = torch.randn(40, 64), torch.arange(40) % 10
    res = layerfast.analyze(Mixed, folder, data=(x, y), out=tmp_path / "out", **ARGS)
    return [w for w in res.run["warnings"] if "analysed as stored" in w]


def test_bfloat16_files_of_a_mixed_model_name_what_is_cast(tmp_path: Path) -> None:
    said = _run(tmp_path, torch.bfloat16)
    assert said == [
        "epoch_0.pt, epoch_1.pt store weights in bfloat16 that the model holds in float32 "
        "(2 of its 4 floating tensors: fc1.weight, fc1.bias): they are analysed as stored "
        "(rounded), cast to the model's float32; run.json's checkpoint_dtypes says which file "
        "holds what"
    ], said


def test_files_that_hold_the_models_own_dtypes_are_not_warned_about(tmp_path: Path) -> None:
    assert _run(tmp_path, None) == []


def test_float64_files_of_a_mixed_model_are_not_warned_about(tmp_path: Path) -> None:
    """Wider than every model tensor: nothing is rounded that the model would hold finer."""
    assert _run(tmp_path, torch.float64) == []

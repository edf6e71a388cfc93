"""Warnings and shape errors name in-memory state dicts as the caller passed them (session 24).

Defect: session 23 made errors say "the in-memory state dicts" and "data (x, y)" instead of
the temp folder and .npz `layerfast.inputs` writes, but each state dict was still named by its
temp file: "epoch_0.pt, epoch_1.pt store weights in bfloat16" (a warning, which the rename
never reached) and "epoch_1.pt: shape mismatches ... (epoch_0.pt fit the model, so the other
files were saved from a different model)". Files the caller never made. Now each is "state
dict τ=<its key>", on stderr, in run.json's warnings and in errors alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import layerfast
from layerfast.errors import LayerfastError
from tests.analysis.test_inmem_names_s23 import Net, _states
from tests.analysis.test_inmem_s19 import _own_tempdir  # noqa: F401 - autouse: inputs under tmp_path

ARGS = {"device": "cpu", "progress": False, "figures": False, "reset": "reinit"}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(40, 64), torch.arange(40) % 10


def test_a_warning_names_the_state_dicts_by_their_tau(tmp_path: Path, capsys) -> None:
    narrow = {t: {k: v.bfloat16() for k, v in sd.items()} for t, sd in _states().items()}
    res = layerfast.analyze(Net, narrow, data=_data(), out=tmp_path / "a", **ARGS)
    err = capsys.readouterr().err
    said = [w for w in res.run["warnings"] if "bfloat16" in w]
    assert len(said) == 1, res.run["warnings"]
    assert said[0].startswith("state dict τ=0, state dict τ=1 store weights in bfloat16"), said
    assert "which state dict holds what" in said[0]
    assert said[0] in err  # stderr says what run.json keeps
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert not [w for w in run["warnings"] if "epoch_" in w or "layerfast-inputs" in w], run


def test_a_shape_error_names_the_state_dicts_by_their_tau(tmp_path: Path) -> None:
    states = {0: Net().state_dict(), 1: Net(12).state_dict()}
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze(Net, states, data=_data(), out=tmp_path / "a", **ARGS)
    msg = str(info.value)
    assert "epoch_" not in msg and "layerfast-inputs" not in msg, msg
    assert "do not match the model: state dict τ=1: shape mismatches (2)" in msg, msg
    assert "(state dict τ=0 fit the model, so the other state dicts were saved" in msg, msg


def test_files_the_user_saved_keep_their_names(tmp_path: Path, capsys) -> None:
    """Only in-memory state dicts are renamed: a folder of files (beside in-memory data)
    keeps its file names, in warnings as in errors."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for tau, sd in _states().items():
        torch.save({k: v.bfloat16() for k, v in sd.items()}, folder / f"epoch_{tau}.pt")
    res = layerfast.analyze(Net, folder, data=_data(), out=tmp_path / "a", **ARGS)
    said = [w for w in res.run["warnings"] if "bfloat16" in w]
    assert said and said[0].startswith("epoch_0.pt, epoch_1.pt store weights"), said
    assert "which file holds what" in said[0]


def test_a_state_dicts_whole_path_is_named_by_its_tau(tmp_path: Path) -> None:
    """A message naming the temp file by its whole path (`CheckpointDir.tensors`' does) says
    the state dict too, not "the in-memory state dicts/epoch_3.pt"."""
    from layerfast.errors import collect_warnings, warn
    from layerfast.inputs import named_as_passed

    folder = tmp_path / "sha"
    folder.mkdir()
    (folder / "epoch_3.pt").write_bytes(b"")
    inputs = {"ckpts": "in-memory: 1 state dict (τ 3), sha256 ..."}
    with pytest.raises(LayerfastError) as info, collect_warnings() as kept:
        with named_as_passed(str(folder), "digits", inputs):
            warn(f"{folder / 'epoch_3.pt'}: odd")
            raise LayerfastError(f"{folder / 'epoch_3.pt'}: missing tensors; epoch_4.pt stays")
    assert kept == ["state dict τ=3: odd"]
    assert str(info.value) == "state dict τ=3: missing tensors; epoch_4.pt stays"

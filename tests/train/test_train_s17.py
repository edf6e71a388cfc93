"""`layerfast.train` as a researcher calls it from Python: the option forms the CLI accepts mean
the same thing there (DESIGN §1: the CLI never holds logic the Python API lacks), and the
returned manifest is the JSON one on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.errors import LayerfastError
from layerfast.train import checkpoint_schedule, train


def _tiny(out: Path, **kw) -> dict:
    args = {"arch": "fcn1x4", "data": "digits", "epochs": 3, "max_samples": 40,
            "progress": False, "device": "cpu", **kw}  # fmt: skip
    return train(out=out, **args)


def test_checkpoints_as_the_clis_text_form():
    """`layerfast train --checkpoints 0,1` works; `train(checkpoints="0,1")` was refused
    ("must be a list of epochs"), though `analyze(checkpoints="0,1")` takes that form."""
    assert checkpoint_schedule(10, "5,2,5") == [0, 2, 5, 10]
    assert checkpoint_schedule(10, " 1, 3 ") == [0, 1, 3, 10]


@pytest.mark.parametrize("text", ["", "1,,2", "a", "1.5", "0,11"])
def test_bad_checkpoint_text_is_refused_like_the_cli(text):
    with pytest.raises(LayerfastError, match="checkpoint"):
        checkpoint_schedule(10, text)


def test_train_takes_checkpoints_as_text(tmp_path):
    man = _tiny(tmp_path / "run", checkpoints="1")
    assert [c["epoch"] for c in man["checkpoints"]] == [0, 1, 3]
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == [
        "epoch_000.pt", "epoch_001.pt", "epoch_003.pt"]


@pytest.mark.parametrize("epochs", [np.int64(2), torch.tensor(2)])
def test_returned_manifest_equals_the_json_written(tmp_path, epochs):
    """`train(epochs=np.int64(2))` returned a manifest whose "epochs" was the numpy integer (a
    tensor for `torch.tensor(2)`), not the int manifest.json holds."""
    man = _tiny(tmp_path / "run", epochs=epochs)
    assert type(man["epochs"]) is int
    assert json.loads((tmp_path / "run" / "manifest.json").read_text()) == man


def test_hyper_parameters_as_numpy_floats(tmp_path):
    """`lr=np.float32(0.05)` (a notebook's value) was refused as "must be a finite number",
    though `analyze(threshold=np.float32(...))` takes any real number; recorded as floats."""
    man = _tiny(tmp_path / "run", epochs=1, lr=np.float32(0.05), momentum=np.float32(0.5),
                weight_decay=np.float64(1e-4))
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved["lr"] == man["lr"] == float(np.float32(0.05))
    assert saved["momentum"] == 0.5 and saved["weight_decay"] == 1e-4
    assert all(type(man[k]) is float for k in ("lr", "momentum", "weight_decay"))


def _npz(path: Path) -> Path:
    r = np.random.default_rng(0)
    np.savez(path, x_train=r.random((40, 1, 4, 4)).astype(np.float32),
             y_train=r.integers(0, 3, 40), x_test=r.random((12, 1, 4, 4)).astype(np.float32),
             y_test=r.integers(0, 3, 12))  # fmt: skip
    return path


def test_data_as_a_path_object(tmp_path):
    """`train(arch, Path("x.npz"), ...)` (as `out=Path(...)` is taken) was refused as "unknown
    data spec 'x.npz': empty", a message that names a problem the value does not have; so was
    `analyze(data=Path(...))`. A path-like is its path string; the manifest records it so."""
    from layerfast.analysis import analyze

    data = _npz(tmp_path / "d.npz")
    man = _tiny(tmp_path / "run", data=data, epochs=1)
    assert man["data"] == str(data)
    res = analyze("fcn1x4", tmp_path / "run", data=data, reset="fullmodel", device="cpu",
                  out=tmp_path / "an", progress=False, figures=False)  # fmt: skip
    assert res.run["data"] == str(data)
    full = res.table[res.table["kind"] == "fullmodel"]
    assert list(full["error"]) == [c["test_error"] for c in man["checkpoints"]]


def test_data_of_another_type_is_named_as_such():
    from layerfast.data import open_data

    with pytest.raises(LayerfastError, match="string"):
        open_data(5)  # type: ignore[arg-type]

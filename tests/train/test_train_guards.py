"""`layerfast train` on what it cannot train: a user model whose forward cannot serve training
(tuple/dict outputs, too few logits, wrong input width, BatchNorm on a batch of one) must be one
LayerfastError (CLI: exit 2, one line, no traceback), as `analyze` already says it, and must not
leave a half-written run behind when the problem is visible before training starts."""

from __future__ import annotations

import pytest

from layerfast.errors import LayerfastError
from layerfast.train import train

_MODELS = '''
import torch
from torch import nn


class Tup(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        y = self.f(x)
        return y, y.sum()


class Dic(Tup):
    def forward(self, x):
        return {"logits": self.f(x)}


def tup(num_classes=10):
    return Tup(num_classes)


def dic(num_classes=10):
    return Dic(num_classes)


def fewout(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def wrongin(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(17, num_classes))


def bn(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, num_classes))
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "train_guard_models.py").write_text(_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "train_guard_models", raising=False)
    return tmp_path


@pytest.mark.parametrize("factory", ["tup", "dic", "fewout", "wrongin"])
def test_a_model_that_cannot_serve_the_data_is_bad_input_and_writes_nothing(models, factory):
    out = models / "run"
    with pytest.raises(LayerfastError, match="model"):
        train(f"train_guard_models:{factory}", "digits", 1, out, max_samples=64, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("factory", ["tup", "fewout", "wrongin"])
def test_cli_model_errors_exit_2_without_traceback(models, factory, capsys):
    from layerfast.cli import main

    rc = main(["train", "--arch", f"train_guard_models:{factory}", "--data", "digits", "--epochs", "1",
               "--max-samples", "64", "--out", str(models / "run"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err


def test_batchnorm_model_on_batches_of_one_is_bad_input(models):
    """BatchNorm cannot train on one sample: `--batch-size 1` used to be torch's ValueError
    (exit 1, traceback) after epoch_000.pt and a manifest were written."""
    out = models / "run"
    with pytest.raises(LayerfastError, match="batch"):
        train("train_guard_models:bn", "digits", 1, out, batch_size=1, max_samples=8, progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    "kw",
    [
        {"checkpoints": 5},  # TypeError: 'int' object is not iterable
        {"checkpoints": "0,,1"},  # a typo; "0,1" is the CLI form, taken (test_train_s17)
        {"out": None},  # TypeError from pathlib
        {"out": 5},
        {"max_samples": True},  # trained on one sample, manifest "max_samples": true
        {"lr": True},  # manifest "lr": true
        {"weight_decay": False},
    ],
)
def test_python_api_bad_types_are_layerfast_errors(tmp_path, kw):
    args = {"arch": "fcn1x4", "data": "digits", "epochs": 1, "out": tmp_path / "run",
            "max_samples": 40, "progress": False, **kw}  # fmt: skip
    with pytest.raises(LayerfastError):
        train(**args)
    assert not (tmp_path / "run").exists()


def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes(tmp_path):
    """Two `layerfast train` started together on one --out both passed the "already holds
    checkpoints" check and overwrote each other's epoch files: both exited 0, and the last
    manifest (complete, seed 0) recorded a test error of 0.40 for an epoch_001.pt that held the
    other run's weights (0.11). The run holding `out` must make a second one fail clearly."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".layerfast.lock", "a+") as fh:  # what a first run holds while it trains
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LayerfastError, match="another layerfast run"):
            train("fcn1x4", "digits", 1, out, max_samples=40, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".layerfast.lock"]  # nothing written
    train("fcn1x4", "digits", 1, out, max_samples=40, progress=False)  # free again: it runs
    assert ".layerfast.lock" not in {p.name for p in out.iterdir()}


def test_overwrite_removes_the_temporaries_of_a_killed_run(tmp_path):
    """A run killed (SIGKILL) inside `save_atomic` leaves `.epoch_001.pt.XXXX.tmp`, as big as a
    checkpoint; `--overwrite` replaced the run but kept every such file forever."""
    out = tmp_path / "run"
    train("fcn1x4", "digits", 1, out, max_samples=40, progress=False)
    (out / ".epoch_001.pt.m_y5z7td.tmp").write_bytes(b"x" * 1000)
    (out / ".manifest.json.abc.tmp").write_text("{")
    (out / ".mine.tmp").write_text("not ours")
    train("fcn1x4", "digits", 1, out, max_samples=40, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".mine.tmp"]


def test_one_class_data_is_refused_before_training(tmp_path):
    """One class: the loss is 0 from the first step, the run "completed" with every checkpoint
    equal to θ⁰ and test error 0, and `analyze` then refused the directory (1 output)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = np.zeros(60, np.int64)
    np.savez(tmp_path / "one.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    out = tmp_path / "run"
    with pytest.raises(LayerfastError, match="2 or more classes"):
        train("fcn1x4", str(tmp_path / "one.npz"), 1, out, progress=False)
    assert not out.exists()


def test_numpy_integers_are_counts_and_the_manifest_stays_json(tmp_path):
    """A notebook's `np.int64` epochs/batch_size/max_samples were refused as "not a positive
    integer"; taken, they must reach the manifest as plain ints."""
    import json

    import numpy as np

    out = tmp_path / "run"
    train("fcn1x4", "digits", np.int64(1), out, batch_size=np.int64(16),
          max_samples=np.int64(40), checkpoints=[np.int64(0)], progress=False)  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    assert (m["epochs"], m["batch_size"], m["max_samples"], m["train_n"]) == (1, 16, 40, 40)


@pytest.mark.parametrize("text", ["", "1,,2", "1,", " "])
def test_an_empty_checkpoint_list_or_item_is_refused(tmp_path, text, capsys):
    """`train --checkpoints ""` saved only epoch 0 and the last (the default schedule is the
    paper's), and `1,,2` passed a typo; both are usage errors now."""
    from layerfast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--arch", "fcn1x4", "--data", "digits", "--epochs", "2",
              "--checkpoints", text, "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "expected integers like 0,1,10" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()

"""`layerfast train` as a researcher relies on it (review of 2026-12-07): what the earlier
reviews (test_train_audit, test_train_guards, test_train_s17) left uncovered."""

from __future__ import annotations

import pytest

from layerfast.errors import LayerfastError
from layerfast.train import train

_BN = '''
from torch import nn


def bn(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, num_classes))
'''


@pytest.fixture
def bn_model(tmp_path, monkeypatch):
    (tmp_path / "train_review_models.py").write_text(_BN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "train_review_models", raising=False)
    return "train_review_models:bn"


def test_one_training_sample_with_batchnorm_does_not_blame_the_batch_size(bn_model, tmp_path):
    """`--max-samples 1` gives BatchNorm a batch of one whatever `--batch-size` is: the message
    told the user to "use --batch-size 2 or more" while the batch size was already 128."""
    out = tmp_path / "run"
    with pytest.raises(LayerfastError, match="batch of 1") as exc:
        train(bn_model, "digits", 1, out, max_samples=1, progress=False)
    msg = str(exc.value)
    assert "--batch-size" not in msg and "--max-samples 2 or more" in msg, msg
    assert not out.exists()
    # batch_size 1 is still named when it is the cause
    with pytest.raises(LayerfastError, match="--batch-size 2 or more"):
        train(bn_model, "digits", 1, out, batch_size=1, max_samples=8, progress=False)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_train_called_under_a_callers_no_grad_trains_as_usual(tmp_path, mode):
    """A notebook cell or an evaluation helper that wraps its work in `torch.no_grad()` (or
    `torch.inference_mode()`) and calls `train`: the first step's `backward` failed with torch's
    RuntimeError ("element 0 of tensors does not require grad"), after epoch_000.pt and a
    manifest were written. Training enables gradients itself, as `analyze` disables them."""
    import torch

    ref = train("fcn3x256", "digits", 1, tmp_path / "ref", max_samples=64, progress=False)
    with getattr(torch, mode)():
        got = train("fcn3x256", "digits", 1, tmp_path / "run", max_samples=64, progress=False)
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    assert got["complete"] and [c["test_error"] for c in got["checkpoints"]] == [
        c["test_error"] for c in ref["checkpoints"]
    ]
    for c in ref["checkpoints"]:
        a = torch.load(tmp_path / "ref" / c["file"], weights_only=True)
        b = torch.load(tmp_path / "run" / c["file"], weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_net(num_classes: int = 10):
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))


def test_a_factory_object_as_arch_is_recorded_by_name(tmp_path, capsys):
    """`analyze(Net, ...)` takes the factory itself (DESIGN §5's Python API, `layerfast.inputs`)
    and `build_model` builds it for `train` too, but the manifest then held the function:
    after the probe and θ⁰'s evaluation the first manifest write failed with a bare TypeError
    ("function is not JSON serialisable"). It is named `module:qualname`, as analyze names it,
    so analysing the run with the same factory matches the manifest's arch without a warning."""
    import json

    from layerfast.analysis import analyze

    out = tmp_path / "run"
    man = train(_tiny_net, "digits", 1, out, max_samples=64, progress=False)
    name = f"{__name__}:_tiny_net"
    assert man["arch"] == name
    assert json.loads((out / "manifest.json").read_text())["arch"] == name
    capsys.readouterr()
    res = analyze(_tiny_net, out, reset="fullmodel", device="cpu", progress=False,
                  figures=False, out=tmp_path / "an")  # fmt: skip
    assert "manifest.json says" not in capsys.readouterr().err
    recorded = {c["epoch"]: c["test_error"] for c in man["checkpoints"]}
    rows = res.table[res.table["kind"] == "fullmodel"]
    assert {int(t): e for t, e in zip(rows["checkpoint"], rows["error"], strict=True)} == recorded


def test_a_run_that_stops_early_says_why_in_its_manifest(tmp_path, capsys):
    """A diverged run's `complete: false` manifest held an empty `warnings` list and nothing
    else: why it stopped was only on the terminal. It is kept as `"stopped"`, and analysing
    those checkpoints repeats it."""
    import json

    from layerfast.checkpoints import CheckpointDir

    with pytest.raises(LayerfastError, match="diverged at epoch 1") as err:
        train("fcn3x256", "digits", 1, tmp_path, max_samples=200, lr=1e6, progress=False)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["complete"] is False and man["stopped"] == str(err.value)
    ck = CheckpointDir(tmp_path)
    assert ck.incomplete is not None and "it stopped: training diverged at epoch 1" in ck.incomplete

"""`layerfast.train`, audited: divergence that a finite training loss hides, the caller's RNG on
other devices, and the math mode training runs in."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.train import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny(out: Path, **kw) -> dict:
    args = {"arch": "fcn3x256", "data": "digits", "epochs": 1, "max_samples": 200,
            "progress": False, **kw}  # fmt: skip
    return train(out=out, **args)


def test_a_blown_up_model_with_a_finite_training_loss_is_a_divergence(tmp_path):
    # lr=1e6: the epoch's mean training loss is ~4e18, finite, but the weights end near 1e19
    # and the logits overflow (test loss NaN). That run used to end "complete" at chance error,
    # with `"test_loss": NaN` (not JSON) in the manifest, and analyse as "every unit robust".
    with pytest.raises(LayerfastError, match="diverged at epoch 1"):
        _tiny(tmp_path, lr=1e6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000.pt", "manifest.json"]
    text = (tmp_path / "manifest.json").read_text()
    assert "NaN" not in text and json.loads(text)["complete"] is False
    assert CheckpointDir(tmp_path).labels == [0]


def test_a_cpu_run_leaves_the_cuda_generators_alone(tmp_path, monkeypatch):
    # torch.manual_seed also reseeds every CUDA device (queued when CUDA is not initialised
    # yet); a CPU run's fork_rng restores only the CPU generator, so the caller's CUDA streams
    # changed. Observable without a GPU: no CUDA seeding at all for a CPU run.
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(s))
    _tiny(tmp_path, device="cpu", seed=7)
    assert calls == []


@pytest.mark.cuda
@needs_cuda
def test_a_cpu_run_leaves_the_callers_cuda_rng_alone(tmp_path):
    torch.cuda.manual_seed_all(123)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(123)
    _tiny(tmp_path, device="cpu")
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_same_seed_same_theta0_as_torch_manual_seed(tmp_path):
    from layerfast.models import build_model

    _tiny(tmp_path, seed=11)
    torch.manual_seed(11)
    model, _ = build_model("fcn3x256", 10, (1, 8, 8))
    saved = torch.load(tmp_path / "epoch_000.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


PROBE = """
import torch
from torch import nn

seen = []


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if self.training:
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return self.fc(x.flatten(1))


def make():
    return Probe()
"""


def test_training_runs_in_fp32_whatever_the_callers_tf32_flags(tmp_path, monkeypatch):
    # The module promises fp32 training; it used to inherit the caller's flags (cuDNN allows
    # TF32 by default, so CUDA conv nets trained in TF32, and a set_float32_matmul_precision
    # ("high") elsewhere changed the checkpoints). The flags are plain globals: checkable on a CPU.
    (tmp_path / "lf_audit_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import lf_audit_probe

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        _tiny(tmp_path / "out", arch="lf_audit_probe:make")
        # and the caller's flags are back afterwards
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        sys.modules.pop("lf_audit_probe", None)
    assert lf_audit_probe.seen and set(lf_audit_probe.seen) == {(False, False)}


def test_a_full_disk_is_one_clear_error_and_leaves_whole_files(tmp_path, monkeypatch, capsys):
    # An OSError from a write (ENOSPC, quota) used to escape as a traceback (exit 1).
    import errno

    from layerfast.cli import main

    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):  # the third checkpoint finds the disk full
        calls.append(1)
        if len(calls) == 3:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "o"
    rc = main(["train", "--arch", "fcn3x256", "--data", "digits", "--epochs", "2",
               "--max-samples", "64", "--out", str(out), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot write epoch_002.pt (No space left on device)" in err
    assert sorted(p.name for p in out.iterdir()) == ["epoch_000.pt", "epoch_001.pt", "manifest.json"]
    assert CheckpointDir(out).labels == [0, 1] and CheckpointDir(out).manifest["complete"] is False


def test_a_failed_manifest_write_is_a_layerfast_error(tmp_path, monkeypatch):
    import layerfast.train as lt

    real, calls = lt.write_manifest, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied")
        return real(*a, **k)

    monkeypatch.setattr(lt, "write_manifest", flaky)
    with pytest.raises(LayerfastError, match=r"cannot write manifest.json \(Permission denied\)"):
        _tiny(tmp_path)
    assert CheckpointDir(tmp_path).labels == [0]  # the last good manifest still stands


def test_a_model_without_parameters_is_bad_input(tmp_path, capsys):
    """`--arch torch.nn:Identity` reached SGD, whose 'empty parameter list' was a traceback."""
    from layerfast.cli import main

    rc = main(["train", "--arch", "torch.nn:Identity", "--data", "digits", "--epochs", "1",
               "--out", str(tmp_path / "t"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "has no trainable parameters" in err
    assert not (tmp_path / "t").exists()


def test_a_float64_user_model_trains(tmp_path, monkeypatch) -> None:
    """Batches were fed as float32: a float64 model's first step was a dtype traceback, exit 1
    (analyze feeds a model its own dtype, train now does too)."""
    from layerfast.train import train

    (tmp_path / "f64mod.py").write_text(
        "from torch import nn\n\n\n"
        "def F64(num_classes=10, in_shape=None):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),\n"
        "                         nn.Linear(16, num_classes)).double()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    train("f64mod:F64", "digits", 1, tmp_path / "run", device="cpu", progress=False)
    sd = torch.load(tmp_path / "run" / "epoch_001.pt", weights_only=True)
    assert sd["1.weight"].dtype == torch.float64


NUMPY_INIT = """
import random

import numpy as np
import torch
from torch import nn


class NumpyInit(nn.Module):
    \"\"\"Initialised from numpy's global generator; a forward that drops inputs with `random`.\"\"\"

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(np.random.randn(10, 64).astype("float32")))

    def forward(self, x):
        x = x.flatten(1)
        if self.training and random.random() < 0.5:
            x = x * 0.5
        return self.fc(x)


def make():
    return NumpyInit()
"""


def test_seed_seeds_numpy_and_random_for_the_run_and_restores_them(tmp_path, monkeypatch):
    # `--seed` used to seed torch only: a factory initialising with np.random got another θ⁰
    # on every run of the same seed, and a forward drawing from `random` trained differently.
    import random

    import numpy as np

    (tmp_path / "lf_numpy_init.py").write_text(NUMPY_INIT)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        finals = []
        for i, (out, seed) in enumerate([("a", 3), ("b", 3), ("c", 4)]):
            np.random.seed(100 + i)  # the caller's states differ between the runs
            random.seed(200 + i)
            expected = (np.random.rand(), random.random())
            np.random.seed(100 + i)
            random.seed(200 + i)
            _tiny(tmp_path / out, arch="lf_numpy_init:make", seed=seed, epochs=2)
            assert (np.random.rand(), random.random()) == expected  # restored afterwards
            finals.append([torch.load(tmp_path / out / f"epoch_00{e}.pt", weights_only=True)
                           for e in (0, 2)])  # fmt: skip
    finally:
        sys.modules.pop("lf_numpy_init", None)
    (a0, a2), (b0, b2), (c0, _) = finals
    assert torch.equal(a0["fc.weight"], b0["fc.weight"]) and torch.equal(a2["fc.weight"], b2["fc.weight"])
    assert not torch.equal(a0["fc.weight"], c0["fc.weight"])


def test_a_negative_seed_seeds_numpy_too(tmp_path):
    _tiny(tmp_path, seed=-5)  # numpy refuses negative seeds; the run takes it mod 2**32
    assert CheckpointDir(tmp_path).labels == [0, 1]

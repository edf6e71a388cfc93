"""Review of the ImageNet-form registry archs (torchvision's resnet18/50, vgg11/vgg11_bn) end to
end at tiny sizes (DESIGN.md §2, §3, §6).

Tests named `test_fix_*` failed before the fix they name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import layerfast
from layerfast.cli import main as cli_main
from layerfast.errors import LayerfastError
from layerfast.models import build_model


def _resnet18_ckpts(tmp: Path, num_classes: int = 10, channels: int = 3) -> Path:
    """τ = 0, 1 of a resnet18 in torchvision's format (plain state dicts, num_batches_tracked
    included), for `channels`-channel inputs and `num_classes` classes."""
    ck = tmp / "ck"
    ck.mkdir()
    torch.manual_seed(0)
    model, _ = build_model("resnet18", num_classes, (channels, 32, 32))
    sd = model.state_dict()
    torch.save(sd, ck / "epoch_000.pth")
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()},
               ck / "epoch_001.pth")
    return ck


def _npz(tmp: Path, channels: int, num_classes: int, n: int = 10) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(n) % num_classes
    path = tmp / f"d{channels}.npz"
    np.savez(path, x=rng.random((n, channels, 32, 32), dtype=np.float32), y=y)
    return path


def test_fix_an_input_channel_mismatch_is_not_blamed_on_the_class_count(tmp_path, capsys) -> None:
    """A torchvision (3-channel) resnet18 checkpoint with 1-channel data (fashion-mnist, a
    grayscale npz): only conv1.weight mismatches, yet the message said the model "was built for
    10 classes, the largest label ... + 1; labels must be 0..classes-1 of the checkpoint's
    model", pointing the user at the labels, which are fine (before: that hint, no word of the
    inputs)."""
    ck, data = _resnet18_ckpts(tmp_path), _npz(tmp_path, channels=1, num_classes=10)
    out = tmp_path / "out"
    with pytest.raises(LayerfastError) as exc:
        layerfast.analyze("resnet18", ck, data=str(data), out=out, progress=False)
    msg = str(exc.value)
    assert "conv1.weight [64, 3, 7, 7] in the checkpoint vs [64, 1, 7, 7]" in msg
    assert "labels must be" not in msg and "classes" not in msg
    assert "inputs of shape (1, 32, 32)" in msg
    assert not out.exists()
    rc = cli_main(["analyze", "--arch", "resnet18", "--ckpts", str(ck), "--data", str(data),
                   "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "inputs of shape (1, 32, 32)" in err and not out.exists()


def test_a_head_mismatch_still_names_the_class_count(tmp_path) -> None:
    """The class hint stays where it is right: a 10-class checkpoint, data labelled 0..10."""
    ck, data = _resnet18_ckpts(tmp_path), _npz(tmp_path, channels=3, num_classes=11, n=11)
    with pytest.raises(LayerfastError) as exc:
        layerfast.analyze("resnet18", ck, data=str(data), out=tmp_path / "out", progress=False)
    msg = str(exc.value)
    assert "fc.weight [10, 512] in the checkpoint vs [11, 512]" in msg
    assert "built for 11 classes" in msg and "largest label" in msg
    assert "inputs of shape" not in msg

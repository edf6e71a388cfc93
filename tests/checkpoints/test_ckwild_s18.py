"""Checkpoint directories as training code in the wild writes them (DESIGN §2): layouts and
files that were refused with a message pointing the user the wrong way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from layerfast.checkpoints import CheckpointDir
from layerfast.cli import main
from layerfast.errors import LayerfastError


def _fcn_sd(seed: int) -> dict[str, torch.Tensor]:
    from layerfast.models import get_arch

    torch.manual_seed(seed)
    return dict(get_arch("fcn3x256").build(10, (1, 8, 8)).state_dict())


def _narrow_epoch_1(tmp_path: Path, zero: dict[str, torch.Tensor]) -> Path:
    """A directory of τ = 0 (`zero`), 1 and 3 whose epoch_1 has a narrower fc2 (another
    model's file); τ = 3, the final model, fits."""
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(zero, ck / "epoch_0.pt")
    bad = _fcn_sd(1)
    bad["fc2.weight"] = bad["fc2.weight"][:100]
    torch.save(bad, ck / "epoch_1.pt")
    torch.save(_fcn_sd(3), ck / "epoch_3.pt")
    return ck


def _analyze(ck: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ck), "--data", "digits",
               "--out", str(out), "--device", "cpu", "--quiet", "--max-samples", "40"])
    err = capsys.readouterr().err
    return rc, err


def _one_line(rc: int, err: str, out: Path) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert not out.exists()
    return lines[0]


def test_sharded_safetensors_are_named_as_shards_not_as_a_label_clash(tmp_path: Path,
                                                                      capsys) -> None:
    """Hugging Face's sharded save (`model-00001-of-00002.safetensors` + an index): both shards
    read as "label 2", and the message said "Rename one", which would make two half
    checkpoints. It must say the files are shards of one checkpoint."""
    sd = _fcn_sd(0)
    keys = list(sd)
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({k: sd[k] for k in keys[:4]}, ck / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[4:]}, ck / "model-00002-of-00002.safetensors")
    (ck / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(LayerfastError) as exc:
        CheckpointDir(ck)
    msg = str(exc.value)
    assert "shard" in msg and "Rename one" not in msg
    out = tmp_path / "out"
    line = _one_line(*_analyze(ck, out, capsys), out)
    assert "shard" in line


def test_one_shard_among_epochs_is_named_as_a_shard(tmp_path: Path) -> None:
    """A lone shard would load as label 2 and fail later as 'missing keys'."""
    sd = _fcn_sd(0)
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(sd, ck / "epoch_0.pt")
    save_file({k: sd[k] for k in list(sd)[:4]}, ck / "model-00001-of-00002.safetensors")
    with pytest.raises(LayerfastError, match="shard"):
        CheckpointDir(ck)


def test_a_single_file_shard_set_still_loads(tmp_path: Path) -> None:
    """`-00001-of-00001` is a whole checkpoint: not refused (its label stays the last integer)."""
    sd = _fcn_sd(0)
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file(sd, ck / "model-00001-of-00001.safetensors")
    assert CheckpointDir(ck).labels == [1]


def test_a_shape_mismatch_in_one_checkpoint_is_not_blamed_on_the_data(tmp_path: Path,
                                                                     capsys) -> None:
    """Only epoch_1 comes from another model (fc2 narrower); τ=0 and the final model fit. The
    message added "the model was built for inputs of shape (1, 8, 8), the samples of 'digits';
    the checkpoint's model takes other inputs, or is another --arch", yet the final model runs
    on those inputs with that --arch: the stray file is the cause."""
    ck = _narrow_epoch_1(tmp_path, _fcn_sd(0))
    out = tmp_path / "out"
    line = _one_line(*_analyze(ck, out, capsys), out)
    assert "fc2.weight [100, 256] in the checkpoint vs [256, 256]" in line
    assert "inputs of shape" not in line and "another --arch" not in line
    assert "epoch_0.pt" in line and "epoch_3.pt" in line  # the files that do fit are named


def test_a_head_mismatch_in_one_checkpoint_is_not_blamed_on_the_labels(tmp_path: Path,
                                                                      capsys) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_fcn_sd(0), ck / "epoch_0.pt")
    bad = _fcn_sd(1)
    bad["fc4.weight"], bad["fc4.bias"] = bad["fc4.weight"][:5], bad["fc4.bias"][:5]
    torch.save(bad, ck / "epoch_1.pt")
    torch.save(_fcn_sd(3), ck / "epoch_3.pt")
    out = tmp_path / "out"
    line = _one_line(*_analyze(ck, out, capsys), out)
    assert "fc4.weight [5, 256] in the checkpoint vs [10, 256]" in line
    assert "labels must be" not in line and "largest label" not in line


def test_a_torch_file_named_safetensors_says_so(tmp_path: Path) -> None:
    """`torch.save(sd, "model_3.safetensors")` is an intact torch file, not a truncated one."""
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_fcn_sd(0), ck / "epoch_0.pt")
    torch.save(_fcn_sd(3), ck / "epoch_3.safetensors")
    c = CheckpointDir(ck)
    with pytest.raises(LayerfastError) as exc:
        c.validate(_fcn_sd(3))
    msg = str(exc.value)
    assert "truncated or corrupt" not in msg
    assert "torch.save" in msg and ".pt" in msg


def test_a_safetensors_file_named_pt_says_so(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_fcn_sd(0), ck / "epoch_0.pt")
    save_file(_fcn_sd(3), ck / "epoch_3.pt")
    c = CheckpointDir(ck)
    with pytest.raises(LayerfastError) as exc:
        c.validate(_fcn_sd(3))
    msg = str(exc.value)
    assert "safetensors" in msg and ".safetensors" in msg


def test_a_file_with_missing_keys_is_not_said_to_fit(tmp_path: Path, capsys) -> None:
    """τ=0 lacks a key and epoch_1 has a narrower fc2: τ=0 is not offered as a file that fits."""
    zero = _fcn_sd(0)
    del zero["fc3.bias"]
    ck = _narrow_epoch_1(tmp_path, zero)
    out = tmp_path / "out"
    line = _one_line(*_analyze(ck, out, capsys), out)
    assert "missing keys (1): fc3.bias" in line
    assert "(epoch_3.pt fit the model" in line and "replace them)" in line


@pytest.mark.parametrize("name", ["epoch_3.bin", "checkpoint-3.pth.tar", "epoch_3.pkl"])
def test_a_checkpoint_under_a_suffix_layerfast_does_not_read_is_refused_not_skipped(
        tmp_path, name) -> None:
    """`epoch_3.bin` beside `epoch_0.pt` and `epoch_1.pt` was skipped without a word, and τ=1
    analysed as the final model. A file with no epoch in its name (`training_args.bin`), or
    one labelled no later than the last checkpoint read (accelerate's `random_states_0.pkl`,
    `optimizer_1.bin`), moves no final model and stays ignored."""
    from layerfast.checkpoints.discover import _from_names

    for n in ("epoch_0.pt", "epoch_1.pt", "training_args.bin", "random_states_0.pkl",
              "optimizer_1.bin", name):
        (tmp_path / n).write_bytes(b"x")
    with pytest.raises(LayerfastError, match=rf": {re.escape(name)} looks like a checkpoint "
                                             r"later than epoch_1\.pt, but layerfast reads "
                                             r"only \.pt, \.pth.* epoch_1\.pt would silently "
                                             r"be the final model\.$"):
        _from_names(tmp_path)
    (tmp_path / name).unlink()
    assert sorted(_from_names(tmp_path)) == [0, 1]

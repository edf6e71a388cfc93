"""Checkpoint directories as training code in the wild writes them (DESIGN §2): layouts and
files that were refused with a message pointing the user the wrong way."""

from __future__ import annotations

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

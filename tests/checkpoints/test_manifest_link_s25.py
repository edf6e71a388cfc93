"""A manifest.json that is a broken link is an error, not "no manifest" (session 25): ignored,
the file names' last integers silently replaced the epochs it lists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from layerfast.checkpoints import CheckpointDir, write_manifest
from layerfast.cli import main
from layerfast.errors import LayerfastError
from tests.checkpoints.test_checkpoints import sd_at


def _run(root: Path) -> Path:
    """A manifest-labelled run whose names' integers are not its epochs, manifest moved away
    and linked back."""
    torch.save(sd_at(0), root / "init.pt")
    torch.save(sd_at(4), root / "best_1.pt")  # epoch 4, name says 1
    torch.save(sd_at(9), root / "stray_9.pt")  # not listed
    write_manifest(root, [{"epoch": 0, "file": "init_0.pt"}, {"epoch": 4, "file": "best_1.pt"}])
    torch.save(sd_at(0), root / "init_0.pt")
    (root / "init.pt").unlink()
    store = root.parent / "store"
    store.mkdir()
    (root / "manifest.json").rename(store / "manifest.json")
    os.symlink(store / "manifest.json", root / "manifest.json")
    return store


def test_a_linked_manifest_is_read(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    _run(root)
    assert CheckpointDir(root).labels == [0, 4]


def test_a_broken_manifest_link_is_refused_not_replaced_by_file_names(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    store = _run(root)
    (store / "manifest.json").unlink()
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(root)
    msg = str(err.value)
    assert f"{root / 'manifest.json'} is a broken link (to {store / 'manifest.json'})" in msg


def test_a_broken_manifest_link_exits_2_through_the_cli(tmp_path: Path, capsys) -> None:
    root = tmp_path / "run"
    root.mkdir()
    store = _run(root)
    (store / "manifest.json").unlink()
    code = main(["analyze", "--ckpts", str(root), "--arch", "fcn3x256", "--data", "digits",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "manifest.json is a broken link" in err and "Traceback" not in err

"""`layerfast train` refuses a directory where it will write a checkpoint before deleting
anything (session 24).

Defect: `train --overwrite` into an --out whose `epoch_001.pt` was a directory deleted the old
run's files, wrote epoch_000.pt and a manifest, then failed at epoch 1 ("cannot write
epoch_001.pt (Is a directory)"): the old run gone and a partial new one left. Now a name the
run will write (`manifest.json`, the `epoch_NNN.pt` of a scheduled epoch) that is not a file is
refused up front: one line, exit 2, the directory exactly as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.cli import main


def _snapshot(out: Path) -> dict[str, bytes | None]:
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in out.iterdir()}


@pytest.mark.parametrize("blocked", ["epoch_001.pt", "epoch_000.pt", "manifest.json"])
@pytest.mark.parametrize("old_run", [True, False], ids=["overwrite", "fresh"])
def test_a_directory_in_the_way_is_refused_before_anything_changes(
    blocked: str, old_run: bool, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--arch", "fcn1x4", "--data", "digits", "--max-samples", "64",
            "--epochs", "1", "--out", str(out), "--quiet"]  # fmt: skip
    if old_run:
        assert main(argv) == 0
        (out / blocked).unlink()
    else:
        out.mkdir()
    (out / blocked).mkdir()
    (out / blocked / "keep.txt").write_text("mine")
    before = _snapshot(out)
    capsys.readouterr()
    rc = main([*argv, "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{blocked} is in the way" in err, err
    assert _snapshot(out) == before
    assert (out / blocked / "keep.txt").read_text() == "mine"


def test_a_name_the_schedule_does_not_write_is_not_in_the_way(tmp_path: Path) -> None:
    """Only the epochs this run saves count: epoch_005.pt of a 1-epoch run is left alone."""
    out = tmp_path / "run"
    (out / "epoch_005.pt").mkdir(parents=True)
    rc = main(["train", "--arch", "fcn1x4", "--data", "digits", "--max-samples", "64",
               "--epochs", "1", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    assert (out / "epoch_005.pt").is_dir() and (out / "epoch_001.pt").is_file()

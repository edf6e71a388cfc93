"""Bad input found by randomised fuzzing of the whole CLI (review s17).

Each test is a defect that fuzzing found, and fails on the code it was found in.
"""

from __future__ import annotations

import errno
import os
import pathlib
from pathlib import Path

import pytest

from layerfast.cli import main
from layerfast.data import ffcv_available


def _one_error_line(err: str) -> str:
    """The one `layerfast...: error:` line of stderr, checked to be the only non-warning line."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "warning:" not in ln]
    assert len(lines) == 1, err
    assert "error:" in lines[0], err
    return lines[0]


# ------------------------------------------------------------- paths the system refuses to stat


def _inputs(tmp: Path) -> None:
    """tmp/ck (an fcn1x8 trained for nothing: τ = 0, 1) and tmp/d.npz (x [20, 4]) for it."""
    import numpy as np
    import torch

    from layerfast.models import build_model

    g = np.random.default_rng(0)
    np.savez(tmp / "d.npz", x=g.standard_normal((20, 4)).astype(np.float32),
             y=g.integers(0, 10, 20))
    (tmp / "ck").mkdir()
    for epoch in (0, 1):
        torch.manual_seed(epoch)
        torch.save(build_model("fcn1x8", 10, (1, 1, 4))[0].state_dict(),
                   tmp / "ck" / f"epoch_{epoch:03d}.pt")


def _long(tmp: Path) -> str:
    """A path whose last component is over NAME_MAX (255): every stat() of it is ENAMETOOLONG."""
    return str(tmp / ("y" * 300))


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "--arch", "fcn3x256", "--ckpts", "{L}", "--data", "digits", "--out", "{T}/o"],
        ["analyze", "--arch", "fcn1x8", "--ckpts", "{T}/ck", "--data", "{T}/d.npz", "--out",
         "{L}"],
        ["analyze", "--arch", "fcn3x256", "--data", "{L}.npz", "--list-units"],
        ["analyze", "--arch", "fcn3x256", "--data", "mnist:{L}", "--list-units"],
        ["train", "--arch", "fcn3x256", "--data", "digits", "--epochs", "1", "--out", "{L}"],
        ["demo", "--out", "{L}"],
        ["report", "{L}"],
        ["convert", "digits", "--to", "{L}.beton"],
    ],
    ids=["ckpts", "analyze-out", "npz", "mnist", "train-out", "demo-out", "report", "convert-to"],
)
def test_a_path_name_too_long_is_one_line_exit_2(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--out`, `--ckpts`, `--data`, `report OUT`, `--to` with a name over 255 bytes: the
    first `Path.exists()`/`is_dir()` raised OSError ENAMETOOLONG, which reached the command
    line as a traceback and exit 1 (pathlib answers False only for ENOENT, ENOTDIR, EBADF and
    ELOOP). It is bad input: one line, exit 2, nothing written."""
    _inputs(tmp_path)
    before = sorted(os.listdir(tmp_path))
    rc = main([a.replace("{L}", _long(tmp_path)).replace("{T}", str(tmp_path)) for a in argv])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    if argv[0] == "convert" and not ffcv_available():  # refused before the path is looked at
        assert "needs FFCV" in line, line
    else:
        assert "too long" in line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "--arch", "fcn3x256", "--ckpts", "{P}/ck", "--data", "digits", "--out",
         "{T}/o"],
        ["analyze", "--arch", "fcn3x256", "--ckpts", "{P}/ck", "--list-units"],
        ["train", "--arch", "fcn3x256", "--data", "digits", "--epochs", "1", "--out", "{P}/tr"],
        ["report", "{P}/res"],
    ],
    ids=["ckpts", "list-units", "train-out", "report"],
)
def test_a_path_in_a_directory_without_search_permission_is_one_line_exit_2(
    tmp_path: Path,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A path under a directory the user may not search (`--ckpts ~other/ck`): stat() raises
    PermissionError, and the first `Path.exists()` of it was a traceback, exit 1. Simulated
    (the tests may run as root, for whom chmod 000 refuses nothing)."""
    private = tmp_path / "private"
    real_stat = pathlib.Path.stat

    def stat(self: pathlib.Path, *args: object, **kwargs: object) -> os.stat_result:
        if str(self).startswith(str(private) + os.sep):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    argv = [a.replace("{P}", str(private)).replace("{T}", str(tmp_path)) for a in argv]
    rc = main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    assert "Permission denied" in line and str(private) in line
    assert sorted(os.listdir(tmp_path)) == []


# ------------------------------------------------------------- report: a variant listed twice


def test_report_refuses_a_results_csv_that_lists_a_variant_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """results.csv with its rows repeated (two runs' files concatenated): analyze never writes
    a variant twice (it merges `--checkpoints 0,0`, `--seeds 1,1`), but `layerfast report`
    printed the table with exit 0, 'critical at tau 0,0-1,1' and a re-randomization spread
    over one seed counted twice. It is a file that no run wrote: one line, exit 2, figures
    left as they were."""
    import pandas as pd

    from layerfast.metrics import COLUMNS

    out = tmp_path / "run"
    out.mkdir()
    rows = [
        ["*", "baseline", "", "", 0.2, 0.1, 0.3, "", 0.5, 1.0, 60, 0.0, ""],
        ["fc1", "reinit", 0, "", 0.9, 0.8, 0.95, "", 2.3, 0.1, 60, 0.7, "critical"],
        ["fc1", "rerandom", "", 1, 0.9, 0.8, 0.95, "", 2.3, 0.1, 60, 0.7, "critical"],
    ]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    pd.concat([table, table.iloc[1:]]).to_csv(out / "results.csv", index=False)
    rc = main(["report", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    assert "row 4" in line and "twice" in line
    assert sorted(os.listdir(out)) == ["results.csv"]

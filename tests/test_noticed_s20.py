"""Small defects from the 'noticed' list, fixed in session 20."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import layerfast
from layerfast.data import open_data


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def test_default_out_dir_of_a_lambda_arch_is_a_portable_name(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A callable arch is named `module:<lambda>`: `<` and `>` (and `:`) cannot be in a Windows
    file name, so the default `layerfast-out/<arch>-<time>` uses only portable characters."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    def mk() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    lam = lambda: mk()  # noqa: E731  (the point: a lambda's __qualname__ is '<lambda>')
    torch.manual_seed(0)
    sds = {0: mk().state_dict(), 1: mk().state_dict()}
    src = open_data("digits")
    res = layerfast.analyze(lam, sds, data=(src.reader.x.float() / 16, src.reader.y),
                            device="cpu", progress=False, figures=False, max_samples=64)
    assert res.run["arch"].endswith("<lambda>"), res.run["arch"]
    (made,) = (tmp_path / "layerfast-out").iterdir()
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", made.name), made.name


def test_widest_dtype() -> None:
    from layerfast.engine.precision import widest_dtype

    assert widest_dtype(nn.Linear(2, 2)) == torch.float32
    assert widest_dtype(nn.Linear(2, 2).half()) == torch.float16
    mixed = nn.Sequential(nn.Linear(2, 2).bfloat16(), nn.Linear(2, 2).double())
    assert widest_dtype(mixed) == torch.float64
    assert widest_dtype(nn.ReLU()) == torch.float32


@pytest.mark.parametrize("argv", [["--fanout", "on", "--no-fanout"],
                                  ["--no-fanout", "--fanout", "on"]])
def test_conflicting_fanout_flags_are_refused(argv: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`--fanout on --no-fanout` ran with fan-out off and the other order on: the last flag
    won, silently. One of the two is a mistake; which one only the user knows."""
    from layerfast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--arch", "fcn3x256", "--ckpts", str(tmp_path), "--out",
              str(tmp_path / "o"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()

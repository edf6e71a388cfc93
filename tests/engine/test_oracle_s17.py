"""Defects found by an independent oracle (session 17): a from-scratch loop written from DESIGN.md
(units, BN policies, reinit/rerandom/fullmodel/interp variants, Wilson intervals, distances)
compared with `layerfast analyze` (fp32, CPU) over fcn3x256, resnet20, vgg11_bn_cifar and a user
model with a pre-activation BN, a LayerNorm and a zero-init head. Every number agreed; these
tests pin what did not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.analysis import analyze, list_units
from layerfast.cli import main
from layerfast.errors import LayerfastError


@pytest.mark.parametrize("units", ["", ",", " , "])
def test_units_that_name_no_pattern_are_refused_not_read_as_the_granularity(
    ckpts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], units: str
) -> None:
    """`--units ''` asks for custom units and names none.

    Why: the empty pieces were dropped and the empty list read as "no --units", so the run
    silently analysed every layer (or every block, with --granularity block) instead of
    refusing, exit 0. `--reset ''` and `--checkpoints ''` are refused (exit 2) for the same
    reason: an empty list must not mean "the default" (a shell variable that expanded to
    nothing, `--units "$UNITS"`).
    """
    out = tmp_path / "out"
    argv = ["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--data", "digits",
            "--out", str(out), "--quiet", "--max-samples", "20", "--units", units]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--units" in err[0] and "no pattern" in err[0], err
    assert not out.exists()  # nothing written
    with pytest.raises(LayerfastError, match="no pattern"):
        analyze("fcn3x256", ckpts, data="digits", units=units, out=tmp_path / "api",
                max_samples=20, progress=False)
    assert not (tmp_path / "api").exists()
    with pytest.raises(LayerfastError, match="no pattern"):
        list_units("fcn3x256", "digits", units=units)
    assert main(["analyze", "--arch", "fcn3x256", "--list-units", "--units", units]) == 2

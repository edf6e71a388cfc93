"""Bad `layerfast train` input, re-checked from the shell (review s23)."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.cli import main


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay"])
def test_a_step_size_beyond_float32_is_refused_before_anything_is_written(
    tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--lr 1e308` (or `--weight-decay`) is finite, so it passed the flag checks, but SGD
    scales the float32 weights by it: torch raised "value cannot be converted to type float
    without overflow" at the first step, a traceback and exit 1, with epoch_000.pt and a
    manifest already in --out. Now one line, exit 2, --out not created."""
    out = tmp_path / "out"
    rc = main(["train", "--arch", "fcn1x8", "--data", "digits", "--epochs", "1",
               "--max-samples", "16", "--quiet", "--out", str(out), flag, "1e308"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "warning:" not in ln]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("layerfast: error:"), err
    assert f"{flag} must be at most" in lines[0] and "float32" in lines[0], err
    assert not out.exists()


def test_the_largest_float32_step_size_is_not_refused(tmp_path: Path) -> None:
    """The bound is float32's largest value, not lower: weight decay 3e38 passes the check
    (the run then diverges, which is the documented 'training diverged' error)."""
    from layerfast.errors import LayerfastError
    from layerfast.train import train

    with pytest.raises(LayerfastError, match="diverged|not finite"):
        train("fcn1x8", "digits", epochs=1, out=tmp_path / "o", max_samples=16,
              weight_decay=3e38, progress=False)

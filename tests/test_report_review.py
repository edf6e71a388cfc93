"""Review of what the researcher reads: results.csv, run.json, the figures, distances."""

from __future__ import annotations

from pathlib import Path

import pytest

import layerfast
from layerfast.report import figures as fig_mod
from layerfast.report import read_distances


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.00996, "0.010"),  # rounds up to 0.010: the same text as 0.0101 gets, not "1.0e-2"
        (0.0101, "0.010"),
        (0.009949, "9.9e-3"),
        (0.01, "0.010"),
        (999.4, "999"),  # below 1,000: whole numbers, as before
    ],
)
def test_two_sig_decides_notation_by_the_rounded_value(value: float, text: str) -> None:
    """A distance cell reading "1.0e-2" beside one reading "0.010" (seen in a ResNet-20
    distances.png): the notation was chosen from the value before rounding it to two digits."""
    assert fig_mod._two_sig(value) == text


def test_distances_rows_stay_in_tau_order_when_interp_adds_the_final(
    ckpts: Path, tmp_path: Path, one_thread: None
) -> None:
    """With interp, distances.csv also measures the final τ; it was appended after the chosen
    ones, so `--final 1 --checkpoints 0,2` wrote τ rows 0, 2, 1 (every other table is in τ
    order, and `distances()` documents "τ ascending")."""
    res = layerfast.analyze(
        "fcn3x256", ckpts, data="digits", device="cpu", max_samples=40, final=1,
        checkpoints=[0, 2], reset="reinit,interp", alphas=[0.5], out=tmp_path / "o",
        progress=False, figures=False,
    )
    for unit, rows in res.distances.groupby("unit", sort=False):
        assert list(rows["checkpoint"]) == [0, 1, 2], unit
    written = read_distances(tmp_path / "o" / "distances.csv")
    assert list(written.loc[written["unit"] == "fc1", "checkpoint"]) == [0, 1, 2]

"""Review of what the researcher reads: results.csv, run.json, the figures, distances."""

from __future__ import annotations

import pytest

from layerfast.report import figures as fig_mod


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

"""Session 22: what the report's figures and summary say must be what was run and measured."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from layerfast.report import figures as fig_mod
from layerfast.report import heatmap_figure, summary_table
from tests.report.test_report import FCN, make_distances, make_table


def _cell_rgba(table: pd.DataFrame, row: int, col: int) -> np.ndarray:
    """The colour the heatmap draws for one cell (as drawn: the image's norm and colormap)."""
    im = heatmap_figure(table).axes[0].images[0]
    return np.asarray(im.cmap(im.norm(im.get_array()[row, col])))


def test_heatmap_colour_scale_is_fixed_so_a_robust_cell_is_dark() -> None:
    """Nothing critical, the worst cell fc1@0 at 5.0% error: it was drawn in the colour scale's
    top yellow (the scale ran to the largest error shown), the colour a 98% cell gets in
    another run, while the docstring promised dark robust cells. 0-100% fixed: dark, and the
    same colour as a 5.0% cell beside a 90% one."""
    calm = make_table(FCN, {"layers.1": 0.034})  # layers.1 @ τ0: 1.62% + 3.4 = 5.02%, robust
    calm = calm[calm["kind"].isin(["baseline", "reinit"])]
    assert not (calm["verdict"] == "critical").any()
    assert calm["error"].max() == calm.loc[1, "error"] == pytest.approx(0.0502)
    im = heatmap_figure(calm).axes[0].images[0]
    assert (im.norm.vmin, im.norm.vmax) == (0.0, fig_mod.ERROR_SCALE) == (0.0, 100.0)
    rgba = _cell_rgba(calm, 0, 0)
    assert fig_mod._text_color(rgba) == "white", rgba  # a dark cell: white annotation
    wild = make_table(FCN, {"layers.1": 0.034})  # the same cell beside 90% rerandom cells
    np.testing.assert_array_equal(_cell_rgba(wild, 0, 1), rgba)  # column 0 is ReRnd there


def _critical_at(text: str, unit: str) -> str:
    head = text.splitlines()[2]
    row = next(line for line in text.splitlines() if line.startswith(unit + " "))
    at = head.index("critical at tau")
    return row[at:].split()[0]


def test_critical_at_tau_ranges_only_over_consecutive_integers() -> None:
    """With only τ 0 and 3 evaluated, both critical, the summary printed '0-3', which reads as
    critical at 0, 1, 2 and 3; over τ 0, 1, 2, 3, 8 critical at all of them it printed '0-8'."""
    table = make_table(FCN, {"layers.1": 0.6})
    ri = table["kind"] == "reinit"
    only_03 = table[~ri | table["checkpoint"].isin([0, 3])]
    assert _critical_at(summary_table(only_03), "layers.1") == "0,3"
    text = summary_table(table, threshold=0.001)  # critical at τ 0, 1, 2, 3 and 8 (of 0..100)
    assert _critical_at(text, "layers.1") == "0-3,8"
    assert _critical_at(summary_table(table), "layers.1") == "0-3"  # all of 0..3 evaluated


def test_fullmodel_only_run_says_what_ran() -> None:
    """`--reset fullmodel` alone: the summary printed a threshold line, an empty verdict column
    (and an empty max l2_rel column), and the heatmap's title said "after resetting one unit"."""
    table = make_table(FCN)
    full = table[table["kind"].isin(["baseline", "fullmodel"])]
    text = summary_table(full, make_distances(FCN))
    head = text.splitlines()[2].split()
    assert head == ["unit", "baseline", "reset@0"], text
    assert "threshold" not in text, text
    assert "no reinit or rerandom rows, so no robust/critical verdict" in text, text
    assert "after resetting the whole model" in heatmap_figure(full).get_suptitle()
    # with unit rows beside the fullmodel row: as before
    assert "after resetting one unit" in heatmap_figure(table).get_suptitle()
    both = summary_table(table, make_distances(FCN))
    assert "threshold: robust" in both and "(reference)" in both
    assert both.splitlines()[2].split()[-2:] == ["max", "l2_rel"]


def test_max_l2_rel_is_said_and_never_a_zero_that_only_tau0_gave() -> None:
    """With only τ = 0 measured (`--checkpoints 0`) the column read "0" for every unit (θ^0
    against itself: "never moved"); without τ = 0 it read "-" for every unit; neither was
    explained. Now the largest over the τ measured besides 0, the footer says what it is, and
    the column is left out, with the reason, when there is none."""
    table = make_table(FCN)
    dist = make_distances(FCN)
    text = summary_table(table, dist)
    assert text.splitlines()[2].split()[-2:] == ["max", "l2_rel"]
    assert ("max l2_rel: a unit's largest ||theta^tau - theta^0||_2 / ||theta^0||_2 over the "
            "checkpoints measured") in text.splitlines()
    only0 = dist[dist["checkpoint"].astype(str).isin(["0", "rerandom:1"])]
    text = summary_table(table[~table["kind"].eq("reinit") | table["checkpoint"].eq(0)], only0)
    assert "l2_rel" not in text.splitlines()[2], text
    assert "max l2_rel: not shown: only tau=0 was measured" in text, text
    text = summary_table(table, dist.iloc[:0])  # a header-only distances.csv: no τ = 0
    assert "l2_rel" not in text.splitlines()[2], text
    assert "max l2_rel: not shown: distances are measured from tau=0" in text, text
    nan = dist.assign(l2_rel=np.where(dist["unit"] == "layers.3", np.nan, dist["l2_rel"]))
    text = summary_table(table, nan)  # a zero-initialized unit: NaN l2_rel at every τ
    row = next(line for line in text.splitlines() if line.startswith("layers.3 "))
    assert row.endswith("  -") and "; -: none finite (e.g. ||theta^0||_2 = 0)" in text, text
    assert summary_table(table, None).count("l2_rel") == 0  # no distances.csv: not a word

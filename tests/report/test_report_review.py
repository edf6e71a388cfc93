"""Review of what the researcher reads: results.csv, run.json, the figures, distances."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
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


_RESULTS = (
    "unit,kind,checkpoint,seed,error,error_lo,error_hi,top5_error,loss,agreement,n,"
    "delta_error,verdict\n"
    "*,baseline,,,0.1,0.05,0.2,0.0,0.3,1.0,100,0.0,\n"
    "fc1,reinit,0,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,critical\n"
)


@pytest.mark.parametrize("huge", ["1e297", "1e299", "1e300"])
def test_report_refuses_distances_the_log_scale_cannot_draw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], huge: str
) -> None:
    """read_distances refused only values above 1e300 ("what the figure cannot draw"); from
    ~1e297 up, beside ordinary distances, the log colour bar's tick locator overflowed and
    `layerfast report` died with matplotlib's OverflowError traceback (exit 1), not exit 2."""
    from layerfast.cli import main

    (tmp_path / "results.csv").write_text(_RESULTS)
    (tmp_path / "distances.csv").write_text(
        "unit,checkpoint,l2,l2_rel,linf\n"
        "fc1,0,0.0,0.0,0.0\n"
        f"fc1,1,{huge},{huge},{huge}\n"
        "fc1,2,0.5,0.02,0.01\n"
    )
    rc = main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "'l2', row 2" in err
    assert not (tmp_path / "distances.png").exists()


def test_the_largest_distance_read_back_is_drawn(tmp_path: Path) -> None:
    """What read_distances accepts, distance_plot draws (log scale over 40 decades)."""
    from layerfast.report import distance_plot

    (tmp_path / "distances.csv").write_text(
        "unit,checkpoint,l2,l2_rel,linf\n"
        "fc1,0,0.0,0.0,0.0\n"
        "fc1,1,1e250,1e250,1e250\n"
        "fc1,2,0.5,0.02,0.01\n"
    )
    assert distance_plot(read_distances(tmp_path / "distances.csv"), tmp_path / "d.png").is_file()


def _distances(rerandom: bool) -> pd.DataFrame:
    rows = [(u, t, 0.1 * t, 0.05 * t, 0.01 * t) for u in ("fc1", "fc2") for t in (0, 1, 3)]
    if rerandom:
        rows += [(u, "rerandom:1", 9.0, 1.4, 0.2) for u in ("fc1", "fc2")]
    return pd.DataFrame(rows, columns=["unit", "checkpoint", "l2", "l2_rel", "linf"])


@pytest.mark.parametrize("rerandom", [False, True])
def test_distance_figure_explains_the_rernd_column_only_when_it_has_one(rerandom: bool) -> None:
    """A run without rerandom (`--reset reinit`, `--reset interp`) drew distances.png with no
    ReRnd column under a heading that explained one ("ReRnd: a fresh random draw against θ0")."""
    fig = fig_mod.distance_figure(_distances(rerandom))
    cols = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert (fig_mod.RERANDOM_COLUMN in cols) is rerandom
    heading = fig.get_suptitle()
    assert heading.startswith("Distance of each unit's weights")
    assert (fig_mod.RERANDOM_COLUMN in heading) is rerandom, heading

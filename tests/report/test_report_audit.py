"""Audit of counts -> results.csv -> what the user reads (DESIGN.md §5, §6 `layerfast report`).

Each test here failed before the fix it names: a results/distances CSV from elsewhere that is
malformed must give one LayerfastError naming the column, never a traceback or a silently wrong
figure; a legitimate run (no τ = 0, no samples) must still be reported, and reported correctly.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerfast.errors import LayerfastError
from layerfast.metrics import COLUMNS, results_table
from layerfast.report import read_distances, read_results, redraw, summary_table, write_csv

HEADER = ",".join(COLUMNS)
DIST_HEADER = "unit,checkpoint,l2,l2_rel,linf"


@dataclass
class FakeVariant:
    unit: str
    kind: str
    checkpoint: int | None = None
    seed: int | None = None


def small_table(n: int = 100) -> pd.DataFrame:
    variants = [
        FakeVariant("*", "baseline"),
        FakeVariant("fc1", "reinit", 0),
        FakeVariant("fc1", "reinit", 1),
        FakeVariant("fc1", "rerandom", None, 1),
        FakeVariant("fc2", "reinit", 0),
        FakeVariant("fc2", "reinit", 1),
        FakeVariant("fc2", "rerandom", None, 1),
        FakeVariant("*", "fullmodel", 0),
        FakeVariant("*", "fullmodel", 1),
    ]
    c1 = np.array([95, 60, 94, 10, 93, 95, 12, 10, 80], dtype=np.float64) * n / 100
    counts = np.stack([c1, c1, np.full(len(c1), 0.3 * n), c1], axis=1)
    return results_table(variants, counts, n, 10)


def write_rows(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


GOOD_BASE = "*,baseline,,,0.05,0.02,0.11,0.01,0.2,1.0,100,0.0,"
GOOD_REINIT = "fc1,reinit,0,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical"


# ----------------------------------------------------------------------------- redraw


def test_redraw_run_without_tau0_has_header_only_distances(tmp_path: Path) -> None:
    """A checkpoint dir without τ = 0 writes a header-only distances.csv and no distances.png
    (docs/decisions.md); `layerfast report` on that run must redraw the heatmap, not fail."""
    write_csv(small_table(), tmp_path / "results.csv")
    (tmp_path / "distances.csv").write_text(DIST_HEADER + "\n")
    assert redraw(tmp_path) == [tmp_path / "heatmap.png"]
    assert not (tmp_path / "distances.png").exists()


def test_redraw_replaces_both_figures_or_neither(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On a full disk the distance plot failed after the new heatmap had replaced the old one,
    leaving figures of two different runs side by side."""
    import layerfast.report as report

    write_csv(small_table(), tmp_path / "results.csv")
    (tmp_path / "distances.csv").write_text(DIST_HEADER + "\nfc1,0,1.5,0.5,0.2\n")
    assert redraw(tmp_path) == [tmp_path / "heatmap.png", tmp_path / "distances.png"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_csv(small_table(n=200), tmp_path / "results.csv")  # another heatmap

    def full_disk(*args: object) -> None:
        raise LayerfastError("cannot write distances.png: No space left on device")

    monkeypatch.setattr(report, "distance_plot", full_disk)
    with pytest.raises(LayerfastError, match="No space left"):
        redraw(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys()  # no temporary file left behind
    assert after["heatmap.png"] == before["heatmap.png"]
    monkeypatch.undo()
    redraw(tmp_path)
    assert (tmp_path / "heatmap.png").read_bytes() != before["heatmap.png"]
    drawn = (tmp_path / "distances.png").stat().st_ino
    (tmp_path / "heatmap.png").unlink()
    (tmp_path / "heatmap.png").mkdir()  # its move would fail after distances.png's
    with pytest.raises(LayerfastError, match="heatmap.png is not a regular file"):
        redraw(tmp_path)
    assert (tmp_path / "distances.png").stat().st_ino == drawn


# ----------------------------------------------------------------------------- read_results


def test_read_results_round_trips_a_run_without_samples(tmp_path: Path) -> None:
    """n = 0 legitimately leaves error & co. empty: the reader must accept what the writer writes.

    The all-empty verdict column used to be read as float64 and filled with "", which pandas
    warns about (Pandas4Warning) and will refuse in its next major version."""
    table = small_table(n=0)
    path = write_csv(table, tmp_path / "results.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = read_results(path)
    pd.testing.assert_frame_equal(back, table)


def test_read_results_accepts_infinite_loss(tmp_path: Path) -> None:
    """A re-randomized unit can overflow the logits: loss = inf is a result, not bad input."""
    row = "fc1,rerandom,,1,0.9,0.85,0.93,0.5,inf,0.1,100,0.85,critical"
    back = read_results(write_rows(tmp_path / "results.csv", [GOOD_BASE, row]))
    assert back["loss"].iloc[1] == np.inf


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ("fc1,reinit,0,,abc,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "error"),
        ("fc1,reinit,0,,38.0,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "error"),  # percent
        ("fc1,reinit,0,,inf,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "error"),
        ("fc1,reinit,0,,-0.1,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "error"),
        ("fc1,reinit,0,,,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "error"),  # n > 0
        ("fc1,reinit,0,,0.4,0.31,1.5,0.1,1.5,0.6,100,0.35,critical", "error_hi"),
        ("fc1,reinit,0,,0.4,0.31,0.5,0.1,1.5,2,100,0.35,critical", "agreement"),
        ("fc1,reinit,0,,0.4,0.31,0.5,0.1,1.5,0.6,100,abc,critical", "delta_error"),
        ("fc1,reinit,0.5,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "checkpoint"),
        ("fc1,reinit,0,x,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "seed"),
        ("fc1,reinit,-3,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "checkpoint"),
        ("fc1,rerandom,,-1,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "seed"),
        ("fc1,reinit,0,,0.4,0.31,0.5,0.1,1.5,0.6,3.5,0.35,critical", "n"),
        ("fc1,reinit,0,,0.4,0.31,0.5,0.1,1.5,0.6,,0.35,critical", "n"),
        ("fc1,reinit,0,,0.4,0.31,0.5,0.1,1.5,0.6,-5,0.35,critical", "n"),
        (",reinit,0,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "unit"),
        ("fc1,,0,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "kind"),
        ("fc1,reinit,,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "checkpoint"),
        # what each kind of row has, and has not (a row no run can write)
        ("fc1,reinit,0,5,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "seed"),
        ("fc1,rerandom,,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "seed"),
        ("fc1,rerandom,3,1,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "checkpoint"),
        ("fc1+fc2,joint,,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "checkpoint"),
        ("fc1+fc2,joint,0,4,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical", "seed"),
        ("*,fullmodel,0,2,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,", "seed"),
        ("*,baseline,0,,0.05,0.02,0.11,0.01,0.2,1.0,100,0.0,", "checkpoint"),
    ],
)
def test_read_results_bad_cell_is_one_clear_error_naming_the_column(
    tmp_path: Path, row: str, column: str
) -> None:
    path = write_rows(tmp_path / "results.csv", [GOOD_BASE, GOOD_REINIT, row])
    with pytest.raises(LayerfastError) as info:
        read_results(path)
    msg = str(info.value)
    assert f"'{column}'" in msg, msg
    assert "row 3" in msg, msg  # the data row, counted from 1 below the header


@pytest.mark.parametrize(
    ("row", "said"),
    [
        ("fc1,interp,0,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical,0.5,0.1", "a seed (interp"),
        ("fc1,interp,0,3,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical,0.5,0", "draw no noise"),
    ],
)
def test_an_interp_row_has_a_seed_exactly_when_it_has_noise(tmp_path: Path, row: str,
                                                            said: str) -> None:
    good = ["fc1,interp,0,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical,0.5,0",
            "fc1,interp,0,3,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical,0.5,0.1",
            "fc1,foo,7,8,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical,,"]  # a kind of the API's user
    rows = [GOOD_BASE + ",,", GOOD_REINIT + ",,", *good]
    header = HEADER + ",alpha,sigma"
    assert len(read_results(write_rows(tmp_path / "results.csv", rows, header))) == 5
    with pytest.raises(LayerfastError, match=r"'seed', row 6.*" + re.escape(said)):
        read_results(write_rows(tmp_path / "results.csv", [*rows, row], header))


def test_report_cli_bad_results_is_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from layerfast.cli import main

    write_rows(tmp_path / "results.csv", [GOOD_BASE, GOOD_REINIT.replace("0.4,", "40,", 1)])
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'error'" in err
    assert not (tmp_path / "heatmap.png").exists()


def test_report_prints_the_summary_again_and_can_rejudge_it(ckpts, tmp_path, capsys) -> None:
    """`layerfast report OUT` only redrew the figures; a researcher had to rerun analyze to see
    the table again. It prints the run's summary (the same text analyze printed), judged at the
    run's threshold or at --threshold, which leaves results.csv as it was."""
    import os

    import layerfast
    from layerfast.cli import main

    out = tmp_path / "run"
    res = layerfast.analyze("fcn3x256", ckpts, data="digits", device="cpu", out=out,
                            progress=False, seeds=2)
    capsys.readouterr()
    before = (out / "results.csv").read_bytes()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == (f"{res.summary()}\n\nwrote {out / 'heatmap.png'}\n"
                    f"wrote {out / 'distances.png'}\n")
    assert main(["report", str(out), "--threshold", "0"]) == 0
    strict = capsys.readouterr().out
    assert "threshold: robust <=> error - baseline error <= 0 (0 points)" in strict
    assert ("(judged here at --threshold 0; results.csv keeps the run's verdicts at 0.05)\n\n"
            in strict)
    assert strict.count("reinit@0: critical") > text.count("reinit@0: critical")
    assert (out / "results.csv").read_bytes() == before
    (out / "run.json").unlink()  # killed while writing outputs: the threshold is not known
    assert main(["report", str(out)]) == 0
    assert "(no readable run.json: the run's threshold is unknown)\n\n" in capsys.readouterr().out
    for bad in ("-3", "7", "true", '"0.1"', "NaN"):  # a threshold the run could not have had
        (out / "run.json").write_text(f'{{"threshold": {bad}}}')
        assert main(["report", str(out)]) == 0
        assert "threshold is unknown" in capsys.readouterr().out, bad
    (out / "run.json").unlink()
    os.mkfifo(out / "run.json")  # a read would wait for a writer for ever
    assert main(["report", str(out)]) == 0
    assert "threshold is unknown" in capsys.readouterr().out
    assert main(["report", str(out), "--threshold", "-0"]) == 0
    assert "<= 0 (0 points)" in capsys.readouterr().out
    assert main(["report", str(out), "--threshold", "2"]) == 2
    assert "--threshold must lie in [0, 1]; got 2.0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- read_distances


def test_read_distances_empty_unit_is_a_layerfast_error(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "distances.csv", ["fc1,0,0,0,0", ",1,1.0,0.1,0.01"], DIST_HEADER)
    with pytest.raises(LayerfastError, match="'unit'"):
        read_distances(path)


def test_read_distances_non_numeric_value_is_an_error_not_a_grey_cell(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "distances.csv", ["fc1,0,0,0,0", "fc1,1,abc,0.1,0.01"], DIST_HEADER)
    with pytest.raises(LayerfastError, match="'l2'.*row 2"):
        read_distances(path)


def test_read_distances_keeps_nan_l2_rel_of_a_zero_initialized_unit(tmp_path: Path) -> None:
    """l2_rel is NaN by definition when ‖θ⁰‖ = 0 (distances.py): still readable."""
    path = write_rows(tmp_path / "distances.csv", ["fc1,0,0,,0", "fc1,1,1.0,,0.01"], DIST_HEADER)
    back = read_distances(path)
    assert back["l2_rel"].isna().all() and back["l2"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("row", "column"),
    [("fc1,1,1e308,0.1,0.01", "'l2'"), ("fc1,1,1.0,inf,0.01", "'l2_rel'"),
     ("fc1,rerandom:x,1.0,0.1,0.01", "'checkpoint'")],
)  # fmt: skip
def test_read_distances_refuses_what_the_figure_cannot_draw(tmp_path: Path, row: str,
                                                            column: str) -> None:
    """`layerfast report` on a distances.csv with 1e308 was matplotlib's OverflowError; inf and
    `rerandom:x` were accepted."""
    path = write_rows(tmp_path / "distances.csv", ["fc1,0,0,0,0", row], DIST_HEADER)
    with pytest.raises(LayerfastError, match=f"{column}.*row 2"):
        read_distances(path)


# ----------------------------------------------------------------------------- summary


def test_summary_does_not_call_a_unit_critical_without_samples() -> None:
    """With n = 0, delta_error is NaN and results.csv's verdict is empty: the summary must not
    print "critical" for it (NaN <= threshold is False)."""
    text = summary_table(small_table(n=0))
    rows = [line for line in text.splitlines() if line.startswith("fc")]
    assert len(rows) == 2 and not any("critical" in r or "robust" in r for r in rows), text


def test_read_results_keeps_seeds_above_2_to_the_53(tmp_path: Path) -> None:
    """Seeds may be any int64 >= 0 (docs/decisions.md); the seed column also has empty cells, so
    reading it through float64 turned seed 2**62 + 1 into 2**62 on the way back."""
    seed = 2**62 + 1
    variants = [FakeVariant("*", "baseline"), FakeVariant("fc1", "rerandom", None, seed)]
    table = results_table(variants, np.array([[90, 90, 5, 90], [10, 10, 50, 12]]), 100, 10)
    back = read_results(write_csv(table, tmp_path / "results.csv"))
    assert int(back["seed"].iloc[1]) == seed
    pd.testing.assert_frame_equal(back, table)


# ----------------------------------------------------------------------------- a unit named "*"


def star_unit_table() -> pd.DataFrame:
    """A unit named "*" (`--units '*'` made one before it was refused; a Unit built by hand
    still can), the name baseline and fullmodel rows carry: its reinit/rerandom rows are
    still a unit's, and the report must draw them."""
    variants = [
        FakeVariant("*", "baseline"),
        FakeVariant("*", "reinit", 0),
        FakeVariant("*", "reinit", 30),
        FakeVariant("*", "rerandom", None, 1),
    ]
    counts = np.array([[95, 99, 5, 95], [10, 40, 50, 12], [95, 99, 5, 95], [12, 40, 50, 12]])
    return results_table(variants, counts, 100, 10)


def test_heatmap_and_summary_show_a_unit_named_star(tmp_path: Path) -> None:
    from layerfast.report import heatmap
    from layerfast.report.figures import distance_grid, error_grid

    table = star_unit_table()
    rows, cols, grid = error_grid(table)  # was KeyError: '*' (a traceback from `analyze`)
    assert rows == ["*"] and cols == ["ReRnd", "0", "30"]
    np.testing.assert_allclose(grid, [[0.88, 0.90, 0.05]])
    heatmap(table, tmp_path / "heatmap.png")
    lines = summary_table(table).splitlines()
    assert any(line.startswith("*") and "90.00%" in line for line in lines), lines
    dist = pd.DataFrame(
        [("*", 0, 0.0, 0.0, 0.0), ("*", 30, 2.0, 0.5, 0.1)],
        columns=["unit", "checkpoint", "l2", "l2_rel", "linf"],
    )
    units, _, dgrid = distance_grid(dist, "l2_rel")
    assert units == ["*"] and dgrid.tolist() == [[0.0, 0.5]]


# ----------------------------------------------------------------------------- summary, fullmodel


def test_summary_shows_the_fullmodel_row_without_reinit_rows() -> None:
    """`--reset rerandom,fullmodel` (or fullmodel alone) is a valid run: its full-model
    reference row used to vanish from the terminal summary, which keyed τ0 on reinit rows."""
    variants = [
        FakeVariant("*", "baseline"),
        FakeVariant("fc1", "rerandom", None, 1),
        FakeVariant("*", "fullmodel", 0),
        FakeVariant("*", "fullmodel", 5),
    ]
    counts = np.array([[90, 95, 5, 90], [12, 40, 50, 12], [10, 40, 50, 12], [80, 90, 9, 80]])
    table = results_table(variants, counts, 100, 10)
    for t in (table, table[table["kind"] != "rerandom"]):
        text = summary_table(t)
        full = [line for line in text.splitlines() if line.startswith("(all units) ")]
        assert len(full) == 1 and "90.00%" in full[0], text
        what = "reference" if t is table else "no reinit or rerandom rows, so no"  # s22
        assert f"(all units): the whole model reset to tau=0 at once ({what}" in text
        assert "whole model reset, at each tau: 0: 90.00%, 5: 20.00%" in text  # the curve, every τ
    text = summary_table(table, bn="keep")
    assert ("(all units): the whole model reset to tau=0 at once (reference; normalization "
            "layers kept at the final model (--bn keep))") in text


def test_log_scale_distance_plot_draws_zero_at_the_lowest_colour_not_as_missing() -> None:
    """θ^0 against itself is exactly 0: on a log colour scale (values over > 2 decades) it must
    not share the grey of a missing cell (past 60 rows there are no numbers to tell them apart)."""
    from matplotlib.figure import Figure

    from layerfast.report import figures

    grid = np.array([[0.0, 1e-3, 1.0], [0.0, np.nan, 2.0]])
    norm, is_log = figures._norm_for(grid)
    assert is_log
    rows, cols = ["fc1", "fc2"], ["0", "1", "2"]
    geo = figures._Geometry(rows, cols, annot_chars=6, n_panels=1)
    ax = Figure().subplots()
    im = figures._draw_grid(ax, grid, rows, cols, norm, figures._two_sig, geo, ylabels=True)
    drawn = im.get_array()
    assert not drawn.mask[0, 0] and not drawn.mask[1, 0]  # the zeros are drawn...
    assert drawn.mask[1, 1]  # ...while the NaN stays a missing (grey) cell
    assert np.allclose(im.to_rgba(drawn)[0, 0], im.cmap(0.0))  # at the scale's lowest colour
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("0") == 2 and str(norm.vmin) not in texts  # annotated with the true 0

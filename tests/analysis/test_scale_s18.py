"""Review s18 (a real study at scale): regressions for what a many-unit, many-checkpoint run
showed in its figures, summary and progress output."""

from __future__ import annotations

import numpy as np


def test_log_scale_zero_cell_is_annotated_in_a_colour_that_contrasts_with_its_cell() -> None:
    """θ^0 against itself (the τ=0 column) is 0, drawn at a log panel's lowest (darkest) colour;
    its "0" was written in black (the colour of the cell LogNorm(0) maps to: the grey of a
    missing cell), unreadable on viridis' dark purple in every distances.png with a log ℓ∞
    panel."""
    from matplotlib.figure import Figure

    from layerfast.report import figures

    grid = np.array([[0.0, 1e-3, 1.0], [0.0, 0.02, 2.0]])
    norm, is_log = figures._norm_for(grid)
    assert is_log
    rows, cols = ["fc1", "fc2"], ["0", "1", "2"]
    geo = figures._Geometry(rows, cols, annot_chars=6, n_panels=1)
    ax = Figure().subplots()
    im = figures._draw_grid(ax, grid, rows, cols, norm, figures._two_sig, geo, ylabels=True)
    zeros = [t for t in ax.texts if t.get_text() == "0"]
    assert len(zeros) == 2
    cell = im.cmap(0.0)  # the lowest colour, where the zeros are drawn
    for t in zeros:
        assert t.get_color() == figures._text_color(cell) == "white"


class _Log:
    """A non-TTY stderr (a CI log, `2> run.log`): counts the progress bar's refreshes."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _refreshes_over_simulated_minutes(monkeypatch, make_bar) -> int:
    """Drive a bar through 600 updates one simulated second apart (10 minutes); return how
    many times it redrew itself into the log."""
    import sys

    log = _Log()
    monkeypatch.setattr(sys, "stderr", log)
    clock = [1000.0]
    bar = make_bar()
    monkeypatch.setattr(bar, "_time", lambda: clock[0])
    bar.start_t = bar.last_print_t = clock[0]
    for _ in range(600):
        clock[0] += 1.0
        bar.update(1)
    bar.close()
    return log.text.count("\r")


def test_analyze_progress_bar_does_not_redraw_every_tenth_of_a_second_into_a_log(
    monkeypatch,
) -> None:
    """stderr not a TTY: tqdm's 0.1 s refresh wrote a line per batch into a CI log (a long
    pass: thousands of lines). A log gets a line now and then, still with the progress."""
    from layerfast import analysis

    n = _refreshes_over_simulated_minutes(
        monkeypatch, lambda: analysis._progress(True, 600, 0, 883))
    assert 2 <= n <= 40, n


def test_train_progress_bar_does_not_redraw_every_tenth_of_a_second_into_a_log(
    monkeypatch,
) -> None:
    """`layerfast train` updates its bar every step: ~10 lines a second into a log (84 for a
    10 s digits run, ~16,000 for 30 minutes)."""
    from layerfast import errors

    n = _refreshes_over_simulated_minutes(
        monkeypatch, lambda: errors.progress_bar(total=600, desc="train fcn3x256", unit="step"))
    assert 2 <= n <= 40, n


def _long_name_tables(n: int, chars: int):
    import pandas as pd

    units = [(f"encoder.layers.{i}.attention.output.dense." * 100)[:chars] + f".w{i}"
             for i in range(n)]
    rows = [("*", "baseline", None, None, 0.02)]
    for u in units:
        rows += [(u, "reinit", t, None, 0.5) for t in range(12)]
        rows += [(u, "rerandom", None, 1, 0.9)]
    table = pd.DataFrame(rows, columns=["unit", "kind", "checkpoint", "seed", "error"])
    table["n"] = 100
    dist = pd.DataFrame([(u, t, 0.1 * t, 0.01 * t, 0.001 * t) for u in units for t in range(12)],
                        columns=["unit", "checkpoint", "l2", "l2_rel", "linf"])
    return units, table, dist


def test_long_unit_names_keep_the_figures_within_max_figure_in() -> None:
    """A unit named by a long --units regex (or a deeply nested module) made the row labels
    as wide as the name: 1,500 characters gave a 139 in (20,800 px) wide figure, past the
    40 in bound of docs/decisions.md. Labels that long are shortened in the middle; every row
    keeps a distinct label that starts and ends as its name does."""
    from layerfast.report import figures

    units, table, dist = _long_name_tables(5, 1500)
    for fig in (figures.heatmap_figure(table), figures.distance_figure(dist)):
        w, h = fig.get_size_inches()
        assert w <= figures.MAX_FIGURE_IN and h <= figures.MAX_FIGURE_IN, (w, h)
        ax = next(ax for ax in fig.axes if ax.get_ylabel() == "unit")
        labels = [t.get_text() for t in ax.get_yticklabels()]
        shown = labels[: len(units)]
        assert len(set(shown)) == len(units)
        for name, label in zip(units, shown, strict=True):
            assert len(label) < 200 and label[:20] == name[:20] and label[-4:] == name[-4:]


def test_ordinary_unit_names_are_not_shortened() -> None:
    from layerfast.report import figures

    units, table, _ = _long_name_tables(3, 60)
    fig = figures.heatmap_figure(table)
    ax = next(ax for ax in fig.axes if ax.get_ylabel() == "unit")
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == units

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

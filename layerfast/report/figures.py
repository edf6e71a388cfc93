"""Paper-style figures: the test-error heatmap (Fig. 1a) and the weight-distance heatmaps (1b/c).

Layout follows Zhang, Bengio & Singer (arXiv 1902.01996), Fig. 1: one row per unit in model
order, one column per reset source: `ReRnd` (re-randomization, mean over seeds) first, then each
checkpoint τ ascending; every cell annotated. The distance figure uses the same rows and columns
so a reader can lay the two side by side: "this layer is critical at τ=0 and it moved far from
its initialization" is read across figures, cell for cell.

Readability rules (the figures must work for a 4-layer MLP, for ResNet-50's 54 layers and for
a transformer's hundreds of parameter tensors):
- the figure grows with the number of rows and columns, fonts shrink with the cell size, and
  cell annotations are dropped only past `MAX_ANNOTATED_ROWS` rows or `MAX_ANNOTATED_COLS`
  columns, where they would be illegible anyway;
- ...but never past `MAX_FIGURE_IN` inches (6,000 px at 150 dpi) either way, so pixel size,
  memory and drawing time stay bounded (docs/decisions.md, Results). Rows that would not fit
  are wrapped into several blocks of panels side by side, each with every row labelled; only
  when even the widest row of blocks cannot hold them do rows (or, for very many checkpoints,
  columns) get thinner than a label, and then every k-th one is labelled; a row label longer
  than `MAX_LABEL_CHARS` is cut in the middle (`tables.fit_labels`) (results.csv has the full name);
- a perceptually uniform colormap (viridis), so equal steps in error look like equal steps;
  the error heatmap's scale is fixed at 0-100% (`ERROR_SCALE`), so a colour is the same error
  in every run (the distance panels have no such natural top: theirs spans their values);
- annotation colour is chosen per cell from the cell's luminance (white on dark, black on
  light);
- matplotlib's object API only (no pyplot): nothing global is touched, the Agg canvas is used
  regardless of the user's backend, and no figure is ever left open.
Every file is written atomically (tmp file in the same directory, then os.replace).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, LogNorm, Normalize
from matplotlib.figure import Figure

from layerfast.errors import LayerfastError
from layerfast.report.tables import MAX_LABEL_CHARS, atomic_path, fit_labels, tau_of, unit_order

__all__ = [
    "ERROR_SCALE",
    "FULLMODEL_ROW",
    "MAX_ANNOTATED_COLS",
    "MAX_ANNOTATED_ROWS",
    "MAX_FIGURE_IN",
    "MAX_LABEL_CHARS",
    "RERANDOM_COLUMN",
    "distance_grid",
    "distance_plot",
    "error_grid",
    "has_heatmap",
    "heatmap",
]

#: Label of the re-randomization column, as in the paper.
RERANDOM_COLUMN = "ReRnd"
#: Label of the reference row holding fullmodel resets (every unit := τ at once).
FULLMODEL_ROW = "all units (full model)"
MAX_ANNOTATED_ROWS = 60
MAX_ANNOTATED_COLS = 40
#: Largest figure width and height, in inches (x `_DPI` = 6,000 px).
MAX_FIGURE_IN = 40.0
#: Top of the error heatmap's colour scale, in %: fixed, not the largest error shown, so that
#: colours compare across runs (docs/decisions.md, Results).
ERROR_SCALE = 100.0
_PITCH = 0.17  # in: the thinnest row a 6 pt label fits (the natural row height's floor)
_CMAP = "viridis"
_DPI = 150
_CHAR_W = 0.62  # average glyph width of DejaVu Sans, in em


# ----------------------------------------------------------------------------- grids


def has_heatmap(table: pd.DataFrame) -> bool:
    """Whether `heatmap` has anything to draw: reinit, rerandom or fullmodel rows (a run of
    interp alone has none, and writes no heatmap.png)."""
    rows, cols, _ = error_grid(table)
    return bool(rows and cols)


def error_grid(table: pd.DataFrame) -> tuple[list[str], list[str], np.ndarray]:
    """Pivot a results table into (row labels, column labels, test error [rows, cols]).

    Rows: units with reinit/rerandom rows, in table order, then a `FULLMODEL_ROW` reference row
    if the table has fullmodel variants. Columns: `ReRnd` (mean error over rerandom seeds, if
    any) then every τ of reinit/fullmodel rows ascending. Missing combinations are NaN.
    joint/interp rows are not part of the paper's figure and are ignored.
    """
    kinds = table["kind"].astype(str)
    one = table[kinds.isin(["reinit", "rerandom"])]
    full = table[kinds == "fullmodel"]
    units = unit_order(one["unit"].astype(str))
    tau_rows = pd.concat([one[one["kind"] == "reinit"], full])
    taus = sorted({int(t) for t in tau_rows["checkpoint"].dropna()})
    has_rr = bool((one["kind"] == "rerandom").any())
    cols = ([RERANDOM_COLUMN] if has_rr else []) + [str(t) for t in taus]
    rows = units + ([FULLMODEL_ROW] if len(full) else [])
    grid = np.full((len(rows), len(cols)), np.nan)
    col_of = {c: j for j, c in enumerate(cols)}
    row_of = {u: i for i, u in enumerate(units)}

    rr = one[one["kind"] == "rerandom"].groupby("unit", sort=False)["error"].mean()
    for unit, err in rr.items():
        grid[row_of[str(unit)], col_of[RERANDOM_COLUMN]] = err
    ri = one[(one["kind"] == "reinit") & one["checkpoint"].notna()]
    for (unit, tau), err in ri.groupby(["unit", "checkpoint"], sort=False)["error"].mean().items():
        grid[row_of[str(unit)], col_of[str(int(tau))]] = err
    fm = full[full["checkpoint"].notna()]
    for tau, err in fm.groupby("checkpoint")["error"].mean().items():
        grid[len(units), col_of[str(int(tau))]] = err
    return rows, cols, grid


def distance_grid(distances: pd.DataFrame, column: str) -> tuple[list[str], list[str], np.ndarray]:
    """Pivot distances into (units, [ReRnd, τ...], values of `column`), like `error_grid`."""
    units = unit_order(distances["unit"].astype(str))
    tau = [tau_of(c) for c in distances["checkpoint"]]
    taus = sorted({t for t in tau if t is not None})
    has_rr = any(t is None for t in tau)
    cols = ([RERANDOM_COLUMN] if has_rr else []) + [str(t) for t in taus]
    col_of = {c: j for j, c in enumerate(cols)}
    row_of = {u: i for i, u in enumerate(units)}
    sums = np.zeros((len(units), len(cols)))
    counts = np.zeros((len(units), len(cols)))
    for unit, t, value in zip(distances["unit"].astype(str), tau, distances[column], strict=True):
        if pd.isna(value):
            continue
        i, j = row_of[unit], col_of[RERANDOM_COLUMN if t is None else str(t)]
        sums[i, j] += float(value)
        counts[i, j] += 1
    with np.errstate(invalid="ignore"):
        grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return units, cols, grid


# ----------------------------------------------------------------------------- drawing


def _two_sig(v: float) -> str:
    """Two significant digits, compact: 0.0032 -> '3.2e-3', 0.41 -> '0.41', 38.4 -> '38'."""
    if not math.isfinite(v):
        return ""
    if v == 0:
        return "0"
    a = abs(v)
    # The notation is chosen by the value as rounded for display, at both ends: 0.00996 is
    # written "0.010", as 0.0101 is, not "1.0e-2" in the cell beside it; 999.6 (shown as an
    # integer, "1000") is "1.0e3", as 1000.4 is, not four digits in the cell beside it.
    if abs(float(f"{v:.1e}")) < 0.01 or round(a) >= 1000:
        mant, exp = f"{v:.1e}".split("e")
        return f"{mant}e{int(exp)}"
    digits = max(0, 1 - math.floor(math.log10(a)))
    s = f"{v:.{digits}f}"
    if float(s) >= 10 ** (2 - digits) and digits > 0:  # 0.995 rounds up to 1.00 -> "1.0"
        s = f"{v:.{digits - 1}f}"
    return s


def _percent(v: float) -> str:
    """An error in [0, 1] as percent with 2 significant digits ('38', '1.6', '0.52', '100')."""
    if not math.isfinite(v):
        return ""
    p = 100.0 * v
    if p >= 99.5:
        return "100"
    if p == 0:
        return "0"
    if p < 0.01:
        return "<0.01"
    return _two_sig(p)


def _text_color(rgba: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a cell (WCAG relative luminance)."""

    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(float(c)) for c in rgba[:3])
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # Contrast with black (lum+0.05)/0.05 beats contrast with white 1.05/(lum+0.05) above ~0.18.
    return "black" if lum > 0.179 else "white"


def _text_w(text: str, font: float) -> float:
    """Approximate width in inches of one line of `text` at `font` points."""
    return len(text) * font * _CHAR_W / 72


class _Geometry:
    """Figure geometry for an R x C grid: cell size in inches and font sizes in points.

    Sizes are computed, not left to matplotlib's defaults, so that the figure grows with the
    grid instead of squeezing 54 rows into a fixed canvas. `figsize` then bounds the figure by
    `MAX_FIGURE_IN` in both directions: `n_blocks` side-by-side blocks of `block_rows` rows
    each (1 block of every row while that fits), and `row_every`/`col_every` > 1 only when
    rows/columns are thinner than a label.
    """

    def __init__(
        self, rows: Sequence[str], cols: Sequence[str], annot_chars: int, n_panels: int = 1
    ) -> None:
        n_rows, n_cols = len(rows), len(cols)
        self.n_rows, self.n_cols, self.n_panels = n_rows, n_cols, n_panels
        self.annotate = n_rows <= MAX_ANNOTATED_ROWS and n_cols <= MAX_ANNOTATED_COLS
        # Rows get thinner as there are more of them, down to a floor that 6 pt text still fits.
        self.cell_h = float(np.clip(0.36 - 0.003 * n_rows, _PITCH, 0.36))
        self.font = float(np.clip(self.cell_h * 72 * 0.5, 6.0, 10.0))
        self.label_font = self.font + 0.5
        if self.annotate:
            self.cell_w = max(0.42, _text_w("x" * annot_chars, self.font) + 0.14)
        else:
            self.cell_w = 0.3
        self._widest_col = max((_text_w(c, self.label_font) for c in cols), default=0.0)
        if self.annotate:  # annotated cells are wide anyway: widen a little more for "ReRnd"
            self.cell_w = max(self.cell_w, self._widest_col + 0.1)
        # Column labels that do not fit under their cell are turned upright, not overlapped.
        self.rotate_x = self._widest_col + 0.06 > self.cell_w
        self.label_w = max((_text_w(r, self.label_font) for r in rows), default=0.3)
        self.n_blocks, self.block_rows = 1, n_rows
        self.row_every = self.col_every = 1
        self.bounded = False  # set when `MAX_FIGURE_IN` changed the natural geometry
        self.panel_w = n_cols * self.cell_w
        self.panel_h = n_rows * self.cell_h

    def _fixed_w(self) -> float:
        """Width of one block besides its cells: colour bars, gaps, row labels."""
        return self.n_panels * 1.3 + self.label_w + 0.6

    def _bound(self, extra_h: float) -> None:
        """Fit the grid into `MAX_FIGURE_IN` x `MAX_FIGURE_IN` (class docstring)."""
        fixed = self._fixed_w()
        if self.n_panels * self.panel_w + fixed > MAX_FIGURE_IN:  # too many columns
            self.bounded = True
            if self.annotate:
                self.annotate, self.cell_w = False, 0.3
            avail = max(MAX_FIGURE_IN - fixed, 1.0) / self.n_panels
            if self.n_cols * self.cell_w > avail:
                self.cell_w = avail / self.n_cols
                pitch = 1.4 * self.label_font / 72  # an upright label's line height
                self.col_every = math.ceil(pitch / self.cell_w)
            self.rotate_x = self._widest_col + 0.06 > self.cell_w
            self.panel_w = self.n_cols * self.cell_w
        avail_h = MAX_FIGURE_IN - extra_h - (0.5 if self.rotate_x else 0.0)
        if self.panel_h <= avail_h:
            return
        # Too many rows: blocks side by side, as many as the width allows, each row labelled.
        self.annotate, self.bounded = False, True
        block_w = self.n_panels * self.panel_w + fixed
        fit_rows = max(1, math.floor(avail_h / _PITCH))
        max_blocks = max(1, math.floor(MAX_FIGURE_IN / block_w))
        self.n_blocks = min(max_blocks, math.ceil(self.n_rows / fit_rows))
        self.block_rows = math.ceil(self.n_rows / self.n_blocks)
        self.cell_h = min(self.cell_h, avail_h / self.block_rows)
        if self.cell_h < _PITCH:  # 1.2: the layout takes titles and labels out of the height
            self.row_every = math.ceil(1.2 * _PITCH / self.cell_h)
        self.panel_h = self.block_rows * self.cell_h

    def figsize(self, titles: Sequence[str], extra_h: float) -> tuple[float, float]:
        """(width, height): panels + row labels + colour bars, at least as wide as the titles.

        When a title forces a wider figure, the panels get the extra width, so the effective
        cell width (and with it whether column labels must be turned upright) is updated.
        """
        self._bound(extra_h)
        fixed = self._fixed_w()
        w = self.n_blocks * (self.n_panels * self.panel_w + fixed)
        title_w = max((_text_w(t, self.label_font + 1.5) for t in titles), default=0.0) + 0.4
        if title_w > w and self.n_blocks == 1:
            self.panel_w = (title_w - fixed) / self.n_panels
            self.rotate_x = self._widest_col + 0.06 > self.panel_w / max(self.n_cols, 1)
            w = title_w
        h = self.panel_h + extra_h + (0.5 if self.rotate_x else 0.0)
        return w, h

    def blocks(self) -> list[slice]:
        """The row ranges drawn side by side, top to bottom then left to right."""
        n = self.block_rows
        return [slice(b * n, min((b + 1) * n, self.n_rows)) for b in range(self.n_blocks)]

    def colorbar(self, fig: Figure, im: object, ax: Axes, label: str) -> object:
        """A colour bar as tall as the grid and about 0.18 in wide, whatever the grid's shape."""
        bar_w = 0.18
        cbar = fig.colorbar(
            im,  # type: ignore[arg-type]
            ax=ax,
            fraction=min(0.3, bar_w / max(self.panel_w, 0.1)),
            pad=min(0.05, 0.08 / max(self.panel_w, 0.1)),
            aspect=max(4.0, self.panel_h / bar_w),
        )
        cbar.set_label(label, fontsize=self.label_font + 0.5)
        cbar.ax.tick_params(labelsize=self.label_font)
        return cbar


def _cmap() -> Colormap:
    # Missing cells: neutral light grey, clearly not a value on the colour scale.
    return colormaps[_CMAP].with_extremes(bad="#d9d9d9")


def _draw_grid(
    ax: Axes,
    grid: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    norm: Normalize,
    fmt: Callable[[float], str],
    geo: _Geometry,
    ylabels: bool,
) -> object:
    cmap = _cmap()
    if isinstance(norm, LogNorm):
        # A distance of exactly 0 (θ^0 against itself) has no place on a log scale; drawn at the
        # scale's lowest colour, not the grey of a missing cell (its annotation still says 0).
        shown = np.where(np.isfinite(grid) & (grid <= 0), norm.vmin, grid)
    else:
        shown = grid
    masked = np.ma.masked_invalid(shown)
    if geo.bounded:
        # A large canvas: imshow resamples into float arrays the size of the axes in pixels
        # (~290 MB more for two 2,000-row panels); a mesh of cells draws straight onto it. Same
        # cell coordinates as imshow (centres on integers, row 0 on top).
        im = ax.pcolormesh(
            np.arange(grid.shape[1] + 1) - 0.5,
            np.arange(grid.shape[0] + 1) - 0.5,
            masked,
            cmap=cmap,
            norm=norm,
        )
        ax.set_ylim(grid.shape[0] - 0.5, -0.5)
    else:
        im = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    xs, ys = range(0, len(cols), geo.col_every), range(0, len(rows), geo.row_every)
    ax.set_xticks(
        xs,
        labels=[cols[j] for j in xs],
        fontsize=geo.label_font,
        rotation=90 if geo.rotate_x else 0,
        parse_math=False,
    )
    # Unit names are module names, which may hold `$` (`add_module("$x^2$", ...)`): matplotlib
    # would read a `$...$` pair as mathtext, drawing another name or failing the whole savefig.
    ax.set_yticks(ys, labels=[rows[i] for i in ys] if ylabels else [], fontsize=geo.label_font,
                  parse_math=False)
    if geo.n_blocks > 1:  # a shorter last block keeps the others' row height (blank below)
        ax.set_ylim(geo.block_rows - 0.5, -0.5)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    # White separators: the ReRnd column is a different kind of reset than the τ columns, and
    # the full-model row is a reference, not a unit.
    if cols and cols[0] == RERANDOM_COLUMN and len(cols) > 1:
        ax.axvline(0.5, color="white", lw=3)
    if rows and rows[-1] == FULLMODEL_ROW and len(rows) > 1:
        ax.axhline(len(rows) - 1.5, color="white", lw=3)
    if geo.annotate:
        _annotate(ax, grid, shown, masked, cmap, norm, fmt, geo.font)
    return im


def _annotate(
    ax: Axes,
    grid: np.ndarray,
    shown: np.ndarray,
    masked: np.ma.MaskedArray,
    cmap: Colormap,
    norm: Normalize,
    fmt: Callable[[float], str],
    font: float,
) -> None:
    """One text per finite cell: `fmt` of its value, black or white against the cell's colour.

    The colour of the cell as drawn (`shown`): norm(0) on a log scale is masked, which chose
    black for a 0 drawn at the scale's dark lowest colour. The cells' colours come from ONE
    norm and colormap call over the grid: per cell, matplotlib's LogNorm and Colormap calls
    cost ~0.8 ms each (a third of building a 22-row distance figure); elementwise they are
    the same arithmetic, so every cell gets the colour the per-cell calls gave.
    """
    finite = np.isfinite(grid)
    if not finite.any():
        return
    bad = np.ma.getmaskarray(masked)
    with np.errstate(invalid="ignore", divide="ignore"):
        rgba = cmap(norm(np.where(finite & ~bad, shown, norm.vmin).astype(np.float64)))
    for i, j in zip(*np.nonzero(finite), strict=True):
        colour = "black" if bad[i, j] else _text_color(rgba[i, j])
        ax.text(j, i, fmt(float(grid[i, j])), ha="center", va="center", fontsize=font,
                color=colour)


def _image_format(path: str | os.PathLike[str], name: str = "heatmap.png") -> str:
    """The format `path`'s suffix names, as matplotlib's `savefig` reads it; PNG without one.

    A fixed `format="png"` wrote PNG bytes into `res.plot("fig.pdf")`, which a PDF viewer or
    LaTeX then refuses. A suffix matplotlib cannot write is refused before anything is drawn
    (its own savefig raises for it too). So is a path that is no file name: `plot(5)` was a
    TypeError from `Path(5)`, `plot("")` "cannot write .: Device or resource busy"; and a
    directory (`plot(Path(""))` and `plot(".")` failed so too, `plot("sub/")` wrote a file
    named `sub`), which the message answers with `name`, the figure's usual file name."""
    if (not isinstance(path, str | os.PathLike) or isinstance(os.fspath(path), bytes)
            or not os.fspath(path).strip()):
        raise LayerfastError(f"a figure's path must be a file name (str or Path), got {path!r}")
    text = os.fspath(path)
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if (text.endswith(seps) or Path(text).name in ("", ".", "..")
            or os.path.isdir(text)):  # isdir: False, not an error, where it cannot look
        raise LayerfastError(f"a figure's path must be a file name, got the directory {text!r}: "
                             f"name the file, as {os.path.join(text, name)!r}")
    suffix = Path(path).suffix[1:].lower()
    if not suffix:
        return "png"
    supported = FigureCanvasAgg.get_supported_filetypes()
    if suffix not in supported:
        raise LayerfastError(
            f"cannot write a figure to {os.fspath(path)}: matplotlib knows no format "
            f"{suffix!r}; use one of {', '.join(sorted(supported))}"
        )
    return suffix


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write `fig` to `path` atomically, in the format its suffix names (`_image_format`)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=_image_format(target), dpi=_DPI, facecolor="white")
    return target


# ----------------------------------------------------------------------------- figures


def _baseline(table: pd.DataFrame) -> tuple[float | None, int | None]:
    base = table[table["kind"].astype(str) == "baseline"]
    if base.empty:
        return None, None
    return float(base["error"].iloc[0]), int(base["n"].iloc[0])


def heatmap(table: pd.DataFrame, path: str | os.PathLike[str], title: str | None = None,
            split: str = "test", precision: str | None = None) -> Path:
    """Write `heatmap_figure(table, title, split, precision)` to `path` (atomically), in the
    format its suffix names (PNG without one); returns the path."""
    _image_format(path)  # a suffix matplotlib cannot write is refused before the drawing
    return _save(heatmap_figure(table, title, split, precision), path)


def heatmap_labels(run: Mapping[str, Any] | None) -> dict[str, Any]:
    """The heatmap's labels from a run's record (run.json, `Analysis.run`): its title, split
    and precision, each as `heatmap_figure` takes it (defaults for what is missing or of
    another type: a hand-edited run.json must not stop a redraw)."""
    run = run if isinstance(run, Mapping) else {}
    title, precision = run.get("title"), run.get("precision")
    return {"title": title if isinstance(title, str) else None,
            "split": "train" if run.get("split") == "train" else "test",
            "precision": precision if isinstance(precision, str) else None}


def heatmap_figure(table: pd.DataFrame, title: str | None = None,
                   split: str = "test", precision: str | None = None) -> Figure:
    """The paper's Fig. 1a: test error (%) per unit (rows) and reset source (columns); a
    `--split train` run's errors are labelled "train error". The title says "after resetting
    one unit", or "the whole model" for a run of fullmodel rows alone (its one row). A bf16 or
    tf32 run (`precision`, as run.json records it) says so under the title: its rounding can
    move an error by up to about a point from fp32's, and a figure is often all a reader sees.

    Cells show the test error after resetting that unit alone, in percent with two significant
    digits. The colour scale is fixed at 0-100% (`ERROR_SCALE`), whatever the errors shown, so
    a colour means the same error in every run: cells near a low baseline are dark, cells near
    chance bright. (Scaled to the largest error shown, a run with nothing critical drew its
    worst robust cell, 5% error, in the yellow of a 98% cell elsewhere.) The baseline error is
    in the title and marked on the colour bar. A matplotlib `Figure` with an Agg canvas, not a pyplot one: a notebook
    shows it inline (after `%matplotlib inline`), `fig.savefig` works, and no pyplot state is
    created or leaked.
    """
    rows, cols, grid = error_grid(table)
    if not rows or not cols:
        raise LayerfastError(
            "heatmap: the results have no reinit, rerandom or fullmodel rows to draw"
        )
    rows = fit_labels(rows)
    base, n = _baseline(table)
    norm = Normalize(vmin=0.0, vmax=ERROR_SCALE)

    which = "train" if split == "train" else "test"
    # fullmodel rows alone (--reset fullmodel) reset no unit by itself: the title says what ran
    alone = not table["kind"].astype(str).isin(["reinit", "rerandom"]).any()
    what = "the whole model" if alone else "one unit"
    head = title if title is not None else f"{which.title()} error (%) after resetting {what}"
    sub = (
        "no baseline row"
        if base is None
        else (f"baseline {100 * base:.2f}% (n={n:,}; white line on the colour bar)")
    )
    if precision in ("bf16", "tf32"):
        sub += f"; precision {precision}"
    # a --reset rerandom run has no τ column: "checkpoint τ" would name nothing on the axis
    xlabel = ("checkpoint τ (re-initialization)" if cols != [RERANDOM_COLUMN]
              else "re-randomization (mean over seeds)")
    geo = _Geometry(rows, cols, annot_chars=4)
    fig = Figure(figsize=geo.figsize([head, sub], extra_h=1.6), layout="constrained")
    axes = fig.subplots(1, geo.n_blocks, squeeze=False)[0]
    for ax, blk in zip(axes, geo.blocks(), strict=True):
        im = _draw_grid(
            ax, 100.0 * grid[blk], rows[blk], cols, norm, lambda v: _percent(v / 100), geo, True
        )
        ax.set_xlabel(xlabel, fontsize=geo.label_font + 1)
        ax.set_ylabel("unit", fontsize=geo.label_font + 1)
        cbar = geo.colorbar(fig, im, ax, f"{which} error (%)")
        if base is not None:
            # A white line on the colour bar puts the baseline on the same scale as the cells.
            cbar.ax.axhline(100.0 * base, color="white", lw=2)  # type: ignore[attr-defined]
    fig.suptitle(f"{head}\n{sub}", fontsize=geo.label_font + 1.5)
    FigureCanvasAgg(fig)
    return fig


def _norm_for(grid: np.ndarray) -> tuple[Normalize, bool]:
    """Linear colour scale unless positive values span more than two decades (then log)."""
    pos = grid[np.isfinite(grid) & (grid > 0)]
    if pos.size == 0:
        return Normalize(vmin=0.0, vmax=1.0), False
    hi = float(pos.max())
    # At most 40 decades below the largest value: hi / lo overflowed to inf for values from
    # 1e-300 to 1e250 (a crash in the colour bar's ticks), and a wider bar shows nothing more.
    # Smaller values take the lowest colour; their annotations keep the true values.
    lo = max(float(pos.min()), hi * 1e-40)
    if hi > 100.0 * lo:
        return LogNorm(vmin=lo, vmax=hi), True
    return Normalize(vmin=0.0, vmax=hi), False


def distance_plot(distances_df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write `distance_figure(distances_df)` to `path` (atomically), in the format its suffix
    names (PNG without one); returns the path."""
    _image_format(path, "distances.png")  # a bad suffix is refused before the drawing
    return _save(distance_figure(distances_df), path)


def distance_figure(distances_df: pd.DataFrame) -> Figure:
    """The paper's Fig. 1b/c: per-unit distance of θ^τ from θ^0, two heatmap panels.

    Left: relative ℓ2 distance ‖θ^τ − θ^0‖₂ / ‖θ^0‖₂ (comparable across units of different
    size); right: ℓ∞ distance ‖θ^τ − θ^0‖∞. Same rows and columns as the error heatmap; the
    ReRnd column is a fresh draw against θ^0 (mean over seeds), the yardstick for "as far as a
    random re-draw". A panel switches to a log colour scale when its values span more than two
    decades (stated in its colour-bar label). A `Figure` with an Agg canvas, as
    `heatmap_figure`'s.
    """
    for col in ("unit", "checkpoint", "l2_rel", "linf"):
        if col not in distances_df.columns:
            raise LayerfastError(f"distance_plot: distances have no {col!r} column")
    if distances_df.empty:
        raise LayerfastError("distance_plot: the distances table is empty")
    panels = [
        (
            "l2_rel",
            r"relative $\ell_2$ distance  $\Vert\theta^\tau-\theta^0\Vert_2\,/\,\Vert\theta^0\Vert_2$",
        ),
        ("linf", r"$\ell_\infty$ distance  $\Vert\theta^\tau-\theta^0\Vert_\infty$"),
    ]
    grids = [distance_grid(distances_df, col) for col, _ in panels]
    rows, cols, _ = grids[0]
    rows = fit_labels(rows)
    heading = [r"Distance of each unit's weights from their initialization $\theta^0$"]
    if RERANDOM_COLUMN in cols:  # a run without rerandom has no such column to explain
        heading.append(
            f"{RERANDOM_COLUMN}: a fresh random draw against " + r"$\theta^0$ (mean over seeds)"
        )
    geo = _Geometry(rows, cols, annot_chars=6, n_panels=2)
    fig = Figure(figsize=geo.figsize(heading, extra_h=1.8), layout="constrained")
    # Per block of rows, the two panels side by side (each block reads like the whole figure).
    axes = fig.subplots(1, 2 * geo.n_blocks).reshape(geo.n_blocks, 2)
    norms = [_norm_for(grid) for _, _, grid in grids]
    for pair, blk in zip(axes, geo.blocks(), strict=True):
        for k, (ax, (_, label), (_, _, grid), (norm, is_log)) in enumerate(
            zip(pair, panels, grids, norms, strict=True)
        ):
            im = _draw_grid(ax, grid[blk], rows[blk], cols, norm, _two_sig, geo, ylabels=k == 0)
            ax.set_title(label, fontsize=geo.label_font + 1)
            ax.set_xlabel("checkpoint τ", fontsize=geo.label_font + 1)
            if k == 0:
                ax.set_ylabel("unit", fontsize=geo.label_font + 1)
            geo.colorbar(fig, im, ax, "distance" + (" (log scale)" if is_log else ""))
    fig.suptitle("\n".join(heading), fontsize=geo.label_font + 1.5)
    FigureCanvasAgg(fig)
    return fig

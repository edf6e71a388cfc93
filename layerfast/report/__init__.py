"""Results on disk and on screen: CSV files, paper-style figures, the terminal summary.

    tables.py    write_csv / read_results / read_distances, atomic file replacement
    figures.py   heatmap (Fig. 1a), distance_plot (Fig. 1b/c); *_figure return the Figure
    terminal.py  summary_table

`redraw(out_dir)` rebuilds the figures of a finished run from its CSV files alone, so
`layerfast report OUT` can restyle a run without touching a GPU; `summary(out_dir)` prints
its terminal table again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

from layerfast.errors import LayerfastError
from layerfast.report.figures import (
    distance_figure,
    distance_plot,
    has_heatmap,
    heatmap,
    heatmap_figure,
    heatmap_labels,
)
from layerfast.report.tables import atomic_path, read_distances, read_results, write_csv
from layerfast.report.terminal import summary_table

__all__ = [
    "atomic_path",
    "distance_figure",
    "distance_plot",
    "has_heatmap",
    "heatmap",
    "heatmap_figure",
    "heatmap_labels",
    "read_distances",
    "read_results",
    "redraw",
    "summary",
    "summary_table",
    "write_csv",
]


def summary(out_dir: str | os.PathLike[str], threshold: float | None = None) -> str:
    """The run's terminal summary again, from its CSV files, at the threshold and BN policy
    its run.json records (the verdicts in results.csv were judged at that threshold), or
    judged afresh at `threshold`. Without a readable run.json (a run killed while writing its
    outputs) the default 0.05 is used unless `threshold` is given, and the summary says so."""
    out = Path(out_dir)
    table, dist = _read(out)
    note, run = "", None
    try:
        path = out / "run.json"
        if not path.is_file() or path.stat().st_size > 16 << 20:  # a FIFO, /dev/zero, a huge file
            raise ValueError(path)
        run = json.loads(path.read_text())
        value = run["threshold"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(value)  # NaN fails too
        recorded, bn = float(value), str(run.get("bn", "with-layer"))
    except (OSError, ValueError, KeyError, TypeError):
        recorded, bn = 0.05, "with-layer"
        # A run.json that parses but holds no threshold in [0, 1] is not "no readable run.json":
        # saying so would send the user looking for a missing or damaged file.
        what = ("run.json records no threshold in [0, 1]" if isinstance(run, dict)
                else "no readable run.json")
        note = f"\n({what}: the run's threshold is unknown)"
    if threshold is not None:
        threshold = abs(threshold) if threshold == 0 else threshold  # -0 printed as "-0"
    if threshold is not None and threshold != recorded and not note:
        note = (f"\n(judged here at --threshold {threshold:g}; results.csv keeps the run's "
                f"verdicts at {recorded:g})")
    split = run.get("split", "test") if isinstance(run, dict) else "test"
    precision = run.get("precision") if isinstance(run, dict) else None
    return summary_table(table, dist, recorded if threshold is None else threshold, bn,
                         split=str(split), precision=precision) + note


def _read(out: Path):
    """results.csv and distances.csv (None when absent) of the out dir, checked."""
    if not out.is_dir():
        raise LayerfastError(f"{out} is not a directory (expected a layerfast --out directory)")
    results = out / "results.csv"
    if results.exists() and not results.is_file():  # "not found" would send users looking
        raise LayerfastError(f"{results} is not a regular file (expected the results.csv of "
                             "`layerfast analyze --out DIR`)")
    if not results.is_file():
        inner = out / "analysis"  # `layerfast demo --out DIR` analyzes into DIR/analysis
        hint = (f"; `layerfast demo` writes its analysis to {inner}: layerfast report {inner}"
                if (inner / "results.csv").is_file() else "")
        raise LayerfastError(
            f"{results} not found: {out} does not look like a finished layerfast run "
            f"(expected results.csv from `layerfast analyze --out DIR`){hint}"
        )
    dist_path = out / "distances.csv"
    return read_results(results), read_distances(dist_path) if dist_path.is_file() else None


def redraw(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Rewrite `heatmap.png` (unless the run has only interp rows, as `analyze` draws none)
    and `distances.png` (if `distances.csv` has rows) in `out_dir`.

    Reads only `results.csv` / `distances.csv`, so it works on a run made elsewhere. Returns
    the paths written. A missing out dir or results.csv is a LayerfastError, since it is what a
    user gets by pointing `layerfast report` at the wrong directory. A header-only
    distances.csv is what a run without τ = 0 writes (nothing to measure from, no
    distances.png; docs/decisions.md), so it is skipped, as `analyze` skips it. Both CSV files
    are read and checked before anything is written, so bad input leaves the figures as they were,
    and both figures are drawn to temporary files before either replaces its old one, so a full
    disk cannot leave a new heatmap beside an old distance plot. It holds the out dir's run
    lock: a run writing there is one clear error (`store.locked_dir`).
    """
    from layerfast.store import locked_dir

    out = Path(out_dir)
    _read(out)  # a missing or foreign directory: its own message, before any lock file
    with locked_dir(out):
        return _redraw(out)


def _recorded_labels(out: Path) -> dict[str, object]:
    """The heatmap's labels from run.json (`heatmap_labels`: the defaults, test and no
    precision line, when it cannot be read), so a redraw says what `analyze` drew."""
    run = None
    try:
        path = out / "run.json"
        if path.is_file() and path.stat().st_size <= 16 << 20:  # as `summary` reads it
            run = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    return heatmap_labels(run)


def _redraw(out: Path) -> list[Path]:
    table, dist = _read(out)  # again under the lock: a run may have finished meanwhile
    draws: list[tuple[Callable[..., Path], object, Path]] = []
    if has_heatmap(table):
        labels = _recorded_labels(out)
        draws.append((functools.partial(heatmap, **labels), table, out / "heatmap.png"))
    if dist is not None and len(dist):
        draws.append((distance_plot, dist, out / "distances.png"))
    for _, _, target in draws:  # checked first: the second move failing would mix the figures
        if target.exists() and not target.is_file():
            raise LayerfastError(f"{target} is not a regular file: remove it to redraw there")
    with contextlib.ExitStack() as moves:  # each moves its file into place when all are drawn
        for draw, data, target in draws:
            draw(data, moves.enter_context(atomic_path(target)))
    return [target for _, _, target in draws]

"""CPU-side waste in `analyze`, with results unchanged bit for bit.

- Each (unit, seed) re-randomization draw is made once per run: the init check's draw is the
  one the variant evaluates (handed over once), and distances.csv's rerandom rows use the
  draw's numbers taken when it was made (`layerfast.variants._Draws`).
- The figures colour their cell annotations from one norm/colormap call per grid, not one per
  cell (`layerfast.report.figures._annotate`), with the same colour for every cell.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import LogNorm, Normalize

import layerfast
import layerfast.distances as distances_mod
import layerfast.variants as variants_mod
from layerfast.checkpoints import CheckpointDir
from layerfast.distances import distances
from layerfast.models import build_model
from layerfast.report import figures
from layerfast.units import make_units
from layerfast.variants import make_variants, rerandom_draw

pytestmark = pytest.mark.usefixtures("one_thread")


def _counting(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Count `rerandom_draw` calls per (unit, seed), wherever layerfast calls it from."""
    calls: collections.Counter = collections.Counter()
    real = variants_mod.rerandom_draw

    def counted(model, unit, seed, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[(unit.name, seed)] += 1
        return real(model, unit, seed, *args, **kwargs)

    monkeypatch.setattr(variants_mod, "rerandom_draw", counted)
    monkeypatch.setattr(distances_mod, "rerandom_draw", counted)
    return calls


def _model(ckpts: Path):  # type: ignore[no-untyped-def]
    from layerfast.data import open_data

    src = open_data("digits", split="test", max_samples=1)
    model, spec = build_model("fcn3x256", src.num_classes, tuple(src.shape))
    ck = CheckpointDir(ckpts)
    model.load_state_dict(ck.tensors(ck.final, tuple(model.state_dict())))
    return model, spec, ck


def test_analyze_draws_each_unit_seed_once(ckpts: Path, tmp_path: Path, monkeypatch) -> None:
    """Before: the init check, the engine's staging and distances.csv each drew seed 1 (three
    draws), and every other seed twice."""
    calls = _counting(monkeypatch)
    res = layerfast.analyze(arch="fcn3x256", ckpts=ckpts, data="digits", max_samples=40,
                            device="cpu", seeds=2, out=tmp_path / "o", progress=False,
                            figures=False)
    units = [u.name for u in res.units]
    assert dict(calls) == {(u, s): 1 for u in units for s in (1, 2)}
    # and distances.csv still has a rerandom row per (unit, seed), measured from that draw
    rr = res.distances[res.distances["checkpoint"].astype(str).str.startswith("rerandom")]
    assert len(rr) == 2 * len(units)


def test_distances_rows_are_those_of_a_fresh_draw(ckpts: Path) -> None:
    """The rerandom rows distances measures from the variants' own draws (their stats taken
    when drawn) equal, bit for bit, the rows of a fresh draw of each seed (the int-seed path
    draws anew), and the τ rows are unchanged."""
    model, spec, ck = _model(ckpts)
    units = make_units(model, arch=spec)
    variants = make_variants(model, units, ck, spec, seeds=(1, 7))
    for v in variants:  # what the engine does: stage every variant once
        v.overrides()
    rr = [v for v in variants if v.kind == "rerandom"]
    got = distances(model, units, ck, rerandom=rr, arch=spec)
    want = distances(model, units, ck, rerandom=[1, 7], arch=spec)
    # same rows, same order (per unit: τ ascending, then the seeds in order)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_the_check_draw_is_the_evaluated_one_and_handed_over_once(
    ckpts: Path, monkeypatch
) -> None:
    model, spec, ck = _model(ckpts)
    units = make_units(model, arch=spec)
    calls = _counting(monkeypatch)
    variants = make_variants(model, units, ck, spec, reset="rerandom", seeds=(3,))
    assert dict(calls) == {(u.name, 3): 1 for u in units}  # the init check's draws
    theta0 = {u.name: ck.tensors(0, u.keys) for u in units}
    for v in variants[1:]:
        u = next(x for x in units if x.name == v.unit)
        first = v.overrides()  # the check's draw: no new one
        assert calls[(u.name, 3)] == 1
        fresh = rerandom_draw(model, u, 3, spec, theta0[u.name])
        assert set(first) == set(fresh)
        assert all(torch.equal(first[k], fresh[k]) for k in fresh)
        again = v.overrides()  # not cached beyond that: drawn anew, the same numbers
        assert again is not first
        assert all(torch.equal(again[k], first[k]) for k in first)


def test_held_draws_are_bounded_and_let_go(ckpts: Path) -> None:
    """The check's draws wait for their variants at most one model's state in all, and none
    is kept once its variant has been staged."""
    model, spec, ck = _model(ckpts)
    units = make_units(model, arch=spec)
    variants = make_variants(model, units, ck, spec, seeds=(1, 2))
    rr = [v for v in variants if v.kind == "rerandom"]
    draws = rr[0]._load.__closure__  # type: ignore[union-attr]
    store = next(c.cell_contents for c in draws if isinstance(c.cell_contents, variants_mod._Draws))
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    held = sum(t.numel() * t.element_size() for d in store._held.values() for t in d.values())
    assert 0 < held <= state
    for v in rr:
        v.overrides()
    assert store._held == {}


# ----------------------------------------------------------------------------- figures


def _reference_colours(grid: np.ndarray, norm: Normalize) -> list[tuple[str, str]]:
    """(label, colour) per finite cell, row-major, computed per cell as the code once did."""
    cmap = figures._cmap()
    if isinstance(norm, LogNorm):
        shown = np.where(np.isfinite(grid) & (grid <= 0), norm.vmin, grid)
    else:
        shown = grid
    masked = np.ma.masked_invalid(shown)
    out = []
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            if not math.isfinite(v):
                continue
            colour = (figures._text_color(cmap(norm(float(shown[i, j]))))
                      if not np.ma.getmaskarray(masked)[i, j] else "black")
            out.append((figures._two_sig(v), colour))
    return out


@pytest.mark.parametrize("log", [False, True])
def test_annotation_colours_are_the_per_cell_ones(log: bool) -> None:
    rng = np.random.default_rng(5)
    grid = rng.uniform(0.2, 1.0, (9, 5)) if not log else 10.0 ** rng.uniform(-9, 2, (9, 5))
    grid[2, 3] = np.nan
    grid[0, 0] = 0.0
    # values right at the black/white switch of viridis, where a rounding would show
    grid[4] = np.linspace(0.3, 0.5, 5) * (grid[np.isfinite(grid)].max())
    norm, is_log = figures._norm_for(grid)
    assert is_log == log
    rows, cols = [f"u{i}" for i in range(9)], ["ReRnd", "0", "1", "2", "3"]
    geo = figures._Geometry(rows, cols, annot_chars=6)
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    figures._draw_grid(ax, grid, rows, cols, norm, figures._two_sig, geo, True)
    got = [(t.get_text(), t.get_color()) for t in ax.texts]
    assert got == _reference_colours(grid, norm)
    # and where they sit: cell centres, row-major
    finite = list(zip(*np.nonzero(np.isfinite(grid)), strict=True))
    assert [t.get_position() for t in ax.texts] == [(j, i) for i, j in finite]


def test_distance_figure_normalizes_each_panel_once(monkeypatch) -> None:
    """Before: one norm call per annotated cell (~0.8 ms each for a LogNorm)."""
    calls = collections.Counter()
    real = figures._norm_for

    def counting(grid: np.ndarray):  # type: ignore[no-untyped-def]
        norm, is_log = real(grid)
        base = type(norm)

        class Counted(base):  # type: ignore[valid-type, misc]
            def __call__(self, value, clip=None):  # type: ignore[no-untyped-def]
                calls[id(self)] += 1
                return super().__call__(value, clip)

        norm.__class__ = Counted
        return norm, is_log

    monkeypatch.setattr(figures, "_norm_for", counting)
    rows = [{"unit": f"u{i}", "checkpoint": c, "l2": 1.0, "l2_rel": 0.1 * (i + 1) * 10.0 ** -k,
             "linf": 0.01 * (i + 1)}
            for i in range(12) for k, c in enumerate(["0", "1", "2", "rerandom:1"])]
    fig = figures.distance_figure(pd.DataFrame(rows))
    assert sum(len(ax.texts) for ax in fig.axes) == 2 * 12 * 4
    # imshow and the annotations: a handful per panel, not one per cell
    assert calls and max(calls.values()) <= 4

"""Outputs at scale: figures bounded in pixels for any number of units and checkpoints, and
distances computed once per unit, on one thread, bit for bit the straightforward computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.distances import distances
from layerfast.report import distance_plot, heatmap
from layerfast.report import figures as fig_mod
from layerfast.units import Unit
from layerfast.variants import make_variants

MAX_PX = round(fig_mod.MAX_FIGURE_IN * fig_mod._DPI)


def results(units: list[str], taus: list[int], seeds: int = 2) -> pd.DataFrame:
    """A results.csv-like table: what error_grid reads (unit, kind, checkpoint, error, n)."""
    rows = [("*", "baseline", None, None, 0.02)]
    for i, u in enumerate(units):
        rows += [(u, "reinit", t, None, 0.02 + 0.5 * (i % 7 == 0) / (1 + t)) for t in taus]
        rows += [(u, "rerandom", None, s, 0.88) for s in range(1, seeds + 1)]
    rows += [("*", "fullmodel", t, None, 0.9 if t == 0 else 0.02) for t in taus]
    df = pd.DataFrame(rows, columns=["unit", "kind", "checkpoint", "seed", "error"])
    df["n"] = 1000
    return df


def dist_table(units: list[str], taus: list[int]) -> pd.DataFrame:
    rows = []
    for i, u in enumerate(units):
        rows += [(u, t, t * 0.1, t * 0.01 + i * 1e-4, t * 1e-3) for t in taus]
        rows.append((u, "rerandom:1", 14.0, 1.4, 0.12))
    return pd.DataFrame(rows, columns=["unit", "checkpoint", "l2", "l2_rel", "linf"])


def px(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


# ----------------------------------------------------------------------------- figures


@pytest.mark.parametrize(("n_units", "n_taus"), [(350, 3), (6, 400)])
def test_figures_stay_within_the_pixel_bound(tmp_path: Path, n_units: int, n_taus: int) -> None:
    """350 units used to give a ~9,000 px tall heatmap, 400 checkpoints a ~37,000 px wide
    distance figure; now both stay within MAX_FIGURE_IN."""
    units = [f"blocks.{i}.attn.qkv.weight" for i in range(n_units)]
    taus = list(range(0, 10 * n_taus, 10))
    for path in (
        heatmap(results(units, taus), tmp_path / "heatmap.png"),
        distance_plot(dist_table(units, taus), tmp_path / "distances.png"),
    ):
        w, h = px(path)
        assert w <= MAX_PX and h <= MAX_PX, (path.name, w, h)
        assert max(w, h) > MAX_PX // 2  # bounded, not shrunk to a thumbnail


def capture(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    figs: list[Figure] = []
    monkeypatch.setattr(fig_mod, "_save", lambda fig, path: figs.append(fig) or Path(path))
    return figs


def ylabels(fig: Figure) -> list[str]:
    axes = [ax for ax in fig.axes if ax.get_ylabel() == "unit"]  # not the colour bars
    return [t.get_text() for ax in axes for t in ax.get_yticklabels() if t.get_text()]


def test_hundreds_of_units_wrap_into_blocks_with_every_row_labelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    figs = capture(monkeypatch)
    units = [f"u{i}" for i in range(400)]
    heatmap(results(units, [0, 1, 2]), "unused.png")
    distance_plot(dist_table(units, [0, 1, 2]), "unused.png")
    heat, dist = figs
    w, h = heat.get_size_inches()
    assert h <= fig_mod.MAX_FIGURE_IN and w <= fig_mod.MAX_FIGURE_IN
    blocks = [ax for ax in heat.axes if ax.get_ylabel() == "unit"]
    assert len(blocks) >= 2
    assert ylabels(heat) == [*units, fig_mod.FULLMODEL_ROW]  # each row once, in order
    assert ylabels(dist) == units
    titled = [ax for ax in dist.axes if ax.get_title()]
    assert len(titled) == 2 * len([ax for ax in dist.axes if ax.get_ylabel() == "unit"])


def test_past_the_widest_row_of_blocks_labels_are_thinned_not_overlapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    figs = capture(monkeypatch)
    units = [f"u{i}" for i in range(2000)]
    heatmap(results(units, list(range(30))), "unused.png")
    fig = figs[0]
    assert max(fig.get_size_inches()) <= fig_mod.MAX_FIGURE_IN
    shown = ylabels(fig)
    assert 50 < len(shown) < len(units)
    ax = next(ax for ax in fig.axes if ax.get_ylabel() == "unit")
    ticks = ax.get_yticks()
    rows_per_inch = (ax.get_ylim()[0] - ax.get_ylim()[1]) / (
        ax.get_position().height * fig.get_size_inches()[1]
    )
    gap_in = float(np.diff(ticks).min()) / rows_per_inch
    font_in = ax.get_yticklabels()[0].get_fontsize() / 72
    assert gap_in >= 1.2 * font_in  # one label's line height apart: no overlap


@pytest.mark.parametrize(("n_units", "n_cols"), [(4, 9), (54, 9), (60, 12), (4, 41)])
def test_the_usual_case_keeps_its_natural_geometry(n_units: int, n_cols: int) -> None:
    """4–60 units, up to ~40 columns: the bound does not touch the paper-like layout."""
    rows, cols = (
        [f"layer{i}.conv" for i in range(n_units)],
        ["ReRnd"] + [str(t) for t in range(n_cols - 1)],
    )
    for chars, panels, extra in ((4, 1, 1.6), (6, 2, 1.8)):
        geo = fig_mod._Geometry(rows, cols, annot_chars=chars, n_panels=panels)
        natural = (geo.cell_h, geo.cell_w, geo.annotate)
        geo.figsize(["title"], extra_h=extra)
        assert not geo.bounded and geo.n_blocks == 1
        assert (geo.cell_h, geo.cell_w, geo.annotate) == natural
        assert geo.row_every == geo.col_every == 1


# ----------------------------------------------------------------------------- distances


class Wide(nn.Module):
    """fc1 has 72,000 weights: torch splits a float64 sum of more than 32,768 elements over
    threads, which changed the last bit of l2 with the thread count."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(360, 200)
        self.fc2 = nn.Linear(200, 10)


UNITS = [
    Unit("fc1", ("fc1",), ("fc1.weight", "fc1.bias")),
    Unit("fc2", ("fc2",), ("fc2.weight", "fc2.bias")),
]


def reference_row(theta: dict, theta0: dict, keys: tuple[str, ...]) -> tuple[float, float, float]:
    """The straightforward computation, tensor by tensor, as distances.py once did it."""
    sq = sq0 = linf = 0.0
    for k in keys:
        a, b = theta[k].double(), theta0[k].double()
        d = a - b
        sq += float((d * d).sum())
        linf = max(linf, float(d.abs().max()))
        sq0 += float((b * b).sum())
    return math.sqrt(sq), math.sqrt(sq) / math.sqrt(sq0), linf


@pytest.fixture
def wide_run(tmp_path: Path) -> tuple[nn.Module, CheckpointDir]:
    torch.manual_seed(0)
    model = Wide()
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(sd0, tmp_path / "e_0.pt")
    for t in (1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * t * torch.randn_like(p))
        torch.save(model.state_dict(), tmp_path / f"e_{t}.pt")
    return model, CheckpointDir(tmp_path)


def test_distances_equal_the_reference_bit_for_bit_whatever_the_threads(wide_run) -> None:
    model, ck = wide_run
    vs = make_variants(model, UNITS, ck, reset=("reinit", "rerandom"), seeds=(1, 2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = distances(model, UNITS, ck, rerandom=vs)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        two = distances(model, UNITS, ck, rerandom=vs)
        assert torch.get_num_threads() == 2  # restored after its one-thread arithmetic
        torch.set_num_threads(1)  # the reference on one thread: torch's sums in a fixed order
        draws = {(v.unit, v.seed): v.overrides() for v in vs if v.kind == "rerandom"}
        want = []
        for u in UNITS:
            theta0 = ck.tensors(0, u.keys)
            for t in ck.labels:
                want.append(reference_row(ck.tensors(t, u.keys), theta0, u.keys))
            for s in (1, 2):
                want.append(reference_row(draws[(u.name, s)], theta0, u.keys))
    finally:
        torch.set_num_threads(before)
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    got = list(one[["l2", "l2_rel", "linf"]].itertuples(index=False, name=None))
    assert got == want  # exact: not approx
    assert list(one["checkpoint"][:5]) == [0, 1, 5, "rerandom:1", "rerandom:2"]
    assert one["l2"].iloc[1] > 0 and one["l2"].iloc[3] != one["l2"].iloc[4]


def test_distances_do_not_modify_the_draws_or_checkpoint_tensors(wide_run) -> None:
    """The float64 buffer is worked on in place: it must be a copy even for float64 input."""
    model, ck = wide_run
    model = model.double()
    vs = make_variants(model, UNITS, ck, reset=("rerandom",), seeds=(3,))
    rr = [v for v in vs if v.kind == "rerandom"]
    first = distances(model, UNITS, ck, rerandom=rr, checkpoints=[5])
    again = distances(model, UNITS, ck, rerandom=rr, checkpoints=[5])
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    assert first["l2"].iloc[0] > 0

"""report: CSV files, paper-style figures, terminal summary, redraw (DESIGN.md §5)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from layerfast.errors import LayerfastError
from layerfast.metrics import COLUMNS, results_table
from layerfast.report import (
    distance_plot,
    heatmap,
    read_distances,
    read_results,
    redraw,
    summary_table,
    write_csv,
)
from layerfast.report import figures as fig_mod

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAUS = (0, 1, 2, 3, 8, 40, 90, 100)
SEEDS = (1, 2, 3)


@dataclass
class FakeVariant:
    unit: str
    kind: str
    checkpoint: int | None = None
    seed: int | None = None


def make_table(
    units: list[str],
    critical: dict[str, float] | None = None,
    n: int = 10000,
    num_classes: int = 10,
    threshold: float = 0.05,
) -> pd.DataFrame:
    """A fake fcn3x256-like study: `critical` units fail at early τ, rerandom fails at chance."""
    critical = critical or {}
    rng = np.random.default_rng(0)
    base = 0.0162
    variants = [FakeVariant("*", "baseline")]
    errors = [base]
    for u in units:
        for t in TAUS:
            variants.append(FakeVariant(u, "reinit", t))
            errors.append(min(0.9, base + critical.get(u, 0.0) * np.exp(-t / 1.5)))
        for s in SEEDS:
            variants.append(FakeVariant(u, "rerandom", None, s))
            errors.append(rng.uniform(0.85, 0.9))
    for t in TAUS:
        variants.append(FakeVariant("*", "fullmodel", t))
        errors.append(0.9 if t < 3 else base)
    err = np.asarray(errors)
    c1 = np.round((1 - err) * n)
    counts = np.stack([c1, np.minimum(n, c1 + 50), n * (2.3 * err + 0.05), c1], axis=1)
    return results_table(variants, counts, n, num_classes, threshold)


def make_distances(units: list[str]) -> pd.DataFrame:
    rows: list[tuple[str, object, float, float, float]] = []
    for i, u in enumerate(units):
        for t in TAUS:
            rel = 0.0 if t == 0 else 0.9 * (1 - np.exp(-t / (5 + 10 * i)))
            rows.append((u, t, 10 * rel, rel, 0.05 * rel))
        for s in SEEDS:
            rows.append((u, f"rerandom:{s}", 14.1, 1.40 + 0.01 * s, 0.12))
    return pd.DataFrame(rows, columns=["unit", "checkpoint", "l2", "l2_rel", "linf"])


FCN = ["layers.1", "layers.3", "layers.5", "layers.7"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def resnet50_units() -> list[str]:
    names = ["conv1"]
    for stage, blocks in zip(range(1, 5), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            names += [f"layer{stage}.{b}.conv{k}" for k in (1, 2, 3)]
            if b == 0:
                names.append(f"layer{stage}.{b}.downsample.0")
    return names + ["fc"]


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- CSV


def test_write_csv_round_trips_exactly_with_empty_cells(tmp_path: Path) -> None:
    table = make_table(FCN, {"layers.1": 0.37}, num_classes=3)
    path = write_csv(table, tmp_path / "results.csv")
    assert path == tmp_path / "results.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    # Baseline: no checkpoint, no seed, no top-5 (3 classes), no verdict -> empty cells.
    base = dict(zip(COLUMNS, lines[1].split(","), strict=True))
    assert base["unit"] == "*" and base["kind"] == "baseline"
    assert base["checkpoint"] == base["seed"] == base["top5_error"] == base["verdict"] == ""
    assert "nan" not in path.read_text().lower() and "<NA>" not in path.read_text()
    back = read_results(path)
    pd.testing.assert_frame_equal(back, table, check_exact=True)


def test_write_csv_floats_are_bit_exact(tmp_path: Path) -> None:
    values = [0.1 + 0.2, 1 / 3, 2.0**-40, 123456.789012345678, np.nextafter(0.05, 1.0)]
    write_csv(pd.DataFrame({"x": values}), tmp_path / "f.csv")
    back = pd.read_csv(tmp_path / "f.csv")["x"].to_numpy()
    assert back.tolist() == values  # exact, not approx


def test_write_csv_is_atomic_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.csv"
    path.write_text("old complete file\n")

    def boom(self: pd.DataFrame, *args: object, **kwargs: object) -> None:
        Path(args[0]).write_text("half a fi")  # type: ignore[arg-type]
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(RuntimeError):
        write_csv(make_table(FCN), path)
    assert path.read_text() == "old complete file\n"
    assert no_temp_files(tmp_path)
    monkeypatch.undo()
    write_csv(make_table(FCN), path)
    assert path.read_text().startswith("unit,kind,")
    assert no_temp_files(tmp_path)


def test_write_csv_unwritable_target_is_a_layerfast_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LayerfastError, match="cannot write"):
        write_csv(make_table(FCN), blocker / "sub" / "results.csv")


def test_read_distances_restores_int_checkpoints(tmp_path: Path) -> None:
    write_csv(make_distances(FCN), tmp_path / "distances.csv")
    back = read_distances(tmp_path / "distances.csv")
    assert back["checkpoint"].iloc[0] == 0 and isinstance(back["checkpoint"].iloc[0], int)
    assert "rerandom:2" in set(back["checkpoint"])
    pd.testing.assert_frame_equal(
        back.drop(columns="checkpoint"),
        make_distances(FCN).drop(columns="checkpoint"),
        check_dtype=False,
        check_exact=True,
    )


def test_read_results_rejects_missing_columns(tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("unit,kind\n*,baseline\n")
    with pytest.raises(LayerfastError, match="missing column"):
        read_results(tmp_path / "results.csv")


# ----------------------------------------------------------------------------- grids


def test_error_grid_layout_follows_the_paper() -> None:
    units = ["z.last_alphabetically", "a.second"]
    table = make_table(units, {"z.last_alphabetically": 0.37})
    rows, cols, grid = fig_mod.error_grid(table)
    # Model order (first appearance), not sorted; full-model reference row last.
    assert rows == ["z.last_alphabetically", "a.second", fig_mod.FULLMODEL_ROW]
    # ReRnd first, then τ ascending.
    assert cols == ["ReRnd", "0", "1", "2", "3", "8", "40", "90", "100"]
    rr = table[(table["unit"] == "a.second") & (table["kind"] == "rerandom")]["error"]
    assert grid[1, 0] == pytest.approx(rr.mean())  # mean over seeds
    z0 = table[(table["unit"] == rows[0]) & (table["checkpoint"] == 0)]["error"].iloc[0]
    assert grid[0, 1] == z0
    assert np.isnan(grid[2, 0])  # the full-model row has no rerandom
    assert grid[2, 1] == pytest.approx(0.9)


def test_error_grid_without_rerandom_has_no_rernd_column() -> None:
    table = make_table(FCN)
    table = table[table["kind"] != "rerandom"].reset_index(drop=True)
    _, cols, _ = fig_mod.error_grid(table)
    assert cols[0] == "0"


def test_distance_grid_rerandom_column_and_ordering() -> None:
    rows, cols, grid = fig_mod.distance_grid(make_distances(FCN), "l2_rel")
    assert rows == FCN
    assert cols == ["ReRnd", "0", "1", "2", "3", "8", "40", "90", "100"]
    assert grid[0, 0] == pytest.approx(1.42)  # mean of 1.41, 1.42, 1.43
    assert grid[0, 1] == 0.0
    assert np.all(np.diff(grid[0, 1:]) >= 0)


def test_distance_grid_rejects_unknown_checkpoint_labels() -> None:
    bad = make_distances(FCN)
    bad.loc[0, "checkpoint"] = "final?"
    with pytest.raises(LayerfastError, match="rerandom"):
        fig_mod.distance_grid(bad, "l2_rel")


# ----------------------------------------------------------------------------- figures


def test_heatmap_writes_a_png_that_grows_with_units(tmp_path: Path) -> None:
    small = heatmap(make_table(FCN, {"layers.1": 0.37}), tmp_path / "small.png")
    big = heatmap(make_table(resnet50_units(), {"conv1": 0.8}), tmp_path / "big.png")
    w_small, h_small = png_size(small)
    w_big, h_big = png_size(big)
    assert len(resnet50_units()) == 54
    assert h_big > 2 * h_small
    assert w_small > 300 and h_small > 200
    assert no_temp_files(tmp_path)


def test_heatmap_annotates_every_cell_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    texts: list[int] = []
    real = fig_mod._draw_grid

    def spy(ax, grid, *args, **kwargs):  # type: ignore[no-untyped-def]
        im = real(ax, grid, *args, **kwargs)
        texts.append(len(ax.texts))
        return im

    monkeypatch.setattr(fig_mod, "_draw_grid", spy)
    monkeypatch.setattr(fig_mod, "_save", lambda fig, path: Path(path))
    table = make_table(resnet50_units())
    heatmap(table, "unused.png")
    rows, cols, grid = fig_mod.error_grid(table)
    assert texts[-1] == int(np.isfinite(grid).sum())  # 54 rows: still annotated
    many = make_table([f"u{i}" for i in range(fig_mod.MAX_ANNOTATED_ROWS + 1)])
    heatmap(many, "unused.png")
    assert texts[-1] == 0  # past the limit: colour only


def test_heatmap_title_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    figs: list[Figure] = []
    monkeypatch.setattr(fig_mod, "_save", lambda fig, path: figs.append(fig) or Path(path))
    heatmap(make_table(FCN), "unused.png", title="fcn3x256 on MNIST")
    fig = figs[0]
    ax = fig.axes[0]
    assert ax.get_xlabel() == "checkpoint τ (re-initialization)"
    assert ax.get_ylabel() == "unit"
    assert [t.get_text() for t in ax.get_yticklabels()][:4] == FCN
    suptitle = fig.get_suptitle()
    assert "fcn3x256 on MNIST" in suptitle and "baseline 1.62%" in suptitle
    table = make_table(FCN)  # a --reset rerandom run: no τ column for "checkpoint τ" to name
    heatmap(table[table["kind"].isin(["baseline", "rerandom"])], "unused.png")
    assert figs[-1].axes[0].get_xlabel() == "re-randomization (mean over seeds)"
    assert any(a.get_ylabel() == "test error (%)" for a in fig.axes[1:])


def test_heatmap_without_any_reset_rows_is_an_error(tmp_path: Path) -> None:
    table = make_table(FCN)
    with pytest.raises(LayerfastError, match="no reinit"):
        heatmap(table[table["kind"] == "baseline"], tmp_path / "h.png")


def test_distance_plot_writes_a_png_that_grows_with_units(tmp_path: Path) -> None:
    small = distance_plot(make_distances(FCN), tmp_path / "d_small.png")
    big = distance_plot(make_distances([f"u{i}" for i in range(16)]), tmp_path / "d_big.png")
    assert png_size(big)[1] > 2 * png_size(small)[1]
    assert no_temp_files(tmp_path)


def test_distance_plot_has_two_labelled_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    figs: list[Figure] = []
    monkeypatch.setattr(fig_mod, "_save", lambda fig, path: figs.append(fig) or Path(path))
    distance_plot(make_distances(FCN), "unused.png")
    panels = [ax for ax in figs[0].axes if ax.get_title()]
    assert len(panels) == 2
    assert "relative" in panels[0].get_title() and "infty" in panels[1].get_title()
    assert all(ax.get_xlabel() == "checkpoint τ" for ax in panels)
    assert [t.get_text() for t in panels[0].get_xticklabels()][0] == "ReRnd"
    assert [t.get_text() for t in panels[0].get_yticklabels()] == FCN


def test_distance_plot_needs_its_columns(tmp_path: Path) -> None:
    with pytest.raises(LayerfastError, match="linf"):
        distance_plot(make_distances(FCN).drop(columns="linf"), tmp_path / "d.png")


def test_figures_leave_no_pyplot_figures_open(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    heatmap(make_table(FCN), tmp_path / "h.png")
    distance_plot(make_distances(FCN), tmp_path / "d.png")
    assert len(plt.get_fignums()) == before


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.384, "38"), (0.0162, "1.6"), (0.00523, "0.52"), (0.9, "90"), (1.0, "100"), (0.0, "0")],
)
def test_percent_annotation_has_two_significant_digits(value: float, text: str) -> None:
    assert fig_mod._percent(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.41, "1.4"), (0.16, "0.16"), (0.045, "0.045"), (0.0082, "8.2e-3"), (0.0, "0")],
)
def test_distance_annotation_has_two_significant_digits(value: float, text: str) -> None:
    assert fig_mod._two_sig(value) == text


def test_annotation_colour_contrasts_with_the_cell() -> None:
    assert fig_mod._text_color((0.27, 0.0, 0.33, 1.0)) == "white"  # viridis' dark end
    assert fig_mod._text_color((0.99, 0.91, 0.14, 1.0)) == "black"  # viridis' bright end


# ----------------------------------------------------------------------------- summary


def test_summary_table_lists_every_unit_and_the_threshold() -> None:
    table = make_table(FCN, {"layers.1": 0.37})
    text = summary_table(table, make_distances(FCN), threshold=0.05)
    lines = text.splitlines()
    for unit in FCN:
        assert sum(line.startswith(unit + " ") for line in lines) == 1
    foot = lines[len(lines) - 1 - lines[::-1].index("-" * len(lines[1])) + 1:]  # after the rule
    assert any(line.startswith("threshold: robust <=> error - baseline error <= 0.05")
               for line in foot)
    assert "baseline test error 1.62%" in lines[0]
    row1 = next(line for line in lines if line.startswith("layers.1 "))
    assert "reinit@0: critical" in row1 and "rerandom: critical" in row1
    row3 = next(line for line in lines if line.startswith("layers.3 "))
    assert "reinit@0: robust" in row3
    assert "0-3" in row1 and "none" in row3  # critical τ ranges
    assert "0.9000" in row1  # max l2_rel over τ, rerandom rows excluded (they are 1.4)


def test_summary_table_recomputes_verdicts_with_its_threshold() -> None:
    table = make_table(FCN, {"layers.1": 0.37})
    text = summary_table(table, threshold=0.95)
    rows = [line for line in text.splitlines() if line.startswith("layers.")]
    assert len(rows) == 4 and not any("critical" in row for row in rows)
    assert "reinit@0: critical" in summary_table(table, threshold=0.05)
    assert "<= 0.95" in text
    assert "max l2_rel" not in text  # no distances given


def test_summary_table_states_a_negative_zero_threshold_as_zero() -> None:
    """`--threshold -0` (a float the parser accepts) printed "<= -0 (-0 points)"."""
    text = summary_table(make_table(FCN, {"layers.1": 0.37}), threshold=-0.0)
    assert "-0" not in text and "<= 0 " in text


def test_summary_table_columns_are_aligned() -> None:
    text = summary_table(make_table(resnet50_units(), {"conv1": 0.8}), make_distances(FCN))
    lines = text.splitlines()
    header = lines[2]
    body = [line for line in lines[4:] if line and not line.startswith("-")][:54]
    col = header.index("verdict")
    # Every unit's verdict starts in the same column, and "rerandom:" is aligned too.
    assert all(line[col:].startswith("reinit@0:") for line in body)
    assert len({line.index("rerandom:") for line in body}) == 1
    assert all(line.isascii() for line in lines)


def test_summary_table_rerandom_spread_is_sample_sd() -> None:
    table = make_table(["only"])
    rr = table[table["kind"] == "rerandom"]["error"]
    text = summary_table(table)
    assert f"{100 * rr.mean():.2f}% ({100 * rr.std(ddof=1):.2f})" in text
    assert "sd" in text


# ----------------------------------------------------------------------------- redraw


def test_redraw_round_trip_from_csv(tmp_path: Path) -> None:
    write_csv(make_table(FCN, {"layers.1": 0.37}), tmp_path / "results.csv")
    write_csv(make_distances(FCN), tmp_path / "distances.csv")
    written = redraw(tmp_path)
    assert written == [tmp_path / "heatmap.png", tmp_path / "distances.png"]
    for path in written:
        png_size(path)
    first = (tmp_path / "heatmap.png").read_bytes()
    redraw(tmp_path)  # overwrites in place, deterministic
    assert (tmp_path / "heatmap.png").read_bytes() == first
    assert no_temp_files(tmp_path)


def test_redraw_without_distances_draws_only_the_heatmap(tmp_path: Path) -> None:
    write_csv(make_table(FCN), tmp_path / "results.csv")
    assert redraw(tmp_path) == [tmp_path / "heatmap.png"]
    assert not (tmp_path / "distances.png").exists()


def test_redraw_missing_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LayerfastError, match="results.csv"):
        redraw(tmp_path)
    with pytest.raises(LayerfastError, match="not a directory"):
        redraw(tmp_path / "nope")


def test_summary_max_distance_of_zero_reads_0() -> None:
    """A largest distance of exactly 0 (a unit that never moved) read "0.00e+00". (With only
    τ = 0 measured there is no column since session 22: tests/report/test_report_s22.py.)"""
    dist = make_distances(FCN)
    dist.loc[dist["checkpoint"].astype(str).str.isdigit(), ["l2", "l2_rel", "linf"]] = 0.0
    text = summary_table(make_table(FCN, {}), dist)
    row = next(line for line in text.splitlines() if line.startswith("layers.1 "))
    assert row.endswith("  0") and "e+00" not in text

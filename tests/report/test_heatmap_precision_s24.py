"""Session 24: the heatmap says when its errors came from a bf16 or tf32 pass.

The terminal summary said so since session 23, but the figure, often all a reader of a paper
or a slide sees, did not: a bf16 run's heatmap looked like an fp32 one though its errors can
be a point away from fp32's (a verdict near the threshold can flip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerfast import report
from layerfast.analysis import Analysis
from layerfast.report import figures as fig_mod
from layerfast.report import heatmap_figure, heatmap_labels
from tests.report.test_report import FCN, make_table


def _suptitle(fig) -> str:  # noqa: ANN001 - a matplotlib Figure
    return fig._suptitle.get_text()


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_reduced_precision_is_under_the_title(precision: str) -> None:
    text = _suptitle(heatmap_figure(make_table(FCN), precision=precision))
    assert text.splitlines()[1].endswith(f"; precision {precision}"), text


@pytest.mark.parametrize("precision", [None, "fp32", "auto"])
def test_fp32_says_nothing(precision: str | None) -> None:
    text = _suptitle(heatmap_figure(make_table(FCN), precision=precision))
    assert "precision" not in text, text


def test_labels_from_a_run_record() -> None:
    assert heatmap_labels({"split": "train", "precision": "bf16"}) == {
        "title": None, "split": "train", "precision": "bf16"}
    # a hand-edited run.json: wrong types fall back to the defaults, never stop a redraw
    assert heatmap_labels({"split": 3, "precision": 16, "title": ["x"]}) == {
        "title": None, "split": "test", "precision": None}
    assert heatmap_labels(None) == heatmap_labels([1, 2]) == {
        "title": None, "split": "test", "precision": None}


def _drawn_precision(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The `precision` each heatmap drawing is asked for (the figure itself is drawn)."""
    seen: list[str | None] = []
    real = fig_mod.heatmap_figure

    def spy(table, title=None, split="test", precision=None):  # noqa: ANN001, ANN202
        seen.append(precision)
        return real(table, title, split, precision)

    monkeypatch.setattr(fig_mod, "heatmap_figure", spy)
    return seen


def test_redraw_keeps_the_runs_precision(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    report.write_csv(make_table(FCN), tmp_path / "results.csv")
    (tmp_path / "run.json").write_text(json.dumps({"threshold": 0.05, "precision": "bf16"}))
    seen = _drawn_precision(monkeypatch)
    assert report.redraw(tmp_path) == [tmp_path / "heatmap.png"]
    assert seen == ["bf16"]
    (tmp_path / "run.json").write_text("{not json")  # unreadable: drawn, without the line
    report.redraw(tmp_path)
    assert seen == ["bf16", None]


def test_analysis_plot_and_figure_pass_the_precision(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    result = Analysis(make_table(FCN), None, {"precision": "bf16", "split": "test"}, tmp_path)
    assert "; precision bf16" in _suptitle(result.figure())
    seen = _drawn_precision(monkeypatch)
    result.plot()
    assert seen == ["bf16"]

"""Session 17: items from the "noticed and left alone" list that are now fixed."""

from __future__ import annotations

import pytest

from layerfast.errors import LayerfastError
from layerfast.interp import interp_options


def test_sigma_beyond_float32_is_refused() -> None:
    """`--sigma 1e39` is finite in float64 but Inf in the weights' float32: every noisy weight
    became Inf, and the run went on with only the overflow warning."""
    with pytest.raises(LayerfastError, match="beyond float32's range"):
        interp_options(["interp"], "0.5", "0,1e39")
    assert interp_options(["interp"], "0.5", "3e38") == ([0.5], [3e38])


def test_distance_figure_spanning_beyond_float64_ratios_draws(tmp_path) -> None:
    """Distances from 1e-300 to 1e250 made the log colour scale's hi / lo overflow to inf, and
    `layerfast report` died in matplotlib's tick code (OverflowError, exit 1)."""
    from layerfast.report.figures import distance_figure
    from layerfast.report.tables import read_distances

    rows = ["unit,checkpoint,l2,l2_rel,linf"]
    for u, rel in (("a", 1e-300), ("b", 1e250), ("c", 0.5)):
        rows += [f"{u},0,0,0,0", f"{u},1,{rel},{rel},{rel}"]
    (tmp_path / "distances.csv").write_text("\n".join(rows) + "\n")
    fig = distance_figure(read_distances(tmp_path / "distances.csv"))
    fig.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0


@pytest.mark.parametrize("loss", ["-inf", "-0.5"])
def test_results_reader_refuses_a_negative_loss(loss: str, tmp_path) -> None:
    """A mean cross-entropy is never negative; a hand-edited -inf was read as a number."""
    from layerfast.report.tables import COLUMNS, read_results

    head = ",".join(COLUMNS)
    base = "*,baseline,,,0.1,0.05,0.2,,0.3,1,10,0,"
    row = f"fc1,reinit,0,,0.1,0.05,0.2,,{loss},1,10,0,robust"
    (tmp_path / "results.csv").write_text(f"{head}\n{base}\n{row}\n")
    with pytest.raises(LayerfastError, match="loss"):
        read_results(tmp_path / "results.csv")
    (tmp_path / "results.csv").write_text(f"{head}\n{base}\n{row.replace(loss, 'inf')}\n")
    assert read_results(tmp_path / "results.csv")["loss"].iloc[1] == float("inf")

"""`plot(path)` writes the figure to the FILE `path` (its docstring); a directory was not
refused: `plot(Path(""))` and `plot(".")` failed with "cannot write .: Device or resource
busy", `plot("sub/")` wrote a file named `sub`, and an existing directory `d` gave "cannot
write d: Is a directory". Each is now one clear refusal naming a file to give instead, before
anything is drawn or written."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from layerfast.analysis import Analysis
from layerfast.errors import LayerfastError


def _result() -> Analysis:
    table = pd.DataFrame({
        "unit": ["*", "fc1", "fc1"], "kind": ["baseline", "reinit", "rerandom"],
        "checkpoint": pd.array([None, 0, None], dtype="Int64"),
        "seed": pd.array([None, None, 1], dtype="Int64"),
        "error": [0.1, 0.2, 0.9], "error_lo": [0.05, 0.1, 0.8], "error_hi": [0.2, 0.3, 0.95],
        "top5_error": [0.0, 0.0, 0.5], "loss": [0.3, 0.5, 2.3], "agreement": [1.0, 0.9, 0.1],
        "n": [100, 100, 100], "delta_error": [0.0, 0.1, 0.8],
        "verdict": ["", "critical", "critical"]})
    dist = pd.DataFrame({"unit": ["fc1", "fc1"], "checkpoint": ["1", "rerandom"],
                         "l2": [1.0, 2.0], "l2_rel": [0.1, 0.2], "linf": [0.5, 0.6]})
    return Analysis(table, dist, {"threshold": 0.05})


@pytest.mark.parametrize("kind,name", [("heatmap", "heatmap.png"),
                                       ("distances", "distances.png")])
@pytest.mark.parametrize("given", [Path(""), ".", "sub/", Path("sub") / "..", "existing"])
def test_a_directory_is_refused_with_the_file_to_name(tmp_path, monkeypatch, kind, name,
                                                      given) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    with pytest.raises(LayerfastError, match="must be a file name, got the directory") as exc:
        _result().plot(given, kind=kind)
    assert "\n" not in str(exc.value) and f"{name}'" in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # nothing written
    assert not any((tmp_path / "existing").iterdir())


def test_a_file_in_a_new_directory_is_still_written(tmp_path) -> None:
    path = _result().plot(tmp_path / "sub" / "fig.png")
    assert path.read_bytes()[:4] == b"\x89PNG"

"""`plot(path)` writes the figure to the FILE `path` (its docstring); a directory was not
refused: `plot(Path(""))` and `plot(".")` failed with "cannot write .: Device or resource
busy", `plot("sub/")` wrote a file named `sub`, and an existing directory `d` gave "cannot
write d: Is a directory". Each is now one clear refusal naming a file to give instead, before
anything is drawn or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.errors import LayerfastError
from tests.analysis.test_api_hygiene_s17 import tiny_result

_result = tiny_result  # a three-row Analysis with distances


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

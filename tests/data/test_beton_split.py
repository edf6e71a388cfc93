"""A .beton holds one split: where its sidecar says it holds the other one than the run asks
for, the run says so (a warning on stderr, kept in run.json's warnings) instead of silently
measuring the training set under the default `--split test`."""

from __future__ import annotations

import pytest

from layerfast.data import convert, open_data
from layerfast.errors import collect_warnings
from tests.data.test_data_ffcv import require_ffcv

pytestmark = pytest.mark.ffcv


@pytest.fixture(autouse=True)
def _need_ffcv():
    require_ffcv()


@pytest.mark.parametrize("held,asked,warned", [
    ("train", "test", True), ("test", "train", True), ("test", "test", False),
    ("train", "train", False),
])
def test_a_beton_of_the_other_split_is_said(tmp_path, capsys, held, asked, warned) -> None:
    to = convert("digits", tmp_path / f"d-{held}.beton", split=held)
    capsys.readouterr()
    with collect_warnings() as kept:
        src = open_data(str(to), split=asked, max_samples=8)
    err = capsys.readouterr().err
    assert src.n == 8
    if warned:
        assert f"holds the {held} split of 'digits'" in err and f"as the {asked} split" in err
        # open_data's own argument (session 24: it named analyze's flag, `--split`)
        assert len(kept) == 1 and "the split argument cannot choose another" in kept[0]
    else:
        assert "warning" not in err and kept == []

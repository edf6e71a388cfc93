"""A distances.csv checkpoint cell is a τ label (ASCII digits, so >= 0) or `rerandom:<seed>`
(review s25): `read_distances` took `-3` as τ -3, which no checkpoint has (`read_results`
refuses it in results.csv), and `²` (str.isdigit() but not int()) was a ValueError traceback
from `layerfast report` instead of the one-line error naming its column and row."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.errors import LayerfastError
from layerfast.report import read_distances


@pytest.mark.parametrize("label", ["-3", "\u00b2", "-0"])
def test_a_checkpoint_cell_that_is_no_tau_is_one_clear_error(tmp_path: Path, label: str) -> None:
    path = tmp_path / "distances.csv"
    path.write_text(f"unit,checkpoint,l2,l2_rel,linf\nfc1,0,0,0,0\nfc1,{label},1,0.1,0.1\n",
                    encoding="utf-8")
    with pytest.raises(LayerfastError, match=r"column 'checkpoint', row 2: .* is not a τ label "
                                             r"\(a whole number >= 0\)"):
        read_distances(path)


def test_tau_labels_and_rerandom_rows_are_still_read(tmp_path: Path) -> None:
    path = tmp_path / "distances.csv"
    path.write_text("unit,checkpoint,l2,l2_rel,linf\nfc1,0,0,0,0\nfc1,007,1,0.1,0.1\n"
                    "fc1,rerandom:3,2,0.2,0.2\n", encoding="utf-8")
    assert list(read_distances(path)["checkpoint"]) == [0, 7, "rerandom:3"]

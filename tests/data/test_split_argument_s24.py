"""Messages name the argument the caller used (session 24).

Defects: (1) `open_data("x.beton")` from Python, on a .beton whose sidecar says it holds the
other split, warned "a beton holds one split, --split cannot choose another": a flag
`open_data` does not have (its argument is `split`). It now names its own argument; analyze and
convert, which have `--split`, still name the flag (their messages name options by their flags,
docs/decisions.md). (2) train's divergence error ended "lower lr=0.1", neither the CLI's flag
nor the form of train's other messages ("--lr must be ..."): it now says "lower --lr (this
run's: 0.1)", the chance warning's form.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.cli import main
from layerfast.data import convert, open_data
from layerfast.errors import collect_warnings
from tests.data.test_data_ffcv import require_ffcv


@pytest.fixture(scope="module")
def train_beton(tmp_path_factory):
    """digits' train split as a .beton (its sidecar says `split: train`)."""
    require_ffcv()
    return convert("digits", tmp_path_factory.mktemp("beton") / "d-train.beton", split="train")


@pytest.mark.ffcv
def test_open_data_names_its_own_argument(train_beton) -> None:
    with collect_warnings() as kept:
        open_data(str(train_beton), split="test", max_samples=8)
    assert len(kept) == 1 and "holds the train split of 'digits'" in kept[0], kept
    assert kept[0].endswith("a beton holds one split, the split argument cannot choose another")
    assert "--split" not in kept[0]


@pytest.mark.ffcv
def test_analyze_still_names_its_flag(train_beton) -> None:
    from layerfast.analysis import list_units

    with collect_warnings() as kept:
        list_units("fcn1x4", data=str(train_beton))
    assert len(kept) == 1 and kept[0].endswith("--split cannot choose another"), kept


def test_the_cli_divergence_message_names_the_flag(tmp_path: Path, capsys) -> None:
    rc = main(["train", "--arch", "fcn3x256", "--data", "digits", "--epochs", "1",
               "--max-samples", "200", "--lr", "1e10", "--out", str(tmp_path / "run"),
               "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "training diverged" in err, err
    assert err.rstrip("\n").endswith("lower --lr (this run's: 1e+10)"), err
    assert "lr=" not in err

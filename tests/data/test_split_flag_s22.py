"""A .beton whose sidecar records the other split is warned about, but `layerfast train` and
`layerfast bench` have no `--split`: their warning ended "a beton holds one split, --split
cannot choose another", naming a flag they lack. And `train` opened the data before it began
collecting warnings, so that warning reached stderr only, never manifest.json's `warnings`."""

from __future__ import annotations

import json

import pytest

from layerfast.data import convert, open_data
from layerfast.errors import collect_warnings
from tests.data.test_data_ffcv import require_ffcv

pytestmark = pytest.mark.ffcv


@pytest.fixture(autouse=True)
def _need_ffcv():
    require_ffcv()


@pytest.fixture(scope="module")
def train_beton(tmp_path_factory):
    """digits' train split as a .beton (its sidecar says `split: train`)."""
    require_ffcv()
    return convert("digits", tmp_path_factory.mktemp("beton") / "d-train.beton", split="train")


def test_without_the_flag_the_warning_names_none(train_beton, capsys) -> None:
    with collect_warnings() as kept:
        open_data(str(train_beton), split="test", max_samples=8, split_flag=False)
    assert len(kept) == 1 and "holds the train split of 'digits'" in kept[0]
    assert "--split" not in kept[0] and "--split" not in capsys.readouterr().err
    with collect_warnings() as kept:  # analyze's and convert's (they have --split): as it was
        open_data(str(train_beton), split="test", max_samples=8, split_flag="--split")
    assert len(kept) == 1 and "--split cannot choose another" in kept[0]


def test_train_keeps_the_warning_and_names_no_split(train_beton, tmp_path, capsys) -> None:
    from layerfast.train import train

    train("fcn2x16", str(train_beton), 1, tmp_path / "run", device="cpu", progress=False,
          max_samples=64)
    err = capsys.readouterr().err
    assert "holds the train split of 'digits'" in err and "--split" not in err
    kept = json.loads((tmp_path / "run" / "manifest.json").read_text())["warnings"]
    assert any("holds the train split of 'digits'" in w for w in kept), kept


def test_bench_names_no_split(train_beton, monkeypatch, capsys) -> None:
    import layerfast.bench as bench
    from tests.cli.test_bench_audit import _args

    monkeypatch.setattr("layerfast.engine.flops.measure_rate", lambda d, p, seconds=0.5: 1e10)
    out = bench.run(_args("--arch", "fcn2x16", "--data", str(train_beton), "--naive-variants",
                          "2", "--no-prefix-only"))
    said = [w for w in out["warnings"] if "holds the train split" in w]
    assert len(said) == 1 and "--split" not in said[0]
    assert "--split" not in capsys.readouterr().err

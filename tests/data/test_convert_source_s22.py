"""`convert` onto a .beton whose sidecar records the same split of ANOTHER data set (digits
converted onto an existing fashion-mnist.beton) replaced it without a word: a conversion can
take an hour, and the file's name still says the old data set. A warning on stderr now names
both sources (told apart by `data_key`, so two spellings of one data set are not "another"),
before the conversion runs. The same data set again is a re-conversion: nothing is said."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerfast.data import convert
from layerfast.data.beton import sidecar_path
from layerfast.errors import collect_warnings
from tests.data.test_data_ffcv import require_ffcv

pytestmark = pytest.mark.ffcv


@pytest.fixture(autouse=True)
def _need_ffcv():
    require_ffcv()


def _npz(path):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (12, 1, 4, 4), dtype=np.uint8), y=np.arange(12) % 3)
    return path


def test_another_data_set_of_the_same_split_is_said(tmp_path, capsys) -> None:
    to = convert("digits", tmp_path / "d.beton")
    npz = _npz(tmp_path / "x.npz")
    capsys.readouterr()
    with collect_warnings() as kept:
        convert(str(npz), to)
    err = capsys.readouterr().err
    assert len(kept) == 1 and err.count("warning") == 1
    assert "holds the test split of 'digits'" in kept[0] and repr(str(npz)) in kept[0]
    assert json.loads(sidecar_path(to).read_text())["source"] == str(npz)  # still replaced


def test_the_same_data_set_spelled_otherwise_is_no_other(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    to = convert(str(_npz(tmp_path / "x.npz")), tmp_path / "d.beton", split="train")
    for again in ("x.npz", "./x.npz"):  # relative spellings of the same file
        capsys.readouterr()
        with collect_warnings() as kept:
            convert(again, to, split="train")
        assert kept == [] and "warning" not in capsys.readouterr().err


def test_a_path_spec_is_recorded_as_its_string(tmp_path) -> None:
    # open_data takes Path("x.npz"); convert decoded it all, then died in the sidecar's
    # json.dump ("Object of type PosixPath is not JSON serializable"), nothing written
    npz = _npz(tmp_path / "x.npz")
    to = convert(npz, tmp_path / "x.beton")
    assert json.loads(sidecar_path(to).read_text())["source"] == str(npz)

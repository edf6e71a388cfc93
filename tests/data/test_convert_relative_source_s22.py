"""convert's sidecar recorded the data source as typed (review s22): a relative `x.npz` was
later read against whatever directory the next command ran in. Converting `x.npz` from
folder A, then another folder B's `x.npz` onto the same .beton, compared B's file with itself
and said nothing, though the .beton held A's data. The source is now recorded resolved (as
`train` records manifest.json's spec); an old sidecar's relative source is read as before.
Fails on the code before the fix."""

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


def _npz(path, seed: int):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=rng.integers(0, 256, (12, 1, 4, 4), dtype=np.uint8), y=np.arange(12) % 3)
    return path


def test_a_relative_source_is_recorded_resolved(tmp_path, monkeypatch) -> None:
    _npz(tmp_path / "a" / "x.npz", 0)
    monkeypatch.chdir(tmp_path / "a")
    to = convert("x.npz", tmp_path / "d.beton")
    side = json.loads(sidecar_path(to).read_text())
    assert side["source"] == str((tmp_path / "a" / "x.npz").resolve())
    assert convert("digits", tmp_path / "g.beton") and json.loads(
        sidecar_path(tmp_path / "g.beton").read_text())["source"] == "digits"  # no path: as is


def test_the_same_relative_name_in_another_folder_is_another_data_set(tmp_path, monkeypatch,
                                                                      capsys) -> None:
    to = tmp_path / "d.beton"
    for folder in ("a", "b"):
        _npz(tmp_path / folder / "x.npz", ord(folder))
    monkeypatch.chdir(tmp_path / "a")
    convert("x.npz", to)
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    with collect_warnings() as kept:
        convert("x.npz", to)
    assert len(kept) == 1 and str(tmp_path / "a" / "x.npz") in kept[0], kept
    with collect_warnings() as kept:  # B's file again, from B: a re-conversion, no word
        convert("./x.npz", to)
    assert kept == []


def test_an_old_sidecars_relative_source_still_reads(tmp_path, monkeypatch) -> None:
    _npz(tmp_path / "x.npz", 0)
    monkeypatch.chdir(tmp_path)
    to = convert("x.npz", tmp_path / "d.beton")
    side = sidecar_path(to)
    side.write_text(json.dumps({**json.loads(side.read_text()), "source": "x.npz"}))
    with collect_warnings() as kept:  # the sidecar as a session-21 convert wrote it
        convert("x.npz", to)
    assert kept == []
    from layerfast.data import open_data

    assert open_data(str(to)).n == 12

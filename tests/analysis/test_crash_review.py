"""Crash/resume review (session 21): what a hand-edited or damaged resume store, an interrupt
and a rerun with other options do.

- A store marked finished must hold what a finished pass records (its engine record with the
  class count, every sample counted): a hand edit that set `complete` on an unfinished store,
  or emptied its engine record, was a KeyError / AttributeError traceback (exit 1), or results
  over part of the data written as finished.
- A refusal of another `--ckpts` or `--data` said the files "have changed since".
- Progress whose meta rows are gone was adopted by whatever run came next.
- Each run without --out left a stale -wal and -shm in every earlier run dir it looked into.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import layerfast
from layerfast.errors import LayerfastError

ARGS = {"data": "digits", "seeds": 1, "device": "cpu", "batch_size": 32, "progress": False,
        "figures": False, "checkpoint_every": 0}
N = 360  # digits' test split


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def _edit(out: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(out / "progress.sqlite")
    db.execute(sql, args)
    db.commit()
    db.close()


class _Stop(Exception):
    pass


def _partial(ckpts: Path, out: Path, monkeypatch: pytest.MonkeyPatch, saves: int = 2) -> None:
    """An analysis into `out` stopped after its `saves`-th progress save (not finished)."""
    from layerfast.store import ResumeStore

    real = ResumeStore.save
    seen = []

    def save(self, counts, n_done):
        real(self, counts, n_done)
        seen.append(n_done)
        if len(seen) == saves:
            raise _Stop

    with monkeypatch.context() as m:
        m.setattr(ResumeStore, "save", save)
        with pytest.raises(_Stop):
            layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert 0 < seen[-1] < N


@pytest.mark.parametrize("info", [
    "{}",  # KeyError: 'num_classes'
    '{"num_classes": 10, "plan": 5}',  # AttributeError: 'int' object has no attribute 'get'
    '{"num_classes": "10"}',
    '{"num_classes": true}',
])
def test_a_finished_store_without_its_engine_record_is_damage(ckpts, tmp_path, info):
    out = tmp_path / "o"
    layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    (out / "run.json").unlink()  # as if killed while writing the outputs: a rerun writes them
    _edit(out, "UPDATE state SET info = ?", info)
    with pytest.raises(LayerfastError, match="is damaged"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert not (out / "run.json").exists()


def test_an_unfinished_store_marked_finished_is_damage(ckpts, tmp_path, monkeypatch):
    """`complete` set by hand on a store of 64 samples: its engine record is the resume state,
    with no class count (a KeyError traceback); with a finished run's record it wrote results
    over 64 of the 360 samples as the finished run of the command."""
    out, done = tmp_path / "o", tmp_path / "done"
    layerfast.analyze("fcn3x256", ckpts, out=done, **ARGS)
    finished = sqlite3.connect(done / "progress.sqlite").execute(
        "SELECT info FROM state").fetchone()[0]
    _partial(ckpts, out, monkeypatch)
    _edit(out, "UPDATE state SET complete = 1")
    with pytest.raises(LayerfastError, match="is damaged"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    _edit(out, "UPDATE state SET info = ?", finished)
    with pytest.raises(LayerfastError, match="is damaged"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert not (out / "results.csv").exists()
    assert json.loads(finished)["num_classes"] == 10


@pytest.mark.parametrize(("diff", "said"), [
    (["ckpts", "files"], "a run with different arguments (differs in: ckpts)"),
    (["data", "data_files"], "a run with different arguments (differs in: data)"),
    (["data", "data_files", "max_samples", "n"],
     "a run with different arguments (differs in: data, max_samples)"),
    (["n", "split"], "a run with different arguments (differs in: split)"),
    (["data", "n"], "a run with different arguments (differs in: data)"),
])
def test_another_ckpts_or_data_argument_is_not_called_files_changed_since(diff, said):
    """`--ckpts other_dir` (or `--data other.npz`) into an out dir was refused as "a run with
    different arguments (differs in: ckpts); and a run over checkpoint files that have changed
    since": the files are another directory's, not changed ones, and the user looked for a
    retraining that never happened. The input notes are for the same arguments only."""
    from layerfast.store import _what_differs

    assert _what_differs(diff) == said


def test_changed_files_under_the_same_arguments_are_still_said():
    from layerfast.store import _what_differs

    assert _what_differs(["files"]) == "a run over checkpoint files that have changed since"
    assert _what_differs(["data_files", "n"]) == "a run over data files that have changed since"
    assert _what_differs(["n"]) == "a run over data with another number of samples"
    assert _what_differs(["model"]) == ("a run of the same arch whose definition (its code or "
                                        "structure) has changed since")


def test_progress_without_the_fingerprint_it_belongs_to_is_damage(ckpts, tmp_path, monkeypatch):
    """A store whose meta rows are gone (deleted by hand, a tool that 'cleaned' the table) but
    whose progress row is there: the run took it as a new store, wrote its own fingerprint
    beside the old sums and resumed them, so another command's progress (here the first
    samples of a run re-randomizing with seed 1, as many variants) went into this one's rows
    for seed 7."""
    out = tmp_path / "o"
    _partial(ckpts, out, monkeypatch)
    _edit(out, "DELETE FROM meta")
    with pytest.raises(LayerfastError, match="is damaged"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **{**ARGS, "seeds": [7]})
    assert not (out / "results.csv").exists()


def test_looking_for_an_unfinished_default_out_dir_leaves_the_others_as_they_were(
        ckpts, tmp_path, monkeypatch):
    """Without --out, each run opens the store of every earlier `layerfast-out/<arch>-*` dir
    to find an unfinished one to resume. A read-only connection to a WAL database creates its
    -wal and -shm files and cannot delete them, so every finished run dir gained a stale
    `progress.sqlite-wal` and a 32 KB `progress.sqlite-shm` each time a later run looked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20261207-000000")
    one = layerfast.analyze("fcn3x256", ckpts, **{**ARGS, "out": None})
    before = sorted(p.name for p in one.out.iterdir())
    two = layerfast.analyze("fcn3x256", ckpts, **{**ARGS, "out": None})
    assert two.out != one.out and two.run["engine"]["resumed_from"] == 0  # finished: not reused
    assert sorted(p.name for p in one.out.iterdir()) == before
    assert not any(p.name.startswith("progress.sqlite-") for p in two.out.iterdir())

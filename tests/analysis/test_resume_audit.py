"""Resume audit: the moments and inputs test_resume.py does not reach.

- The window between the engine's last progress save (all samples done, `complete` not yet set)
  and `ResumeStore.finish`: a kill there must still resume to the uninterrupted results, in one
  pass and in several (bounded staging, pass-major positions).
- A kill while the outputs are written, with the default out dir: the same command again must
  find that run and finish it, not evaluate everything again in a new dir.
- Data rewritten between the two runs with the same number of samples must be detected.
- The out dir's lock must cover the outputs too: a second run must not remove or rewrite them
  while the first one is still writing.
- A plan key set by an option (`--batch-size`) is described as that option, not as a machine.
- A progress.sqlite that is not a layerfast store is the one-line "pass --fresh" error.

And in analysis.py / engine/evaluator.py: a run killed between its last progress save and
`finish` resumes with nothing left to read (one pass: the class count must still be known;
several passes: it must not be "past the last pass"); data rewritten between the runs with the
same sample count is detected; the out dir stays locked while the outputs are written.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import layerfast
from layerfast.errors import LayerfastError
from layerfast.store import ResumeStore

ARGS = {"data": "digits", "seeds": 1, "device": "cpu", "batch_size": 32, "progress": False,
        "figures": False, "checkpoint_every": 0}
N = 360  # digits' test split


class _Crash(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def reference(ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit-reference")
    layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    return out


def same_outputs(a: Path, b: Path) -> None:
    for name in ("results.csv", "distances.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def crash_in_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sample of every pass is saved; the kill lands before the pass is marked complete."""

    def finish(self, counts, n_done, info):
        raise _Crash

    monkeypatch.setattr(ResumeStore, "finish", finish)


def test_killed_between_the_last_save_and_finish_one_pass(ckpts, reference, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_in_finish(m)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert res.run["engine"]["resumed_from"] == N and res.run["engine"]["evaluated"] == 0
    assert res.run["num_classes"] == 10
    same_outputs(out, reference)


def test_killed_between_the_last_save_and_finish_several_passes(ckpts, reference, tmp_path,
                                                                monkeypatch):
    import layerfast.engine.evaluator as evm

    monkeypatch.setattr(evm, "stage_limit", lambda model_bytes: model_bytes // 3)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_in_finish(m)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    P = res.run["engine"]["plan"]["passes"]
    assert P > 1 and res.run["engine"]["resumed_from"] == P * N
    assert res.run["engine"]["evaluated"] == 0 and res.run["n"] == N
    same_outputs(out, reference)  # several passes give the one-pass bits


def test_default_out_dir_finishes_a_run_killed_while_writing_outputs(ckpts, reference, tmp_path,
                                                                     monkeypatch):
    """The pass is complete in the store but run.json was never written: that run is not
    finished, so the same command must finish it there without evaluating again."""
    from layerfast import report

    monkeypatch.chdir(tmp_path)
    args = {**ARGS, "out": None}
    with monkeypatch.context() as m:
        def crash(*a, **k):
            raise _Crash

        m.setattr(report, "write_csv", crash)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, **args)
    (first,) = (tmp_path / "layerfast-out").iterdir()
    assert not (first / "run.json").exists()
    time.sleep(1.1)  # a new run would get a new time stamp, hence a new dir
    res = layerfast.analyze("fcn3x256", ckpts, **args)
    assert res.out.resolve() == first.resolve()
    assert res.run["engine"]["evaluated"] == 0 and res.run["engine"]["resumed_from"] == N
    same_outputs(first, reference)
    assert len(list((tmp_path / "layerfast-out").iterdir())) == 1


def test_data_rewritten_between_runs_is_detected(ckpts, tmp_path, monkeypatch):
    from layerfast.data import open_data

    src = open_data("digits")
    x = np.concatenate([b[0].numpy() for b in src.batches(1000)])
    y = src.labels().numpy()
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    args = {**ARGS, "data": str(data)}
    out = tmp_path / "run"
    real, saves = ResumeStore.save, []

    def save(self, counts, n_done):
        real(self, counts, n_done)
        saves.append(n_done)
        if len(saves) == 3:
            raise _Crash

    with monkeypatch.context() as m:
        m.setattr(ResumeStore, "save", save)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **args)
    np.savez(data, x=x[::-1].copy(), y=y[::-1].copy())  # other samples first, same count
    with pytest.raises(LayerfastError, match="data files that have changed since; pass --fresh"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **args)


def test_the_out_dir_stays_locked_while_outputs_are_written(ckpts, tmp_path, monkeypatch):
    from layerfast import report
    from layerfast.store import _acquire_lock

    out = tmp_path / "run"
    real, seen = report.write_csv, []

    def write_csv(table, path):
        try:
            fh = _acquire_lock(Path(path).parent)
        except LayerfastError as exc:
            seen.append(str(exc))
        else:
            fh.close()
            seen.append("unlocked")
        return real(table, path)

    monkeypatch.setattr(report, "write_csv", write_csv)
    layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert seen and all("another layerfast run" in s for s in seen), seen


def test_another_batch_size_is_described_as_that_option(ckpts, reference, tmp_path):
    out = Path(shutil.copytree(reference, tmp_path / "copy"))
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze("fcn3x256", ckpts, out=out, **{**ARGS, "batch_size": 16})
    msg = str(info.value)
    assert "differs in: batch_size: another --batch-size, or another machine" in msg, msg
    assert json.loads((out / "run.json").read_text())["batch_size"] == 32  # nothing touched


def test_changed_data_files_are_described_as_changed_inputs():
    """The store's half of detecting rewritten data: the fingerprint key `data_files` (the
    data's files, size and mtime) is an input that changed, not a different argument."""
    from layerfast.store import _what_differs

    assert _what_differs(["data_files", "n"]) == "a run over data files that have changed since"
    assert _what_differs(["n"]) == "a run over data with another number of samples"
    assert _what_differs(["device", "passes"]) == (
        "a run the engine planned differently (differs in: device, passes: another --device, "
        "or another machine, memory size or layerfast version)")


@pytest.mark.parametrize("table", ["meta", "state"])
def test_a_foreign_or_damaged_store_is_a_clear_error_and_fresh_recovers(ckpts, tmp_path, capsys,
                                                                        monkeypatch, table):
    """A progress.sqlite whose tables are not ours (another tool's file, a hand edit) must be
    the one-line "pass --fresh" error, not a traceback with exit status 1."""
    import sqlite3

    from layerfast.cli import main
    from layerfast.store import FILENAME, SCHEMA

    out = tmp_path / "run"
    out.mkdir()
    con = sqlite3.connect(out / FILENAME)
    if table == "meta":
        con.execute("CREATE TABLE meta (a, b, c)")
    else:  # our meta, but a state table of another layout
        con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("CREATE TABLE state (id INTEGER PRIMARY KEY, n INTEGER)")
    con.commit()
    con.close()
    argv = ["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--out", str(out),
            "--max-samples", "40", "--device", "cpu", "--quiet"]
    if table == "state":  # meta must match this run for load() to be reached
        seen = {}

        def spy(self, o, fingerprint, V, fresh=False, created=False):
            seen["fp"] = fingerprint
            raise _Crash

        with monkeypatch.context() as m:
            m.setattr(ResumeStore, "__init__", spy)
            with pytest.raises(_Crash):
                main(argv)
        con = sqlite3.connect(out / FILENAME)
        con.execute("INSERT INTO meta VALUES ('schema', ?), ('fingerprint', ?)",
                    (SCHEMA, json.dumps(seen["fp"], sort_keys=True, default=str)))
        con.commit()
        con.close()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot use the resume store" in err and "--fresh" in err and err.count("\n") == 1
    assert main([*argv, "--fresh"]) == 0


def test_a_file_system_without_locks_is_not_another_run(ckpts, tmp_path, monkeypatch, capsys):
    """flock failing with ENOLCK (NFS without lockd) or EOPNOTSUPP is no sign of a second run;
    reporting one would refuse every run in that out dir for good. The run goes on, warned."""
    import errno

    import layerfast.store as store

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store.fcntl, "flock", flock)
    res = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "run", **{**ARGS, "max_samples": 40})
    assert res.run["n"] == 40
    assert "cannot lock" in capsys.readouterr().err
    held = OSError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
    monkeypatch.setattr(store.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(held))
    with pytest.raises(LayerfastError, match="another layerfast run"):
        layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "run", **{**ARGS, "max_samples": 40})


def test_the_out_dirs_contents_are_checked_before_the_run(ckpts, tmp_path):
    """A directory named results.csv (or run.json, progress.sqlite) in --out was an
    IsADirectoryError traceback once the pass was done; results that no progress.sqlite
    accounts for (a copied run dir, a user's own file) were replaced without --fresh."""
    analyze = layerfast.analyze
    out = tmp_path / "o"
    (out / "results.csv").mkdir(parents=True)
    with pytest.raises(LayerfastError, match=r"results.csv is not a regular file"):
        analyze("fcn3x256", ckpts, out=out, **ARGS)
    (out / "results.csv").rmdir()
    (out / "run.json").write_text("{}")  # someone else's
    with pytest.raises(LayerfastError, match=r"already holds run.json, but no progress.sqlite"):
        analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert (out / "run.json").read_text() == "{}" and not (out / "progress.sqlite").exists()
    analyze("fcn3x256", ckpts, out=out, fresh=True, **ARGS)  # --fresh replaces them
    assert json.loads((out / "run.json").read_text())["arch"] == "fcn3x256"
    analyze("fcn3x256", ckpts, out=out, **ARGS)  # its own finished run: no --fresh needed
    assert not (out / ".layerfast-previous").exists()  # what --fresh set aside is gone
    (out / ".layerfast-previous").write_text("mine")
    with pytest.raises(LayerfastError, match=r"layerfast-previous is not a directory"):
        analyze("fcn3x256", ckpts, out=out, fresh=True, **ARGS)
    assert (out / ".layerfast-previous").read_text() == "mine"


def test_a_checkpoint_interval_that_is_not_a_number_is_said_as_given(monkeypatch):
    """LAYERFAST_CHECKPOINT_EVERY=abc was reported as "got -1.0"."""
    from layerfast.flags import _checkpoint_every

    monkeypatch.setenv("LAYERFAST_CHECKPOINT_EVERY", "abc")
    with pytest.raises(LayerfastError, match=r"got 'abc'"):
        _checkpoint_every(None)
    monkeypatch.setenv("LAYERFAST_CHECKPOINT_EVERY", "-2")
    with pytest.raises(LayerfastError, match=r"got -2.0"):
        _checkpoint_every(None)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("UPDATE state SET info = 'not json'", "engine record is not a JSON object"),
        ("UPDATE state SET info = '[1]'", "engine record is not a JSON object"),
        ("UPDATE state SET counts = NULL", "sums are not float64 values"),
        ("UPDATE state SET n_done = 'x'", "sample count is 'x'"),
        ("UPDATE state SET counts = zeroblob(length(counts))", "baseline row does not count"),
        ("UPDATE meta SET value = 'nope' WHERE key = 'fingerprint'", "fingerprint is not a JSON"),
    ],
)
def test_a_tampered_store_is_one_clear_error(ckpts, tmp_path, sql, match):
    """A progress.sqlite edited by hand or damaged in its values (not its pages) was a
    JSONDecodeError or TypeError traceback, or, with zeroed sums, exit 0 at 100% error."""
    import sqlite3

    out = tmp_path / "o"
    layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    db = sqlite3.connect(out / "progress.sqlite")
    db.execute(sql)
    db.commit()
    db.close()
    with pytest.raises(LayerfastError, match=match):
        layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        (0, -50.0, "counts are not counts over 360 samples"),
        (3, 10.5, "counts are not counts over 360 samples"),
        (2, -1e9, "a cross-entropy sum is negative"),
    ],
)
def test_impossible_sums_in_the_store_are_damage(ckpts, tmp_path, column, value, match):
    """Negative or fractional counts and a negative loss sum resumed as a finished run and
    wrote an error of 1.14, an agreement of -0.008 and a loss of -2.8e6, exit 0 (and `report`
    then refused the results.csv analyze had just written)."""
    import sqlite3

    out = tmp_path / "o"
    layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    (out / "run.json").unlink()  # as if killed while writing the outputs: a rerun restores
    db = sqlite3.connect(out / "progress.sqlite")
    blob = db.execute("SELECT counts FROM state WHERE id = 0").fetchone()[0]
    sums = np.frombuffer(blob, dtype=np.float64).reshape(-1, 4).copy()
    sums[1, column] = value
    db.execute("UPDATE state SET counts = ? WHERE id = 0", (sums.tobytes(),))
    db.commit()
    db.close()
    with pytest.raises(LayerfastError, match=match):
        layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)


def test_a_store_that_cannot_be_written_is_said_so_and_leaves_no_dir(ckpts, tmp_path, monkeypatch):
    """A full disk while the store is set up was "cannot use the resume store ...; pass --fresh"
    (no help: --fresh cannot make room) and left the run's new out dir behind with an empty
    progress.sqlite. Now it names the write and the dir this run created is gone."""
    import sqlite3

    import layerfast.store as store

    def full(*args, **kwargs):
        exc = sqlite3.OperationalError("disk I/O error")
        exc.sqlite_errorcode = 4874  # SQLITE_IOERR_SHMSIZE: Python gives the extended code
        raise exc

    monkeypatch.setattr(store.sqlite3, "connect", full)
    out = tmp_path / "new" / "run"
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze("fcn3x256", ckpts, out=out, reset=["reinit"], **ARGS)
    assert str(info.value) == (
        f"cannot write the resume store {out / 'progress.sqlite'} (disk I/O error)"
    )
    assert not out.exists()
    # a store that is damaged (not the disk) still points at --fresh, and an out dir that was
    # there before the run is left where it was
    out.mkdir(parents=True)

    def damaged(*args, **kwargs):
        raise sqlite3.DatabaseError("file is not a database")

    monkeypatch.setattr(store.sqlite3, "connect", damaged)
    with pytest.raises(LayerfastError, match="pass --fresh to start over there"):
        layerfast.analyze("fcn3x256", ckpts, out=out, reset=["reinit"], **ARGS)
    assert out.is_dir()


def test_an_out_dir_that_cannot_be_written_is_left_as_it_was(ckpts, tmp_path, monkeypatch):
    """On a full disk the write probe was created and never removed (and the directories the
    run had made stayed): `.layerfast-write-test` in the user's out dir."""
    import errno
    import os
    from pathlib import Path

    real = Path.write_text

    def full(self, *a, **k):
        if self.name != ".layerfast-write-test":
            return real(self, *a, **k)
        self.touch()  # the file is made, its data do not fit
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    for out, fresh in ((tmp_path / "new" / "sub", False), (tmp_path / "mine", True)):
        if fresh:
            out.mkdir()
            (out / "notes.txt").write_bytes(b"the user's")
        with pytest.raises(LayerfastError, match="cannot write to the out dir .*No space left"):
            layerfast.analyze("fcn3x256", ckpts, out=out, fresh=fresh, **ARGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def _full_disk_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writing `name` fails as on a full disk (atomic_path's own error)."""
    from layerfast.report import tables

    real = tables.atomic_path

    def atomic(path, *a, **k):
        if Path(path).name == name:
            raise LayerfastError(f"cannot write {path}: No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(tables, "atomic_path", atomic)


@pytest.mark.parametrize("fresh", [False, True])
def test_a_full_disk_while_writing_outputs_keeps_the_finished_pass(ckpts, reference, tmp_path,
                                                                   monkeypatch, fresh):
    """The rollback for bad input took a full disk for bad input: the finished store of an
    existing out dir was deleted (or, with --fresh, replaced by the old one) and the whole pass
    ran again. Only the pass and its logits check are rolled back; a failed write keeps the
    store, and the same command again only writes the outputs."""
    out = tmp_path / "o"
    out.mkdir()
    if fresh:
        layerfast.analyze("fcn3x256", ckpts, out=out, **{**ARGS, "threshold": 0.2})
    _full_disk_at(monkeypatch, "distances.csv")
    with pytest.raises(LayerfastError, match="No space left"):
        layerfast.analyze("fcn3x256", ckpts, out=out, fresh=fresh, **ARGS)
    assert not (out / "run.json").exists()  # no run.json beside this run's results.csv
    monkeypatch.undo()
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert res.run["engine"]["evaluated"] == 0
    same_outputs(out, reference)
    assert not (out / ".layerfast-previous").exists()


def test_a_rerun_at_another_threshold_that_fails_to_write_leaves_no_old_run_json(
        ckpts, reference, tmp_path, monkeypatch):
    """A finished run re-judged at another threshold rewrote results.csv, then failed on a full
    disk: the new verdicts sat beside the old run.json, which said threshold 0.05."""
    import shutil

    out = Path(shutil.copytree(reference, tmp_path / "o"))
    _full_disk_at(monkeypatch, "distances.csv")
    with pytest.raises(LayerfastError, match="No space left"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **{**ARGS, "threshold": 0.9})
    assert not (out / "run.json").exists()
    monkeypatch.undo()
    layerfast.analyze("fcn3x256", ckpts, out=out, **{**ARGS, "threshold": 0.9})
    assert json.loads((out / "run.json").read_text())["threshold"] == 0.9


def test_a_refused_rerun_keeps_what_a_killed_fresh_run_set_aside(ckpts, reference, tmp_path,
                                                                 monkeypatch):
    """A --fresh run killed mid-pass leaves the old run in .layerfast-previous; the old command
    without --fresh is refused (other arguments), and that used to delete it first."""
    import shutil

    out = Path(shutil.copytree(reference, tmp_path / "o"))
    crash_in_finish(monkeypatch)
    with pytest.raises(_Crash):
        layerfast.analyze("fcn3x256", ckpts, out=out, fresh=True, **{**ARGS, "seeds": 2})
    monkeypatch.undo()
    aside = out / ".layerfast-previous"
    assert (aside / "results.csv").exists() and (aside / "progress.sqlite").exists()
    with pytest.raises(LayerfastError, match="pass --fresh"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert (aside / "results.csv").exists() and (aside / "progress.sqlite").exists()


def test_the_refusal_after_a_fresh_run_killed_at_its_set_aside_says_where_the_store_is(
        ckpts, reference, tmp_path):
    """Killed right after `--fresh` moved the old store aside (before the new one exists): the
    outputs are still in place, their store is in .layerfast-previous, and the refusal names it."""
    import shutil

    out = Path(shutil.copytree(reference, tmp_path / "o"))
    aside = out / ".layerfast-previous"
    aside.mkdir()
    shutil.move(out / "progress.sqlite", aside / "progress.sqlite")
    with pytest.raises(LayerfastError, match=r"no progress.sqlite of the run that wrote them \(a "
                                             r"--fresh run was stopped after moving it into "
                                             r".*\.layerfast-previous\): pass --fresh"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert (aside / "progress.sqlite").is_file() and (out / "results.csv").is_file()


def test_a_fresh_run_that_cannot_open_its_store_puts_the_old_one_back(ckpts, reference, tmp_path,
                                                                      monkeypatch):
    import shutil
    import sqlite3

    out = Path(shutil.copytree(reference, tmp_path / "o"))
    before = (out / "progress.sqlite").read_bytes()
    real = sqlite3.connect

    def full(*a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sqlite3, "connect", full)
    with pytest.raises(LayerfastError, match="resume store"):
        layerfast.analyze("fcn3x256", ckpts, out=out, fresh=True, **ARGS)
    monkeypatch.setattr(sqlite3, "connect", real)
    assert (out / "progress.sqlite").read_bytes() == before
    assert not (out / ".layerfast-previous").exists()
    assert layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS).run["engine"]["evaluated"] == 0


def test_bad_input_after_a_killed_fresh_run_puts_the_finished_run_back(ckpts, reference,
                                                                       tmp_path, monkeypatch):
    """finished run -> --fresh killed mid-pass (the finished run is set aside) -> --fresh on
    bad input: the set-aside finished run was deleted at the start of the third run."""
    import shutil

    out = Path(shutil.copytree(reference, tmp_path / "o"))
    crash_in_finish(monkeypatch)
    with pytest.raises(_Crash):
        layerfast.analyze("fcn3x256", ckpts, out=out, fresh=True, **{**ARGS, "seeds": 2})
    monkeypatch.undo()
    bad = Path(shutil.copytree(ckpts, tmp_path / "bad"))
    final = bad / "epoch_003.pt"
    sd = torch.load(final, weights_only=True)
    sd["fc1.weight"].fill_(3e38)
    torch.save(sd, final)
    with pytest.raises(LayerfastError, match="NaN or Inf logits"):
        layerfast.analyze("fcn3x256", bad, out=out, fresh=True, **ARGS)
    assert not (out / ".layerfast-previous").exists()
    same_outputs(out, reference)
    assert layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS).run["engine"]["evaluated"] == 0


def test_a_full_disk_at_the_first_write_of_a_fresh_store_is_said_and_undone(
        ckpts, reference, tmp_path, monkeypatch):
    """The store's first write (its identity) raised sqlite3's error as a traceback, exit 1,
    with the old store left set aside for the next run to delete."""
    import shutil
    import sqlite3

    out = Path(shutil.copytree(reference, tmp_path / "o"))
    before = (out / "progress.sqlite").read_bytes()
    real_open = ResumeStore._open

    class Full:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def execute(self, sql: str, *a):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *a)

        def close(self) -> None:
            self.db.close()

    monkeypatch.setattr(ResumeStore, "_open", lambda self: Full(real_open(self)))
    with pytest.raises(LayerfastError, match="resume store"):
        layerfast.analyze("fcn3x256", ckpts, out=out, fresh=True, **ARGS)
    monkeypatch.undo()
    assert (out / "progress.sqlite").read_bytes() == before
    assert not (out / ".layerfast-previous").exists()
    assert layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS).run["engine"]["evaluated"] == 0

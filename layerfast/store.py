"""The resume store: a run's progress, persisted transactionally in `<out>/progress.sqlite`.

One data pass evaluates every variant, so "finished work" is the prefix of the data already
seen. The store keeps, in one row updated in one transaction, how many samples are done and the
float64 [V, 4] sums at that point; SQLite's journal makes each update all-or-nothing, so a run
killed at any moment (SIGKILL included) leaves either the previous or the new state. A rerun
with the same arguments continues from there: the same batches in the same order are added to
the same sums, so the end result equals an uninterrupted run. A rerun with different arguments
is refused unless `fresh=True`, because adding sums of one configuration to another's would
silently produce numbers that belong to neither.

Two runs writing into one out dir at once would interleave their sums, so the store also holds
an advisory lock (`flock` on `<out>/.layerfast.lock`) for as long as it is open; the kernel
drops it when the process dies, so a killed run never leaves a stale lock behind. Only a lock
held elsewhere refuses a run: on a file system without locks (NFS without lockd) it goes on
unprotected, with a warning, as on a platform without `fcntl`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np
import torch

from layerfast.errors import LayerfastError, warn

try:  # POSIX only; elsewhere runs are simply not protected against a concurrent writer
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

#: SQLite's result codes for a store that is sound but cannot be written (a full disk or
#: quota, an I/O error, a read-only file system): --fresh would not help there.
_CANNOT_WRITE = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY})

FILENAME = "progress.sqlite"
LOCKNAME = ".layerfast.lock"
#: The database and its WAL/SHM side files (a stale WAL would be replayed into a new database).
STORE_FILES = tuple(FILENAME + suffix for suffix in ("", "-wal", "-shm", "-journal"))
#: Where a run moves what it replaces (`--fresh`'s old store, an old run's outputs) until it
#: has written its own: bad input found during the pass puts them back (`analysis`).
PREVIOUS = ".layerfast-previous"
#: Bumped whenever the tables change, or what a fingerprint evaluates does (the variants'
#: tensors, the split into passes, how a group fans out), so an old store is refused instead of
#: misread or continued with other numbers. 3: rerandom draws from contiguous copies (under
#: channels_last they drew others) and units kept whole in one pass (session 13). 4: steps with
#: hooks or wrapped functions read every key, and pruned / old-style spectral_norm units hold
#: their mask and u/v buffers, and a branch on a buffer's value is not frozen into the trace
#: (session 14): such models' variants evaluate other numbers. 5: the fingerprint holds the
#: model's definition (`models.identity`), so an old store's cannot match (session 15). 6:
#: whole-model variants after a parameterless first step (fcn3x256's fullmodel) no longer fan
#: out (session 19): with fan-out on, their rows sum other bits.
SCHEMA = "6"


@dataclass
class Progress:
    """What a previous run left behind: samples done, their sums, whether the pass finished,
    and (once finished) the engine's summary of it, kept so a rerun can report it unchanged."""

    n_done: int
    counts: torch.Tensor | None
    complete: bool
    info: dict


class ResumeStore:
    """Progress of one analysis in one out dir; see the module docstring for the guarantees."""

    def __init__(self, out: Path, fingerprint: dict, num_variants: int, fresh: bool = False,
                 created: bool = False) -> None:
        """`created`: this run made `out`, so a store it cannot set up there (a full disk)
        removes `out` again, while it still holds the lock, instead of leaving an empty store."""
        self.path = Path(out) / FILENAME
        self.fingerprint = json.dumps(fingerprint, sort_keys=True, default=str)
        self.V = num_variants
        self._lock = _acquire_lock(Path(out))
        aside = Path(out) / PREVIOUS
        try:
            # What an earlier, interrupted run set aside goes once this run takes over the
            # out dir and resumes it (not when it is refused). A --fresh run keeps it: it is
            # the finished run a chain of interrupted --fresh runs started from, which bad
            # input puts back, and the successful run deletes.
            if fresh:
                set_aside(Path(out), STORE_FILES)
            self.db = self._open()
            self._check_identity(out)
            if not fresh:
                shutil.rmtree(aside, ignore_errors=True)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.close_db()
            if created and isinstance(exc, LayerfastError):
                shutil.rmtree(out, ignore_errors=True)
            elif fresh and isinstance(exc, LayerfastError):  # the old store back, as it was
                restore(Path(out), (STORE_FILES,), set())
            self._release()
            raise

    # ---- setup -----------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        db = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 0),"
                       " n_done INTEGER, counts BLOB, complete INTEGER, info TEXT)")
        except sqlite3.DatabaseError as exc:
            # closed here: the error's traceback holds this frame, so a damaged store's
            # connection stayed open as long as the error lived (an API caller's, a notebook's
            # last traceback), with the -wal and -shm files it made left beside the store
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            raise self._unusable(exc) from None
        return db

    def _unusable(self, exc: sqlite3.Error) -> LayerfastError:
        code = getattr(exc, "sqlite_errorcode", None)  # extended: IOERR_SHMSIZE is 4874
        if isinstance(code, int) and code & 0xFF in _CANNOT_WRITE:  # the disk, not the file
            return LayerfastError(f"cannot write the resume store {self.path} ({exc})")
        return LayerfastError(f"cannot use the resume store {self.path} ({exc}); pass --fresh "
                              "to start over there, or choose another --out")

    def _check_identity(self, out: Path) -> None:
        try:  # a file of that name that is not our store (other tables, damaged pages)
            rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
            # the meta rows are committed before any progress is saved: progress without
            # them belongs to no known run, and taking it as new adopted another run's sums
            orphan = not rows and self.db.execute("SELECT 1 FROM state").fetchone() is not None
        except sqlite3.Error as exc:
            self.close()
            raise self._unusable(exc) from None
        if orphan:
            self.close()
            raise self._damaged("it holds progress but no record of the run it belongs to")
        if not rows:
            try:  # the first write: a full disk shows here
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("INSERT INTO meta VALUES ('schema', ?), ('fingerprint', ?)",
                                (SCHEMA, self.fingerprint))
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self.close_db()
                raise self._unusable(exc) from None
            return
        if rows.get("schema") != SCHEMA:
            self.close()
            raise LayerfastError(f"{out} holds progress written by another layerfast version; "
                                 "pass --fresh to start over there, or choose another --out")
        if rows.get("fingerprint") != self.fingerprint:
            try:
                old = json.loads(rows.get("fingerprint") or "{}")
                if not isinstance(old, dict):
                    raise ValueError(f"a {type(old).__name__}")
            except (TypeError, ValueError) as exc:
                self.close()
                raise self._damaged(f"its fingerprint is not a JSON object ({exc})") from None
            new = json.loads(self.fingerprint)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if len(diff) > 1 and "pass_layout" in diff:  # follows from the others: not news
                diff.remove("pass_layout")
            self.close()
            raise LayerfastError(f"{out} holds {_what_differs(diff)}; pass --fresh to start "
                                 "over there, or choose another --out")

    # ---- state -----------------------------------------------------------------------
    def load(self) -> Progress:
        """The saved progress; n_done 0 and no counts when nothing was saved yet."""
        try:
            row = self.db.execute("SELECT n_done, counts, complete, info FROM state WHERE id = 0"
                                  ).fetchone()
        except sqlite3.Error as exc:
            raise self._unusable(exc) from None
        if row is None:
            return Progress(0, None, False, {})
        n_done, blob, complete, info = row
        if not isinstance(blob, bytes) or len(blob) % 8:
            raise self._damaged("its sums are not float64 values")
        flat = np.frombuffer(blob, dtype=np.float64)
        if flat.size != self.V * 4:
            raise LayerfastError(f"{self.path} holds sums for {flat.size // 4} variants, not "
                                 f"{self.V}; pass --fresh to start over there")
        if isinstance(n_done, bool) or not isinstance(n_done, int) or n_done < 0:
            raise self._damaged(f"its sample count is {n_done!r}")
        counts = flat.reshape(self.V, 4)[:, [0, 1, 3]]
        if (not np.isfinite(counts).all() or (counts > n_done).any() or (counts < 0).any()
                or (counts != np.floor(counts)).any()):
            raise self._damaged(f"its counts are not counts over {n_done} samples")
        if (flat.reshape(self.V, 4)[:, 2] < 0).any():  # NaN stays: a variant that overflowed
            raise self._damaged("a cross-entropy sum is negative")
        try:
            meta = json.loads(info or "{}")
            if not isinstance(meta, dict):
                raise ValueError(f"a {type(meta).__name__}")
        except (TypeError, ValueError) as exc:
            raise self._damaged(f"its engine record is not a JSON object ({exc})") from None
        counts = torch.from_numpy(flat.copy().reshape(self.V, 4))
        return Progress(n_done, counts, bool(complete), meta)

    def _damaged(self, why: str) -> LayerfastError:
        return LayerfastError(f"{self.path} is damaged: {why}; pass --fresh to start over there")

    #: The engine's state to save with each segment (`Evaluator.resume_state`), returned by
    #: a later `load()` as `info["resume"]`: what a rerun must continue with to end as an
    #: uninterrupted run (its K, out-of-memory back-offs, the finished passes' plans).
    engine_state: Callable[[], dict] | None = None

    def save(self, counts: torch.Tensor, n_done: int) -> None:
        """Record the sums over the first `n_done` samples (the engine's `on_checkpoint`),
        and `engine_state()` beside them."""
        info = {} if self.engine_state is None else {"resume": self.engine_state()}
        self._write(counts, n_done, False, info)

    def finish(self, counts: torch.Tensor, n_done: int, info: dict) -> None:
        """Mark the pass complete; `info` (plan, timings) is returned by later `load()`s."""
        self._write(counts, n_done, True, info)

    def _write(self, counts: torch.Tensor, n_done: int, complete: bool, info: dict) -> None:
        blob = counts.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
        try:
            self.db.execute("INSERT OR REPLACE INTO state VALUES (0, ?, ?, ?, ?)",
                            (int(n_done), blob, int(complete), json.dumps(info, default=str)))
        except sqlite3.Error as exc:
            raise LayerfastError(f"cannot write the resume store {self.path}: {exc}") from None

    # ---- teardown --------------------------------------------------------------------
    def close(self) -> None:
        self.close_db()
        self._release()

    def close_db(self) -> None:
        """Close the database but keep the lock: before its files are moved or deleted (on
        close, SQLite checkpoints and deletes the WAL file by its name)."""
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
            self.db = None  # type: ignore[assignment]

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def __enter__(self) -> ResumeStore:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


#: Fingerprint keys the engine derives from the machine and the code, not from the arguments.
_PLAN_KEYS = frozenset({"device", "precision", "batch_size", "fanout", "max_fanout",
                        "channels_last", "passes", "pass_layout"})
#: Keys that change when the files on disk change under the same arguments.
_INPUT_KEYS = frozenset({"files", "data_files", "n", "model"})
#: Plan keys an option can also set: the same command on another machine or version changes
#: them, but so does the user's own `--batch-size 64`, and the refusal must not blame the machine.
_PLAN_OPTIONS = {"batch_size": "--batch-size", "device": "--device", "precision": "--precision",
                 "fanout": "--fanout", "channels_last": "--layout"}
#: Written last by a finished run (analysis.OUTPUTS): a store marked complete without it was
#: killed while writing its outputs, so the run is not finished yet.
_DONE_MARKER = "run.json"


def _what_differs(diff: list[str]) -> str:
    """Why a stored run is not this one, in the user's terms: the same command can differ in
    its inputs (checkpoint files rewritten) or in the engine's plan (another machine, memory
    size or layerfast version), which are not "different arguments"."""
    args = [k for k in diff if k not in _PLAN_KEYS | _INPUT_KEYS]
    parts = []
    if args:
        parts.append(f"a run with different arguments (differs in: {', '.join(args)})")
    if "model" in diff and "arch" not in diff:  # another arch is another argument
        parts.append("a run of the same arch whose definition (its code or structure) has "
                     "changed since")
    # Files "changed since" only under the same --ckpts / --data: another directory or data
    # spec has other files, and calling them changed sent users looking for a retraining.
    # Likewise another --data, --split or --max-samples is another n, said as that argument.
    if "files" in diff and "ckpts" not in diff:
        parts.append("a run over checkpoint files that have changed since")
    if "data_files" in diff and "data" not in diff:  # analysis keeps the data's files there
        parts.append("a run over data files that have changed since")
    elif "n" in diff and not {"files", "data", "data_files", "split", "max_samples"} & set(diff):
        parts.append("a run over data with another number of samples")
    plan = [k for k in diff if k in _PLAN_KEYS]
    if plan:
        flags = list(dict.fromkeys(_PLAN_OPTIONS[k] for k in plan if k in _PLAN_OPTIONS))
        why = "another machine, memory size or layerfast version"
        if flags:
            why = f"another {' or '.join(flags)}, or {why}"
        parts.append(f"a run the engine planned differently (differs in: {', '.join(plan)}: {why})")
    return "; and ".join(parts) if parts else "another run"


def find_unfinished(parent: Path, prefix: str, fingerprint: dict) -> Path | None:
    """The newest `parent/<prefix>*` dir holding an unfinished run with this fingerprint: its
    pass not complete, or complete but its outputs not all written (no run.json: killed while
    writing them), which a rerun finishes without evaluating again."""
    want = json.dumps(fingerprint, sort_keys=True, default=str)
    for d in sorted(parent.glob(f"{prefix}*"), reverse=True):
        db = d / FILENAME
        if not db.is_file():
            continue
        # A read-only connection to a WAL database creates its -wal and -shm files and cannot
        # delete them on close: every finished run dir looked at here gained two stale files.
        # Without a -wal file no connection is open and every commit is in the main file, so
        # that is read as it is (`immutable`: no side files); with one (a run writing there, or
        # one SIGKILLed) the committed frames may be only in it, read by a normal reader.
        mode = "ro" if db.with_name(db.name + "-wal").exists() else "ro&immutable=1"
        try:
            # as_uri percent-encodes the path: a `?`, `#` or `%xx` in it cut the URI short or
            # was decoded, the open failed, and a rerun started over instead of resuming
            con = sqlite3.connect(f"{db.absolute().as_uri()}?mode={mode}", uri=True, timeout=5)
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
                row = con.execute("SELECT complete FROM state WHERE id = 0").fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            continue
        finished = bool(row and row[0]) and (d / _DONE_MARKER).is_file()
        if meta.get("schema") == SCHEMA and meta.get("fingerprint") == want and not finished:
            return d
    return None


def set_aside(out: Path, names: tuple[str, ...]) -> None:
    """Move the files `names` of `out` that exist into `out/PREVIOUS` (same file system: a
    rename each), for `restore` to put back or the finished run to delete. `names` is one
    group (a store and its side files, or a run's outputs), never mixed across runs: when
    PREVIOUS already holds some of the group (set aside by an earlier --fresh run that was
    killed), those stay, and the files here, that killed run's, are deleted instead."""
    aside = out / PREVIOUS
    try:
        held = any((aside / n).exists() for n in names)
        for name in names:
            if not (out / name).exists():
                continue
            if held:
                (out / name).unlink()
            else:
                aside.mkdir(exist_ok=True)
                os.replace(out / name, aside / name)
    except OSError as exc:  # no inode left for the folder: the disk, said as such
        raise LayerfastError(f"cannot write to the out dir {out}: {exc.strerror or exc}") from None


def restore(out: Path, groups: tuple[tuple[str, ...], ...], existed: set[str]) -> None:
    """Undo a run that failed on bad input, group by group (see `set_aside`): a group set
    aside replaces what is there now, whole (a WAL must never meet another run's database);
    otherwise each file this run created is deleted and the others are left alone."""
    aside = out / PREVIOUS
    for group in groups:
        back = [n for n in group if (aside / n).exists()]
        for name in group:
            if back or name not in existed:
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        for name in back:
            os.replace(aside / name, out / name)
    shutil.rmtree(aside, ignore_errors=True)


def _acquire_lock(out: Path, name: str = LOCKNAME, target: Path | None = None,
                  flag: str | None = "--out") -> IO[str] | None:
    """flock `out/name` (created), or refuse: another layerfast run is writing `target` (by
    default `out` itself; `layerfast convert` locks one .beton in its folder)."""
    if fcntl is None:
        return None
    target = out if target is None else target
    # train and convert unlink their lock file just before they close it: a run that opened
    # the old file meanwhile would hold a lock on a file no longer at the path, beside a third
    # run locking a new one. So the lock counts only on the file still at the path; else retry.
    for _ in range(8):
        fh = _locked_file(out, name, target, flag)
        if fh is None:
            return None
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(out / name).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    else:
        raise LayerfastError(f"cannot lock {out / name}: it was replaced 8 times in a row")
    with contextlib.suppress(OSError):
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
    return fh


@contextlib.contextmanager
def locked_dir(out: Path) -> Iterator[None]:
    """Hold `out`'s run lock (`LOCKNAME`) while writing into a finished run's directory
    (`layerfast report` redraws its figures): an analyze rerun writing there at the same time
    would otherwise have its new figures replaced by ones drawn from the old CSV files. A lock
    file this creates is removed again, as train and convert remove theirs."""
    existed = (out / LOCKNAME).exists()
    fh = _acquire_lock(out, flag=None)
    try:
        yield
    finally:
        if fh is not None:
            if not existed:
                with contextlib.suppress(OSError):
                    (out / LOCKNAME).unlink()
            fh.close()


def _locked_file(out: Path, name: str, target: Path, flag: str | None) -> IO[str] | None:
    """`out/name` opened and flocked (`_acquire_lock`), None where the file system has no
    locks, or the one-line refusal when another run holds it."""
    try:
        fh = open(out / name, "a+")  # noqa: SIM115 - held open for the store's lifetime
    except OSError as exc:
        what = f"the out dir {out}" if target == out else f"{out}, the folder of {target.name}"
        raise LayerfastError(f"cannot write to {what}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # no locks on this file system (NFS without lockd, some FUSE mounts): that is not
            # "another run", which would refuse every run there for good; go on unprotected
            fh.close()
            warn(f"cannot lock {out} ({exc.strerror or exc}); a second run writing there at "
                 "the same time would not be noticed")
            return None
        fh.seek(0)
        pid = fh.read().strip()
        fh.close()
        who = f" (pid {pid})" if pid.isdigit() else ""
        other = f", or choose another {flag}" if flag else ""  # report has no --out to change
        raise LayerfastError(f"another layerfast run{who} is writing to {target}; wait for it "
                             f"to finish{other}") from None
    return fh

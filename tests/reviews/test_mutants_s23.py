"""Mutation testing of session 22's new code (session 23): each test here kills a small change
to that code (a dropped branch, a flipped comparison, a constant) that every existing test let
through. The mutant each one kills is named in its docstring."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import layerfast.cli as cli
import layerfast.data.beton as beton
import layerfast.hostmem as hostmem
from layerfast import Evaluator
from layerfast.data import convert
from layerfast.data.beton import sidecar_path
from layerfast.data.spec import data_key, same_data
from layerfast.engine.precision import float32_default
from layerfast.errors import LayerfastError
from layerfast.report import heatmap_figure
from layerfast.store import ResumeStore, find_unfinished
from tests.cli.test_hostmem_s22 import ROOT, _fake_libc
from tests.cli.test_startup_interrupt_s22 import _run_m
from tests.data.test_beton_pair_s22 import replace_failing_on, two_sources
from tests.data.test_data_ffcv import require_ffcv
from tests.report.test_report import FCN, make_table


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


# --- engine/arguments.py ---------------------------------------------------------------------

def test_one_mapping_of_state_keys_is_told_to_be_put_in_a_list():
    """Mutant: the `{key: tensor}` check dropped. The mapping was then iterated as a list of
    its keys and refused as 'variant 0 ... got str', with no word of `[it]`."""
    one = {"1.weight": torch.zeros(3, 4)}
    with pytest.raises(LayerfastError, match=r"got one mapping of state keys to tensors: "
                                             r"pass \[it\]"):
        Evaluator(_model(), one, device="cpu")


@pytest.mark.parametrize("n, more", [(3, False), (4, True)])
def test_a_mapping_of_named_variants_lists_three_names_and_says_if_there_are_more(n, more):
    """Mutant: `len(variants) > 3` as `>= 3`: three names were followed by ', ...'."""
    named = {f"v{i}": {} for i in range(n)}
    with pytest.raises(LayerfastError) as err:
        Evaluator(_model(), named, device="cpu")
    assert "'v0', 'v1', 'v2'" in str(err.value)
    assert ("'v2', ...)" in str(err.value)) is more
    assert "'v3'" not in str(err.value)


@pytest.mark.parametrize("data", [5, None])
def test_data_that_is_no_batches_is_refused_by_name(data):
    """Mutant: `check_run`'s data check dropped (a TypeError from inside the plan)."""
    with pytest.raises(LayerfastError, match=r"data must be a layerfast DataSource or an "
                                             r"iterable of \(x, y\) batches; got"):
        Evaluator(_model(), [{}], device="cpu").run(data)


# --- hostmem.py and the commands that call it -------------------------------------------------

@pytest.mark.parametrize("var", ["MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"])
def test_every_malloc_variable_of_the_user_wins(monkeypatch, var):
    """Mutant: either name dropped from `_USER_SETTINGS` (the s22 test sets two of the four)."""
    libc = _fake_libc(monkeypatch)
    monkeypatch.setenv(var, "0")
    assert not hostmem.steady_malloc() and libc.calls == []


def test_a_refused_mallopt_is_reported_as_not_set(monkeypatch):
    """Mutant: mallopt's return value ignored (True whatever glibc answered); the trim
    threshold is not set after the mmap threshold was refused."""
    libc = _fake_libc(monkeypatch)

    def refuse(param: int, value: int) -> int:
        libc.calls.append((param, value))
        return 0

    libc.mallopt = refuse
    assert not hostmem.steady_malloc()
    assert libc.calls == [(hostmem.M_MMAP_THRESHOLD, hostmem.MMAP_THRESHOLD)]


def test_a_c_library_that_is_not_glibc_is_left_alone(monkeypatch):
    """Mutant: `_glibc()` true for any answer of confstr (only a raising one was tested)."""
    monkeypatch.setattr(hostmem.os, "confstr", lambda name: "musl libc 1.2.4")
    assert not hostmem._glibc()


@pytest.mark.parametrize("argv, computes", [
    (["train", "--arch", "fcn1x4", "--data", "digits", "--epochs", "1", "--out", "x"], True),
    (["demo"], True),
    (["bench"], True),
    (["convert", "digits", "--to", "x.beton"], False),
    (["report", "x"], False),
])
def test_each_computing_command_sets_malloc_and_no_other(monkeypatch, argv, computes):
    """Mutant: a command dropped from `cli.COMPUTES` (the s22 test runs analyze and info)."""
    called: list[int] = []
    monkeypatch.setattr(hostmem, "steady_malloc", lambda: called.append(1) or True)
    monkeypatch.setitem(cli.COMMANDS, argv[0], lambda args: 0)
    assert cli.main(argv) == 0
    assert called == ([1] if computes else [])


# --- store.py ---------------------------------------------------------------------------------

def test_an_unfinished_run_is_looked_at_read_only(tmp_path, monkeypatch):
    """Mutant: `?mode=` written `#mode=`: the mode became the URI's fragment, which SQLite
    ignores, so the run's database was opened read-write (as a path with '#' in it cut the URI
    short before s22). Each URI find_unfinished opens must refuse a write."""
    out = tmp_path / "runs?v=2#x" / "fcn3x256-1"
    out.mkdir(parents=True)
    fp = {"arch": "fcn3x256", "data": "digits"}
    store = ResumeStore(out, fp, num_variants=3, created=True)
    uris: list[str] = []
    real = sqlite3.connect

    def spy(database, *a, **k):
        uris.append(database)
        return real(database, *a, **k)

    try:
        store.save(torch.zeros(3, 4, dtype=torch.float64), 5)
        for close in (False, True):  # with a -wal file (mode=ro), then without (immutable)
            if close:
                store.close_db()
            monkeypatch.setattr(sqlite3, "connect", spy)
            assert find_unfinished(out.parent, "fcn3x256-", fp) == out
            monkeypatch.undo()
            con = sqlite3.connect(uris[-1], uri=True)
            try:
                assert con.execute("SELECT complete FROM state WHERE id = 0").fetchone()
                with pytest.raises(sqlite3.OperationalError, match="readonly"):
                    con.execute("DELETE FROM meta")
            finally:
                con.close()
    finally:
        store.close()


# --- engine/precision.py ----------------------------------------------------------------------

def test_float32_default_puts_the_callers_default_back_after_an_exception():
    """Mutant: the restore after the `try` instead of in its `finally`: a run that failed
    (a LayerfastError, Ctrl-C) left a float64 notebook on float32."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(KeyboardInterrupt), float32_default():
            assert torch.get_default_dtype() == torch.float32
            raise KeyboardInterrupt
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(before)



# --- data/spec.py: data_key, same_data --------------------------------------------------------

def _converted(path: Path, source: str) -> str:
    """A .beton whose sidecar says `convert` wrote it from `source` (data_key and same_data
    read only the sidecar)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0")
    sidecar_path(path).write_text(json.dumps({"split": "test", "source": source}))
    return str(path)


@pytest.mark.parametrize("source", ["x.npz", "/elsewhere/x.npz"])
def test_a_beton_of_an_npz_is_matched_by_the_npz_file_name(tmp_path, source):
    """Mutant: `_data_name`'s .npz branch dropped (the name was then the whole path): a
    sidecar from before ede60c7 records the source as typed, relative, and a .beton converted
    in another folder names its folder's path; both are the manifest's x.npz by name."""
    beton = _converted(tmp_path / "d.beton", source)
    assert same_data(beton, str(tmp_path / "x.npz"))
    assert same_data(str(tmp_path / "x.npz"), beton)
    assert not same_data(beton, str(tmp_path / "y.npz"))


def test_a_beton_of_cifar10_is_matched_by_the_data_sets_name(tmp_path):
    """Mutant: cifar10 dropped from `_data_name`'s names (the whole spec then): the .beton of
    cifar10:DIR against the manifest's cifar10:DIR/cifar-10-batches-py (one folder) warned."""
    beton = _converted(tmp_path / "c.beton", f"cifar10:{tmp_path / 'data'}")
    assert same_data(beton, f"cifar10:{tmp_path / 'data' / 'cifar-10-batches-py'}")
    assert not same_data(beton, "digits")


def test_a_sidecar_with_a_blank_source_stands_for_no_data_set(tmp_path):
    """Mutant: a blank `source` taken as a source (empty name): two such .betons of other data
    in two folders read as one data set. Without a source a .beton is its own file."""
    a = _converted(tmp_path / "a" / "d.beton", "  ")
    b = _converted(tmp_path / "b" / "d.beton", "")
    assert not same_data(a, b)
    assert same_data(a, a)


def test_two_betons_of_one_source_are_one_data_set(tmp_path):
    """Mutant: `data_key`'s sidecar branch dropped (a .beton keyed by its own path): analyze
    of a copy of the .beton the manifest names warned 'not the data the manifest names'."""
    a = _converted(tmp_path / "a" / "d.beton", "digits")
    b = _converted(tmp_path / "b" / "copy.beton", "DIGITS")
    assert data_key(a) == data_key(b) == ("digits",)
    assert same_data(a, b)
    assert not same_data(a, _converted(tmp_path / "c" / "d.beton", "synthetic:cifar"))


def test_one_folder_read_by_two_readers_is_two_data_sets(tmp_path):
    """Mutant: the reader's name dropped from a path key: cifar10:DIR and imagefolder:DIR, two
    readings of one folder, were one data set."""
    (tmp_path / "data").mkdir()
    d = tmp_path / "data"
    assert not same_data(f"cifar10:{d}", f"imagefolder:{d}")
    assert same_data(f"imagefolder:{d}", f"imagefolder:{d}/")


def test_a_manifests_relative_path_is_taken_from_its_folder(tmp_path, monkeypatch):
    """Mutant: `same_data`'s `base` ignored: the manifest's relative x.npz was read against the
    current directory, so the same file named from another directory was other data."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert same_data(str(tmp_path / "x.npz"), "x.npz", tmp_path)
    assert not same_data(str(tmp_path / "x.npz"), "x.npz")


def test_a_cifar_batches_folder_behind_a_link_is_the_folder_it_links(tmp_path):
    """Mutant: the batches folder `batch_dir` finds not resolved: DIR/cifar-10-batches-py, a
    link to the folder the other spec names, was another data set."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "cifar-10-batches-py").symlink_to(real)
    assert same_data(f"cifar10:{tmp_path / 'dir'}", f"cifar10:{real}")


# --- data/beton.py: the sidecar's fingerprint -------------------------------------------------

@pytest.mark.parametrize("whole", [True, False])
def test_the_fingerprint_is_the_documented_hash(tmp_path, monkeypatch, whole):
    """Mutants: the size left out of the hash, another digest size or name, a file of exactly
    `_FINGERPRINT_WHOLE` bytes sampled. Sidecars written since s22 hold this value: any other
    makes every one of them 'describe a different file'."""
    data = bytes(range(256)) * 40
    path = tmp_path / "f.beton"
    path.write_bytes(data)
    monkeypatch.setattr(beton, "_FINGERPRINT_WHOLE", len(data) if whole else len(data) - 1)
    monkeypatch.setattr(beton, "_FINGERPRINT_BLOCK", 1024)
    monkeypatch.setattr(beton, "_FINGERPRINT_BLOCKS", 3)
    h = hashlib.blake2b(len(data).to_bytes(8, "little"), digest_size=16)
    for part in ([data] if whole else [data[:1024], data[4608:5632], data[-1024:]]):
        h.update(part)
    assert beton.beton_fingerprint(path) == f"blake2b-v1:{h.hexdigest()}"


def test_a_failing_move_onto_a_new_path_leaves_no_sidecar(tmp_path, monkeypatch):
    """Mutant: the sidecar kept whenever the .beton's move fails: onto a path that held no
    .beton, a sidecar was left alone (a later convert's target check reads it)."""
    require_ffcv()
    a, _ = two_sources(tmp_path)
    to = tmp_path / "new.beton"
    replace_failing_on(to, PermissionError(13, "Permission denied"), monkeypatch)
    with pytest.raises(LayerfastError):
        convert(a, to)
    assert not to.exists() and not sidecar_path(to).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.npz", "s1.npz"]


# --- the startup signal handling (layerfast/__init__.py, cli.py) ------------------------------

def test_python_m_with_the_module_in_the_same_argument_is_the_command(tmp_path):
    """Mutant: `-mlayerfast` (the module in -m's own argument, as Python takes it) not read:
    the module was taken from the next argument, so a Ctrl-C while torch imported was a
    KeyboardInterrupt traceback there, not 'layerfast: interrupted', 130."""
    p = _run_m(tmp_path, "-mlayerfast", "info")
    assert p.returncode == 130, p.stderr
    assert p.stderr == "layerfast: interrupted\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_command_leaves_an_ignored_sigint_ignored_while_it_imports() -> None:
    """Mutant: the startup handler installed whatever SIGINT was: a command started with it
    ignored (nohup, a background job) counted a Ctrl-C during its imports as an interrupt, and
    `cli.main` then put Python's default handler back."""
    p = _python("""
        import signal, sys
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.argv = ["layerfast"]
        import layerfast.cli
        print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
    """)
    assert p.stdout == "True\n", p.stderr


def test_a_ctrl_c_while_the_command_runs_stops_it() -> None:
    """Mutant: `cli.main` not taking over from the startup handler: a Ctrl-C during the
    command was only remembered, so the command ran on to its end (exit 0). And the handler
    main installs is Python's default again once main returns."""
    p = _python("""
        import signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["layerfast"]
        import layerfast, layerfast.cli as cli
        assert signal.getsignal(signal.SIGINT) is layerfast._startup_sigint

        def interrupted(args):
            signal.raise_signal(signal.SIGINT)
            print("went on")
            return 0

        cli.COMMANDS["info"] = interrupted
        status = cli.main(["info"])
        print(status, signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """)
    assert p.stdout == "130 True\n", p.stderr
    assert p.stderr == "layerfast: interrupted\n"


def test_a_startup_signal_is_answered_once(monkeypatch, capsys):
    """Mutant: `STARTUP_SIGNALS` not cleared once answered: every later `cli.main` call in the
    process said 'interrupted' before doing anything."""
    import layerfast

    monkeypatch.setitem(cli.COMMANDS, "info", lambda args: 0)
    monkeypatch.setattr(layerfast, "STARTUP_SIGNALS", [2])
    assert cli.main(["info"]) == 130
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().err == "layerfast: interrupted\n"


class _Unraisable:
    def __init__(self, exc: BaseException) -> None:
        self.exc_value = exc


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(143)])
def test_only_a_signals_own_unraisable_exception_is_hidden(monkeypatch, exc):
    """Mutant: `_quiet_unraisable` hid every unraisable KeyboardInterrupt/SystemExit, also
    those no signal of the command raised (a library's own), whose report is its only trace."""
    seen: list[object] = []
    quiet = cli._quiet_unraisable(seen.append)
    monkeypatch.setattr(cli, "_SIGNALLED", None)
    quiet(_Unraisable(exc))
    monkeypatch.setattr(cli, "_SIGNALLED", 130)
    quiet(_Unraisable(exc))
    quiet(_Unraisable(ValueError("not a signal's")))
    assert [type(u.exc_value) for u in seen] == [type(exc), ValueError]  # type: ignore[attr-defined]


def test_main_puts_the_unraisable_hook_back(monkeypatch):
    """Mutant: `sys.unraisablehook` left as main's quiet wrapper after main returned."""
    monkeypatch.setitem(cli.COMMANDS, "info", lambda args: 0)
    before = sys.unraisablehook
    assert cli.main(["info"]) == 0
    assert sys.unraisablehook is before


# --- report/figures.py ------------------------------------------------------------------------

def test_a_run_of_rerandom_rows_alone_resets_one_unit_in_the_title():
    """Mutant: rerandom dropped from what counts as one unit's reset: `--reset rerandom` alone
    was titled 'after resetting the whole model'."""
    table = make_table(FCN)
    rerandom = table[table["kind"].isin(["baseline", "rerandom"])]
    assert "after resetting one unit" in heatmap_figure(rerandom).get_suptitle()

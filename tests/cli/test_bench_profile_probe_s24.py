"""`layerfast bench --profile` is opened for writing before any timing (session 24).

Defect: the early check used `os.access`, which root passes for paths that cannot be written:
a symlink loop (`ln -s loop loop`), a file under /sys, a FIFO with no reader (the write would
block). Those failed at the table's write, after every approach had been timed. Now the path
is opened (to append, non-blocking) before the data is even opened: one line, exit 2. A file
the probe created is removed again if the run then fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfast.cli import main


class _Blocked(BaseException):
    """Not an OSError (the probe turns those into its message) nor an Exception."""


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    """Fail, not hang, if the probe blocks: a FIFO opened without O_NONBLOCK waits for a
    reader forever (a mutant that dropped the flag held the suite for minutes)."""
    def boom(*_: object) -> None:
        raise _Blocked(f"the --profile probe blocked for {seconds} s (a FIFO open?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _no_timing(monkeypatch) -> None:
    monkeypatch.setattr("layerfast.data.open_data", lambda *a, **k: pytest.fail("timing started"))


@pytest.mark.parametrize("kind", ["symlink loop", "fifo", "under a file"])
def test_an_unwritable_profile_is_refused_before_timing(kind: str, tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    _no_timing(monkeypatch)
    if kind == "symlink loop":
        prof = tmp_path / "loop"
        prof.symlink_to("loop")
    elif kind == "fifo":
        prof = tmp_path / "fifo"
        os.mkfifo(prof)
    else:
        (tmp_path / "afile").write_text("")
        prof = tmp_path / "afile" / "p.txt"
    with _alarm(20):
        rc = main(["bench", "--device", "cpu", "--profile", str(prof)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--profile {prof}: cannot be written (" in err, err


def test_a_failed_run_leaves_no_profile_file(tmp_path: Path, capsys) -> None:
    """The probe creates the file; a run that then fails (an unknown arch, found after the
    probe) removes it, and leaves an existing file as it was."""
    new = tmp_path / "new.txt"
    assert main(["bench", "--device", "cpu", "--arch", "nosuch", "--profile", str(new)]) == 2
    assert "unknown arch 'nosuch'" in capsys.readouterr().err
    assert not new.exists()
    old = tmp_path / "old.txt"
    old.write_text("keep")
    assert main(["bench", "--device", "cpu", "--arch", "nosuch", "--profile", str(old)]) == 2
    assert old.read_text() == "keep"
    # through a link: the link's target is what the probe created, and what goes again
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "sub" / "t.txt")
    assert main(["bench", "--device", "cpu", "--arch", "nosuch", "--profile", str(link)]) == 2
    assert list((tmp_path / "sub").iterdir()) == [] and link.is_symlink()

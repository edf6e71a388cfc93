"""A Ctrl-C while the command builds its parser (which imports the engine: numpy, pandas) ends
it with one line and exit status 130. CI caught `python -m layerfast info` interrupted 0.3 s in,
inside numpy's lazy `import numpy.dtypes`: numpy was left half-imported, the KeyboardInterrupt
came out as a RecursionError traceback and exit 1, because `cli.main` installed its handler
(which remembers the signal) only after parsing."""

from __future__ import annotations

import signal

import pytest

import layerfast.cli as cli


class _HalfImport:
    """A parser whose build is interrupted where a library turns the KeyboardInterrupt into
    another error (as numpy's half-done lazy import did)."""

    def parse_args(self, argv):
        raise AssertionError("not reached")


def _interrupted_parser():
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        raise RecursionError("maximum recursion depth exceeded") from None
    return _HalfImport()


@pytest.fixture
def default_sigint():
    """SIGINT at Python's default, as in a terminal (CI's background job inherits it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_while_the_parser_is_built_is_one_line(monkeypatch, capsys, default_sigint):
    monkeypatch.setattr(cli, "parser", _interrupted_parser)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "layerfast: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_an_error_without_a_signal_still_shows_its_traceback(monkeypatch, default_sigint):
    def broken():
        raise RecursionError("a real bug")

    monkeypatch.setattr(cli, "parser", broken)
    with pytest.raises(RecursionError, match="a real bug"):
        cli.main(["info"])

"""A Ctrl-C while the command builds its parser (which imports the engine: numpy, pandas) ends
it with one line and exit status 130. CI caught `python -m layerfast info` interrupted 0.3 s in,
inside numpy's lazy `import numpy.dtypes`: numpy was left half-imported, the KeyboardInterrupt
came out as a RecursionError traceback and exit 1, because `cli.main` installed its handler
(which remembers the signal) only after parsing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

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


_CALLBACK = textwrap.dedent("""
    import signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # CI's job inherits it ignored
    import layerfast.cli as cli

    class InterruptsOnDelete:  # the SIGINT where Python cannot raise its KeyboardInterrupt
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    real = cli.parser
    def parser():
        InterruptsOnDelete()  # deleted at once: the handler's exception is unraisable
        return real()
    cli.parser = parser
    raise SystemExit(cli.main(["info"]))
""")


def test_a_ctrl_c_in_a_callback_is_one_line_without_the_ignored_traceback() -> None:
    """As llvmlite's ctypes callback during numba's compile (`layerfast info` ~2 s in): Python
    printed "Exception ignored on calling ctypes callback function" and `_interrupted`'s
    traceback before "layerfast: interrupted". (A subprocess: pytest replaces the hook.)"""
    p = subprocess.run([sys.executable, "-c", _CALLBACK], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 130, p.stderr
    assert p.stderr == "layerfast: interrupted\n", p.stderr

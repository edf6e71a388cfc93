"""layerfast: which layers of a trained network matter, every variant in one data pass.

`layerfast.analyze(...)` runs a whole study (DESIGN.md §5); `layerfast.Evaluator` evaluates
arbitrary weight variants of any `nn.Module` on any iterable of batches.
"""

from __future__ import annotations

import os as _os
import sys as _sys

#: The modules `python -m` runs as the command: the package (its __main__) and `cli`, whose
#: `if __name__ == "__main__"` makes `python -m layerfast.cli` the command too.
_COMMAND_MODULES = ("layerfast", "layerfast.__main__", "layerfast.cli")


def _is_the_command() -> bool:
    """Whether this process is the `layerfast` command (the console script or `python -m
    layerfast`, `python -m layerfast.cli`), not a Python program that imports layerfast."""
    if _sys.argv[:1] == ["-m"]:  # `python -m X` while runpy imports X's package
        # X follows the interpreter's own -m, the first one: a later "-m layerfast" is the
        # program's arguments (`python study.py -m layerfast`, `pytest -m layerfast`)
        orig = [*getattr(_sys, "orig_argv", []), ""]
        i = next((i for i, a in enumerate(orig[1:-1], 1) if a.startswith("-m")), None)
        # orig[i][2:]: `-mlayerfast`, the module in the same argument
        return i is not None and (orig[i][2:] or orig[i + 1]) in _COMMAND_MODULES
    return _os.path.basename(_sys.argv[0] if _sys.argv else "") == "layerfast"


#: SIGINTs the command received while it started (`_startup_sigint`): answered by `cli.main`
#: once the imports are done.
STARTUP_SIGNALS: list[int] = []


def _startup_sigint(signum: int, frame: object) -> None:
    """The command's SIGINT handler while it imports (torch: most of its ~3 s start, before
    `cli.main` installs its own): it remembers the signal and raises nothing. A
    KeyboardInterrupt raised inside a library's import left it half-done — numpy's lazy
    `import numpy.dtypes` then failed with a RecursionError traceback (exit 1), a signal after
    the extension's import gave a KeyboardInterrupt traceback (-2), and torch's native
    libraries ended some runs by SIGABRT at exit — so the imports finish and `cli.main` says
    "layerfast: interrupted", exit 130, before it parses anything."""
    STARTUP_SIGNALS.append(signum)


def _interrupted_at_startup() -> None:
    """End the command whose import raised KeyboardInterrupt itself (a Ctrl-C before the
    handler was installed, or an import that raises it): one line, exit status 130, at once —
    nothing is open or written yet, and with torch half-initialized a normal exit was not
    safe (finalization ended such runs by SIGINT or SIGABRT after the line was printed)."""
    _sys.stderr.write("layerfast: interrupted\n")
    _sys.stderr.flush()
    _os._exit(130)


def _import_ext() -> None:
    """Import the extension (it fails with a clear message if the extension is missing). For
    the command, a SIGINT meanwhile is remembered (`_startup_sigint`, left installed for
    `cli.main` to take over); a program importing layerfast gets its KeyboardInterrupt as
    usual."""
    import signal

    command = _is_the_command()
    if command and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _startup_sigint)
        except ValueError:  # not the main thread: nothing to install
            pass
    try:
        from layerfast import _ext  # noqa: F401
    except KeyboardInterrupt:
        if command:
            _interrupted_at_startup()
        raise


_import_ext()
from layerfast.errors import LayerfastError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LayerfastError", "Evaluator", "analyze", "__version__"]


def __getattr__(name: str):
    # Lazy: `import layerfast` stays cheap for `layerfast info` and the ops tests.
    if name == "Evaluator":
        from layerfast.engine import Evaluator

        return Evaluator
    if name == "analyze":
        from layerfast.analysis import analyze

        return analyze
    raise AttributeError(f"module 'layerfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too: `dir(layerfast)` (and tab completion) listed neither `analyze` nor
    `Evaluator` until they were first used."""
    return sorted({*globals(), *__all__})

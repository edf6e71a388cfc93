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


def _import_ext() -> None:
    """Import the extension (and torch with it: most of a command's ~3 s start, before
    `cli.main` installs its handler). A Ctrl-C there printed a 30-line KeyboardInterrupt
    traceback; the command says what it says for a Ctrl-C anywhere else, while a program
    importing layerfast gets the KeyboardInterrupt as usual. For the command a SIGINT handler
    remembers the signal during the import: a KeyboardInterrupt inside a library's import can
    come out as another error (numpy's lazy `import numpy.dtypes` left half-done gave a
    RecursionError), which is then the Ctrl-C too."""
    import signal

    seen: list[int] = []

    def remember(signum: int, frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    command = _is_the_command()
    ours = False
    if command and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, remember)
            ours = True
        except ValueError:  # not the main thread: nothing to install
            pass
    try:
        from layerfast import _ext  # noqa: F401  (a clear message if the extension is missing)
    except BaseException as exc:
        if command and (isinstance(exc, KeyboardInterrupt) or seen):
            _sys.stderr.write("layerfast: interrupted\n")
            raise SystemExit(130) from None
        raise
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


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

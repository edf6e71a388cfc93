"""A Ctrl-C while the `layerfast` command imports torch (before `cli.main` runs) ends it with
one line and exit status 130, however the imports were going. CI caught the failure modes of
raising KeyboardInterrupt there: inside numpy's lazy `import numpy.dtypes` it left numpy
half-imported and the command failed later with a RecursionError traceback (exit 1); a library
that swallowed it let the command go on; just after the extension's import it was a traceback
and exit -2; torch half-initialized sometimes ended the process by SIGABRT at exit. The command's
startup handler now only remembers the signal; `cli.main` answers it once the imports are
done. A program importing layerfast gets its KeyboardInterrupt as usual."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Where `import torch` would run: a real SIGINT, and what a library might do with it.
_HOOK = textwrap.dedent("""
    import builtins, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # CI's job inherits it ignored
    real = builtins.__import__
    done = []
    def fake(name, *a, **k):
        if (name == "torch" or name.startswith("torch.")) and not done:
            done.append(1)
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                {library}
        return real(name, *a, **k)
    builtins.__import__ = fake
    sys.argv = [{argv0!r}]
    {body}
""")
_COMMAND = "from layerfast.cli import main; print('imported'); raise SystemExit(main(['info']))"


def _run(argv0: str, library: str, body: str) -> subprocess.CompletedProcess:
    code = _HOOK.format(argv0=argv0, library=library, body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("library", [
    'raise RecursionError("maximum recursion depth exceeded") from None',  # numpy half-done
    "pass",  # a library that swallows it and goes on
])
@pytest.mark.parametrize("argv0", ["/venv/bin/layerfast", "layerfast"])
def test_the_command_says_interrupted_once_its_imports_are_done(argv0, library) -> None:
    p = _run(argv0, library, _COMMAND)
    assert p.returncode == 130, p.stderr
    assert p.stderr == "layerfast: interrupted\n"
    # the imports finished (nothing raised inside them); main answered before parsing
    assert p.stdout == "imported\n"


def test_a_program_gets_the_keyboardinterrupt_as_python_gives_it() -> None:
    p = _run("/home/me/study.py", 'raise RecursionError("from the library") from None',
             "import layerfast")
    assert p.returncode == 1 and "RecursionError: from the library" in p.stderr, p.stderr
    assert "layerfast: interrupted" not in p.stderr

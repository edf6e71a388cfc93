"""A Ctrl-C while the `layerfast` command imports torch (before `cli.main` runs) that a library
turns into another error (numpy's lazy import left half-done gave a RecursionError) is still
the Ctrl-C: one line, exit 130. A program importing layerfast gets what Python gives it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Where `import torch` would run: a real SIGINT, which the import turns into another error.
_HOOK = textwrap.dedent("""
    import builtins, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # CI's job inherits it ignored
    real = builtins.__import__
    def fake(name, *a, **k):
        if name == "torch" or name.startswith("torch."):
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                raise RecursionError("maximum recursion depth exceeded") from None
        return real(name, *a, **k)
    builtins.__import__ = fake
    sys.argv = [{argv0!r}]
    {body}
""")


def _run(argv0: str, body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _HOOK.format(argv0=argv0, body=body)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv0", ["/venv/bin/layerfast", "layerfast"])
def test_the_command_says_interrupted_whatever_error_the_import_made(argv0) -> None:
    p = _run(argv0, "from layerfast.cli import main")
    assert p.returncode == 130, p.stderr
    assert p.stderr == "layerfast: interrupted\n"


def test_a_program_gets_the_error_as_python_gives_it() -> None:
    p = _run("/home/me/study.py", "import layerfast")
    assert p.returncode == 1 and "RecursionError" in p.stderr, p.stderr
    assert "layerfast: interrupted" not in p.stderr

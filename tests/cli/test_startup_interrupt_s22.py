"""`python -m layerfast.cli ...` runs the command (cli.py's `if __name__ == "__main__"`), but
the package's startup check did not count it as the command: a Ctrl-C while torch imported
printed a KeyboardInterrupt traceback, where `layerfast` and `python -m layerfast` say
"layerfast: interrupted" and exit 130 (tests/cli/test_startup_interrupt.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The interpreter's startup imports sitecustomize before `-m` runs: the hook is in place when
# runpy imports the package, and raises where `import torch` would run (a Ctrl-C landing there).
_HOOK = """
import builtins
real = builtins.__import__
def fake(name, *a, **k):
    if name == "torch" or name.startswith("torch."):
        raise KeyboardInterrupt
    return real(name, *a, **k)
builtins.__import__ = fake
"""


def _run_m(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(_HOOK)
    path = os.pathsep.join(p for p in (str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH"))
                           if p)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path}, cwd=tmp_path)


@pytest.mark.parametrize("module", ["layerfast.cli", "layerfast.__main__", "layerfast"])
def test_python_m_of_the_command_module_says_one_line(tmp_path, module) -> None:
    p = _run_m(tmp_path, "-m", module, "info")
    assert p.returncode == 130, p.stderr
    assert p.stderr == "layerfast: interrupted\n"


def test_another_layerfast_module_run_with_m_is_no_command(tmp_path) -> None:
    # `python -m layerfast.info` is a program of its own, not the command: its Ctrl-C is its own
    p = _run_m(tmp_path, "-m", "layerfast.info")
    assert p.returncode != 130 and "KeyboardInterrupt" in p.stderr

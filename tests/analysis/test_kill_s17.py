"""Session 17 review: kills, interrupts and reruns (DESIGN.md §5).

A run killed at any moment and started again with the same arguments must end with the same
out dir as an uninterrupted run. SIGKILL cannot be caught, so whatever a killed write leaves
behind has to be cleaned up by the rerun that holds the out dir's lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import layerfast
from layerfast.analysis import OUTPUTS

REPO = Path(__file__).resolve().parents[2]
ARGS = {"data": "digits", "seeds": 1, "device": "cpu", "batch_size": 64, "progress": False,
        "checkpoint_every": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def hidden(out: Path) -> list[str]:
    """The dot files of `out` besides the lock: temporaries of the atomic writes."""
    return sorted(p.name for p in out.iterdir()
                  if p.name.startswith(".") and p.name not in (".layerfast.lock",))


# The exact names `report.atomic_path`'s mkstemp gives: `.<name>.<8 random chars><suffix>`.
STALE = [".results.csv.a1b2c3d4.csv", ".distances.csv.zz_9q0x1.csv",
         ".heatmap.png.koqfeyty.png", ".distances.png.0123abcd.png", ".run.json.qwertyui.json"]


def test_rerun_removes_temporaries_a_killed_output_write_left(ckpts, tmp_path):
    """A SIGKILL between mkstemp and os.replace leaves `.distances.png.<rand>.png` (seen in a
    kill campaign: the finished rerun kept it forever, so the out dir differed from an
    uninterrupted run's). The rerun, holding the lock, removes such temporaries."""
    out = tmp_path / "run"
    layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    for name in STALE:
        (out / name).write_bytes(b"\x89PNG half")
    (out / "run.json").unlink()  # as if killed before run.json: the rerun writes the outputs
    keep = [".results.csv.notmine", ".heatmap.png.user-notes.txt", ".other.abcdefgh.png"]
    for name in keep:  # not a name the atomic writes make: a user's, left alone
        (out / name).write_text("mine")
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert res.run["engine"]["evaluated"] == 0
    assert (out / "run.json").is_file()
    assert hidden(out) == sorted(keep)


def test_resumed_pass_removes_temporaries_too(ckpts, tmp_path):
    """A run whose pass is unfinished also holds the lock when it starts: the temporaries of a
    killed earlier write go then as well, not only once the outputs are written."""
    out = tmp_path / "run"
    out.mkdir()
    for name in STALE:
        (out / name).write_bytes(b"x")
    layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert hidden(out) == []


@pytest.mark.slow
def test_sigkill_during_figure_write_then_rerun_matches(ckpts, tmp_path):
    """The real thing: `layerfast analyze` SIGKILLed right before distances.png's temporary
    replaces the figure, then the same command again: the out dir holds exactly what an
    uninterrupted run's does, results byte for byte the same."""
    ref = tmp_path / "ref"
    layerfast.analyze("fcn3x256", ckpts, out=ref, **ARGS)
    out = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "import layerfast.report.tables as t\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if str(dst).endswith('distances.png'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "t.os = type(os)('os_shim'); t.os.__dict__.update(os.__dict__); t.os.replace = replace\n"
        "from layerfast.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--data", "digits",
            "--device", "cpu", "--batch-size", "64", "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                       timeout=120)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert any(n.startswith(".distances.png.") for n in hidden(out))
    r = subprocess.run([sys.executable, "-m", "layerfast", *argv], env=env, capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert hidden(out) == []
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in ref.iterdir() if not p.name.startswith("."))
    for name in ("results.csv", "distances.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert set(OUTPUTS) <= {p.name for p in out.iterdir()}


def test_ctrl_c_while_the_arguments_are_parsed_is_one_line(monkeypatch, capsys):
    """Ctrl-C during argument parsing (argparse calls layerfast.flags' `--seeds` parser; this
    once imported pandas too: a second of a CLI start) printed a 40-line KeyboardInterrupt
    traceback; it is the same "layerfast: interrupted", exit 130, as anywhere later."""
    import layerfast.flags
    from layerfast.cli import main

    def interrupted(text: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(layerfast.flags, "parse_seeds", interrupted)
    assert main(["analyze", "--arch", "fcn3x256", "--seeds", "3"]) == 130
    err = capsys.readouterr().err
    assert err == "layerfast: interrupted\n"

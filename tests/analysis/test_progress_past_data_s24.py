"""A progress store whose sample count is past the data says so in the user's terms
(session 24).

Defect: a hand-edited OUT/progress.sqlite (the store a rerun resumes from) recording 1000
samples done, on 64 samples of data, failed in the engine with "digits: start offset 1000 is
outside 0..64": the data blamed, and nothing of the store or of the way out. Now it is "...
progress.sqlite is damaged: it records 1000 samples done, but the data has 64; pass --fresh
to start over there", exit 2, before anything of the earlier run is touched.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from layerfast.cli import main
from layerfast.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s24") / "run"
    train("fcn1x4", "digits", 1, out, max_samples=64, progress=False, device="cpu")
    return out


def _analyze(ckpts: Path, out: Path, *more: str) -> int:
    return main(["analyze", "--arch", "fcn1x4", "--ckpts", str(ckpts), "--data", "digits",
                 "--max-samples", "64", "--out", str(out), "--quiet", "--device", "cpu",
                 "--reset", "reinit", *more])  # fmt: skip


def test_a_sample_count_past_the_data_is_said_as_such(run_dir: Path, tmp_path: Path,
                                                      capsys) -> None:
    out = tmp_path / "an"
    assert _analyze(run_dir, out) == 0
    results = (out / "results.csv").read_bytes()
    with sqlite3.connect(out / "progress.sqlite") as db:
        db.execute("UPDATE state SET n_done = 1000, complete = 0")
    capsys.readouterr()
    assert _analyze(run_dir, out) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"layerfast: error: {out / 'progress.sqlite'} is damaged: it records 1000 "
                       "samples done, but the data has 64; pass --fresh to start over there")
    assert not [e for e in err if "start offset" in e or "Traceback" in e], err
    assert (out / "results.csv").read_bytes() == results  # the earlier run's outputs stay
    assert _analyze(run_dir, out, "--fresh") == 0  # the way out it names works

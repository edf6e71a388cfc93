"""Resumability (DESIGN.md §5): a run killed at any moment and started again with the same
arguments ends with the same results as an uninterrupted run, without redoing finished work.

Design: the engine hands its float64 sums to `ResumeStore.save` every `checkpoint_every`
seconds (0 here: every batch), one SQLite transaction each. A rerun loads them and continues
from the saved sample count with the same batch boundaries, so the sums are added in the same
order as in one uninterrupted pass and results.csv comes out byte for byte the same.

The fast tests crash in-process (an exception right after the k-th save, which leaves the store
exactly as a kill at that point would). The slow test is the real thing: `python -m layerfast
analyze` in a subprocess, SIGKILLed several times at random moments after the store shows new
progress, then run to the end and compared with an uninterrupted run in another directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import layerfast
from layerfast.cli import main
from layerfast.errors import LayerfastError
from layerfast.flags import _checkpoint_every
from layerfast.store import FILENAME, ResumeStore

REPO = Path(__file__).resolve().parents[2]
ARGS = {"data": "digits", "seeds": 1, "device": "cpu", "batch_size": 32, "progress": False,
        "figures": False, "checkpoint_every": 0}


class _Crash(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def finished(ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the reference every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    return out


def saved(out: Path) -> tuple[int, bool] | None:
    """(samples done, complete) as the store holds them, or None before the first save."""
    if not (out / FILENAME).exists():
        return None
    try:
        con = sqlite3.connect(out / FILENAME, timeout=5)
        try:
            row = con.execute("SELECT n_done, complete FROM state WHERE id = 0").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return None if row is None else (int(row[0]), bool(row[1]))


def crash_after(monkeypatch: pytest.MonkeyPatch, saves: int,
                crash: type[BaseException] = _Crash) -> None:
    """Make the k-th progress save the last thing the run does (after it is committed)."""
    real = ResumeStore.save
    count = {"n": 0}

    def save(self: ResumeStore, counts, n_done: int) -> None:
        real(self, counts, n_done)
        count["n"] += 1
        if count["n"] == saves:
            raise crash

    monkeypatch.setattr(ResumeStore, "save", save)


def same_outputs(a: Path, b: Path) -> None:
    for name in ("results.csv", "distances.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_crash_mid_pass_resumes_to_identical_results(ckpts, finished, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after(m, 4)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert saved(out) == (4 * 32, False)
    assert not (out / "results.csv").exists() and not (out / "run.json").exists()
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert res.run["engine"]["resumed_from"] == 128
    assert res.run["engine"]["evaluated"] == 360 - 128
    same_outputs(out, finished)
    assert saved(out) == (360, True)


def test_crash_twice_then_finish(ckpts, finished, tmp_path, monkeypatch):
    out = tmp_path / "run"
    for k, expect in ((2, 64), (5, 64 + 160)):
        with monkeypatch.context() as m:
            crash_after(m, k)
            with pytest.raises(_Crash):
                layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
        assert saved(out) == (expect, False)
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert res.run["engine"]["resumed_from"] == 224
    same_outputs(out, finished)


def test_finished_run_is_not_evaluated_again(ckpts, finished, tmp_path, monkeypatch):
    from layerfast.engine import Evaluator

    out = Path(shutil.copytree(finished, tmp_path / "copy"))
    (out / "results.csv").unlink()

    def no_pass(*a, **k):
        raise AssertionError("a finished run was evaluated again")

    monkeypatch.setattr(Evaluator, "run", no_pass)
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)
    assert res.run["engine"]["evaluated"] == 0
    same_outputs(out, finished)


def test_different_arguments_are_refused_unless_fresh(ckpts, finished, tmp_path, capsys,
                                                      monkeypatch):
    out = Path(shutil.copytree(finished, tmp_path / "copy"))
    before = (out / "results.csv").read_bytes()
    with pytest.raises(LayerfastError, match=r"different arguments \(differs in: seeds, variants\).*--fresh"):
        layerfast.analyze("fcn3x256", ckpts, out=out, **{**ARGS, "seeds": 2})
    rc = main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--out", str(out),
               "--seeds", "2", "--batch-size", "32", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("layerfast: error: ") and err.count("\n") == 1
    assert "different arguments" in err and "--fresh" in err and "Traceback" not in err
    assert (out / "results.csv").read_bytes() == before  # refused: nothing touched
    # --fresh starts over; the old run's outputs vanish at once, not when the new pass ends
    with monkeypatch.context() as m:
        crash_after(m, 1)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, fresh=True, **{**ARGS, "seeds": 2})
    assert not (out / "results.csv").exists() and not (out / "run.json").exists()
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **{**ARGS, "seeds": 2})
    assert res.run["engine"]["resumed_from"] == 32 and res.run["seeds"] == [1, 2]


def test_default_out_dir_resumes_the_unfinished_run(ckpts, finished, tmp_path, monkeypatch):
    """Without --out each run gets layerfast-out/<arch>-<time>; the same command again must
    find the unfinished one rather than start over under a new time stamp."""
    monkeypatch.chdir(tmp_path)
    args = {**ARGS, "out": None}
    with monkeypatch.context() as m:
        crash_after(m, 3)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, **args)
    (first,) = (tmp_path / "layerfast-out").iterdir()
    assert first.name.startswith("fcn3x256-") and saved(first) == (96, False)
    res = layerfast.analyze("fcn3x256", ckpts, **args)
    assert res.out.resolve() == first.resolve() and res.run["engine"]["resumed_from"] == 96
    same_outputs(first, finished)
    time.sleep(1.1)  # a finished run is not reused: the next one gets its own directory
    again = layerfast.analyze("fcn3x256", ckpts, **args)
    assert again.out.resolve() != first.resolve() and again.run["engine"]["resumed_from"] == 0


def test_default_out_dirs_started_in_the_same_second_do_not_share(ckpts, finished, tmp_path,
                                                                  monkeypatch):
    """Two different runs stamped with the same second (a shell loop, a fast run) each get their
    own directory: sharing one, the second used to delete the first's finished results."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261206-000000")
    one = layerfast.analyze("fcn3x256", ckpts, **{**ARGS, "out": None})
    two = layerfast.analyze("fcn3x256", ckpts, **{**ARGS, "out": None, "threshold": 0.1,
                                                   "checkpoints": [0, 3]})
    three = layerfast.analyze("fcn3x256", ckpts, **{**ARGS, "out": None})
    names = [r.out.name for r in (one, two, three)]
    assert names == ["fcn3x256-20261206-000000", "fcn3x256-20261206-000000-2",
                     "fcn3x256-20261206-000000-3"]
    same_outputs(one.out, finished)  # untouched by the later runs
    assert (two.out / "run.json").is_file() and (three.out / "run.json").is_file()


def test_retrained_checkpoints_are_not_mixed_with_old_progress(ckpts, tmp_path, monkeypatch):
    ck = Path(shutil.copytree(ckpts, tmp_path / "ck"))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after(m, 1)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ck, out=out, **ARGS)
    f = ck / "epoch_002.pt"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # "rewritten"
    with pytest.raises(LayerfastError, match="holds a run over checkpoint files that have "
                       "changed since; pass --fresh"):
        layerfast.analyze("fcn3x256", ck, out=out, **ARGS)


def test_a_refusal_says_what_differs_in_the_users_terms():
    """The same command can differ from a stored run in its inputs or in the engine's plan (a
    new layerfast version, another GPU); calling that "different arguments" misleads."""
    from layerfast.store import _what_differs

    assert _what_differs(["passes"]) == ("a run the engine planned differently (differs in: "
                                        "passes: another machine, memory size or layerfast version)")
    both = _what_differs(["batch_size", "files", "seeds"])
    assert both.startswith("a run with different arguments (differs in: seeds); and a run over "
                           "checkpoint files") and "(differs in: batch_size:" in both


def test_a_second_concurrent_run_is_refused(ckpts, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with ResumeStore(out, {"held": True}, 1):
        with pytest.raises(LayerfastError, match="another layerfast run"):
            layerfast.analyze("fcn3x256", ckpts, out=out, **ARGS)


def test_checkpoint_interval(monkeypatch):
    monkeypatch.delenv("LAYERFAST_CHECKPOINT_EVERY", raising=False)
    assert _checkpoint_every(None) == 5.0
    assert _checkpoint_every(0.5) == 0.5
    monkeypatch.setenv("LAYERFAST_CHECKPOINT_EVERY", "0")
    assert _checkpoint_every(None) == 0.0
    monkeypatch.setenv("LAYERFAST_CHECKPOINT_EVERY", "soon")
    with pytest.raises(LayerfastError, match="LAYERFAST_CHECKPOINT_EVERY"):
        _checkpoint_every(None)


@pytest.mark.slow
def test_sigkill_at_random_moments(ckpts, tmp_path):
    """Kill the real command three times mid-pass, then let it finish: identical results.

    Kill points are random sample counts: once the store shows at least that many samples
    done, the process gets SIGKILL at once (wherever it is by then: inside a batch, a save, or
    between them). Targets stay well before the end so the kill lands mid-pass even when the
    pass runs fast; with 2 samples per batch and a save after each there are 180 saves. A
    random pause of up to 20 ms before the kill lets it land anywhere: inside a batch, inside
    a save's transaction, or between them."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAYERFAST_CHECKPOINT_EVERY": "0",
           "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "layerfast", "analyze", "--arch", "fcn3x256", "--ckpts",
                str(ckpts), "--data", "digits", "--seeds", "2", "--device", "cpu",
                "--batch-size", "2", "--quiet", "--out", str(out)]

    ref = tmp_path / "ref"
    done = subprocess.run(command(ref), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out, kills, rng = tmp_path / "run", [], random.Random(1902)
    targets = sorted(rng.sample(range(2, 200, 2), 3))
    for target in targets:
        proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            now = saved(out)
            if now and now[0] >= target:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))  # land anywhere: in a batch, in a save, between
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.wait()
        now = saved(out)
        assert now is not None and not now[1], f"the kill came after the pass ended: {now}"
        assert not (out / "results.csv").exists() and not (out / "run.json").exists()
        kills.append(now[0])
    assert kills == sorted(kills) and kills[0] > 0, kills
    proc = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["engine"]["resumed_from"] == kills[-1]  # finished work was not redone
    assert run["engine"]["evaluated"] == 360 - kills[-1]
    same_outputs(out, ref)


def test_an_empty_out_is_refused_not_the_current_directory(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--out", "",
                 "--max-samples", "40", "--device", "cpu", "--quiet"]) == 2
    assert "--out is empty" in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("seeds, msg", [("10000000", "more than 1000 re-randomizations"),
                                        ("99999999999999999999,1", r"\[0, 2\^63\)"),
                                        ("-1,2", r"\[0, 2\^63\)")])
def test_seeds_out_of_range_are_refused_before_anything_runs(ckpts, tmp_path, capsys, seeds, msg):
    import re

    out = tmp_path / "o"
    assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), f"--seeds={seeds}",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search(msg, err) and err.count("\n") == 1 and not out.exists()


def test_an_interrupted_run_says_what_a_rerun_resumes_from(ckpts, finished, tmp_path,
                                                           monkeypatch, capsys):
    """Ctrl-C printed only "layerfast: interrupted": nothing said the work was kept, or where.
    Now the line before it names the samples saved and the store."""
    from layerfast.cli import main

    out = tmp_path / "run"
    argv = ["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--out", str(out), "--quiet",
            "--data", "digits", "--seeds", "1", "--device", "cpu", "--batch-size", "32"]
    with monkeypatch.context() as m:
        m.setenv("LAYERFAST_CHECKPOINT_EVERY", "0")
        crash_after(m, 4, KeyboardInterrupt)
        assert main(argv) == 130
    err = capsys.readouterr().err.splitlines()
    assert err == [f"layerfast: 128 of 360 samples are saved in {out / FILENAME}; the same "
                   "command resumes from there", "layerfast: interrupted"]
    assert saved(out) == (128, False)
    # the reruns' summaries say what they did not evaluate (a finished run's rerun only restores)
    assert main(argv) == 0
    assert "(cpu, fp32, resumed after 128 saved in progress.sqlite)" in capsys.readouterr().out
    assert main(argv) == 0
    assert (f"(cpu, fp32, all restored from {out}/progress.sqlite, none evaluated again)"
            in capsys.readouterr().out)


def test_an_interrupted_run_of_several_passes_counts_samples_over_the_passes(
        ckpts, tmp_path, monkeypatch, capsys):
    """The rerun's summary said "resumed after 7185 saved" beside "1437 samples": the count is
    over the passes, as the interrupt's line already said, and now the summary says so too."""
    import layerfast.engine.evaluator as evm
    from layerfast.cli import main

    monkeypatch.setattr(evm, "stage_limit", lambda model_bytes: model_bytes // 3)
    out = tmp_path / "run"
    argv = ["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--out", str(out), "--quiet",
            "--data", "digits", "--device", "cpu", "--batch-size", "32"]
    with monkeypatch.context() as m:
        m.setenv("LAYERFAST_CHECKPOINT_EVERY", "0")
        crash_after(m, 14, KeyboardInterrupt)  # 12 batches of 32 per pass: into the second
        assert main(argv) == 130
    done = saved(out)[0]
    line = capsys.readouterr().err.splitlines()[0]
    P = int(line.split("(over ")[1].split(" passes)")[0])
    assert P > 1 and done > 360
    assert line == (f"layerfast: {done} of {360 * P} samples (over {P} passes) are saved in "
                    f"{out / FILENAME}; the same command resumes from there")
    assert main(argv) == 0
    assert (f"resumed after {done} of {360 * P} over {P} passes saved in progress.sqlite)"
            in capsys.readouterr().out)

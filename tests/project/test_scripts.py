"""The helper scripts under scripts/ that docs/reproduction.md uses."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from layerfast.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_runs_tabulates_each_units_reset_to_init(ckpts: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "a"
    assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--data", "digits",
                 "--seeds", "2", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    other = tmp_path / "b"  # a second run: same numbers, another name
    shutil.copytree(out, other)
    assert _script("compare_runs").main([str(out), str(other)]) == 0
    text = capsys.readouterr().out
    t = pd.read_csv(out / "results.csv")
    r0 = t[(t["kind"] == "reinit") & (t["checkpoint"] == 0) & (t["unit"] != "*")]
    assert len(r0) == 4
    for _, row in r0.iterrows():
        line = next(ln for ln in text.splitlines() if ln.startswith(row["unit"] + " "))
        assert f"{100 * row['error']:.1f}" in line
        n = 2 if row["verdict"] == "critical" else 0
        assert line.rstrip().endswith(f"{n}/2"), line


def test_gpu_session_script_parses_and_its_table_reads_bench_json(tmp_path: Path, capsys) -> None:
    """The GPU session runs on a machine lent rarely: a typo there would cost its device time."""
    import subprocess
    import sys

    script = ROOT / "scripts" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert main(["bench", "--device", "cpu", "--max-samples", "60", "--naive-variants", "2",
                 "--profile", str(tmp_path / "p.txt"), "--profile-samples", "30", "--json"]) == 0
    (tmp_path / "bench-fcn.json").write_text(capsys.readouterr().out)
    (tmp_path / "bench-broken.json").write_text("")  # a case that failed: skipped, not fatal
    (tmp_path / "bench-partial.json").write_text('{"seconds": {}}')  # cut off mid-way: skipped
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_table.py"), str(tmp_path)],
                         check=True, capture_output=True, text=True).stdout
    row = next(ln for ln in out.splitlines() if ln.startswith("fcn "))
    # B is the last column: the batch the pass ran, its 60 samples (1000 planned; session 22)
    assert len(row.split()) == 10 and row.split()[-1] == "60", row
    assert "aten::addmm" in out  # the profile's top ops follow the row
    assert "phases (s): setup " in out and " swapped " in out
    assert "partial" not in out and "broken" not in out


def test_compare_runs_keeps_runs_whose_dirs_share_a_name(tmp_path: Path, capsys) -> None:
    """seed0/analysis and seed1/analysis were one column, keyed by the dir's name: the second
    run's numbers silently replaced the first's (found comparing two ResNet-20 seeds)."""
    mod = _script("compare_runs")
    assert mod.labels([tmp_path / "s0" / "a", tmp_path / "s1" / "a", tmp_path / "b"]) == [
        "s0/a", "s1/a", "b"]
    assert mod.labels([tmp_path / "a", tmp_path / "a"]) == ["a #1", "a #2"]
    rows = {}
    for seed, err in ((0, 0.25), (1, 0.75)):
        d = tmp_path / f"seed{seed}" / "analysis"
        d.mkdir(parents=True)
        rows[seed] = d
        pd.DataFrame({
            "unit": ["*", "fc", "fc"], "kind": ["baseline", "reinit", "rerandom"],
            "checkpoint": [None, 0, None], "seed": [None, None, 1], "error": [0.1, err, 0.9],
            "delta_error": [0.0, err - 0.1, 0.8], "verdict": ["", "critical", "critical"],
        }).to_csv(d / "results.csv", index=False)
    assert mod.main([str(rows[0]), str(rows[1])]) == 0
    text = capsys.readouterr().out
    assert "seed0/analysis" in text and "seed1/analysis" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("fc "))
    assert "25.0" in line and "75.0" in line and line.rstrip().endswith("2/2")


def test_compare_runs_usage(tmp_path: Path, capsys) -> None:
    """--help prints a usage line (it used to be read as a run dir and crash); a dir without
    results.csv is one line and exit status 2."""
    mod = _script("compare_runs")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out
    assert mod.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"compare_runs: no results.csv in {tmp_path} (a finished analyze --out dir?)"
    )


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_gpu_session_repro_b_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """The script's documented smoke test, on its most involved phase: train ResNet-20, analyze
    it, analyze it again with --bn keep, put both summaries into $OUT/summary.txt and the logs
    into $OUT/logs.tgz. `bash -n` catches syntax only; a wrong argument or path in a step would
    cost a lent GPU machine's minutes, so the steps run here for real (64 samples, 1 epoch: a
    model at chance, whose warning must reach the summary, not only the stderr log)."""
    import os
    import subprocess
    import sys
    import tarfile

    env = {**os.environ, "OUT": str(tmp_path), "SKIP_BUILD": "1", "DEVICE": "cpu",
           "MAX_SAMPLES": "64", "RESNET_EPOCHS": "1", "TMPDIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), "repro-b"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("train-resnet20", "analyze-resnet20", "analyze-resnet20-bnkeep"):
        assert any(ln.startswith(f"{step}: ") and ln.endswith(", exit 0")
                   for ln in summary.splitlines()), (step, summary)
    assert "== repro/resnet20/summary.txt" in summary and "rerandom mean" in summary
    bnkeep = summary.split("== repro/resnet20-bnkeep/summary.txt")[1].split("== repro/")[0]
    assert "23 variants × 64 samples" in bnkeep  # 11 blocks × τ ∈ {0, 1} + the baseline
    for section in summary.split("== repro/")[1:]:  # each analysis: its warnings, as counted
        lines = section.splitlines()
        count = next((int(ln.split()[0]) for ln in lines if "(stderr, above; also in run.json)"
                      in ln), 0)
        warned = [ln for ln in lines if ln.startswith("layerfast: warning: ")]
        assert count >= 1 and len(warned) == count, section  # one SGD step: at chance
    with tarfile.open(tmp_path / "logs.tgz") as tar:
        names = tar.getnames()
        runs = {d: json.load(tar.extractfile(f"./repro/{d}/analysis/run.json"))
                for d in ("resnet20", "resnet20-bnkeep")}
    assert "./repro/resnet20/analysis/results.csv" in names
    # the variant count is the same under either policy: the runs must say which one they used
    assert runs["resnet20"]["bn"] == "with-layer" and runs["resnet20-bnkeep"]["bn"] == "keep"
    assert runs["resnet20-bnkeep"]["granularity"] == "block"
    assert "./repro/resnet20/manifest.json" in names

"""scripts/gpu_session.sh rehearsed on the CPU under the device's software (Python 3.12, torch
2.11): what would have cost the lent GPU machine's minutes, or lost its figures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"

# pytest-benchmark 5's output as the session's ops-bench step writes it (-q, median and IQR): a
# group's title has dashes around it only when it is narrower than the table below it, and a
# test without a group gets "benchmark: N tests".
BENCH_OPS_LOG = """\
...................                                                      [100%]
Wrote benchmark data in: /tmp/x/ops-benchmark.json

-------------------------- benchmark: 3 tests -------------------------
Name (time in ms)                   Median                IQR
-----------------------------------------------------------------------
test_cpu_bottleneck[fold]         427.8993 (1.19)     58.5942 (4.19)
-----------------------------------------------------------------------

 benchmark 'BN+add+ReLU K=7 C=64 (64, 448, 56, 56) bfloat16 cuda': 2 tests
Name (time in us)                     Median               IQR
--------------------------------------------------------------------
test_affine_relu_layerfast[cuda]     95.1200 (1.0)      1.2000 (1.0)
test_affine_relu_torch_ops[cuda]    310.4000 (3.26)     2.1000 (1.75)
--------------------------------------------------------------------

------------------- benchmark 'swap resnet50 cuda': 2 tests ------------------
Name (time in us)                          Median               IQR
------------------------------------------------------------------------------
test_swap_foreach_copy[resnet50-cuda]     161.8937 (2.73)     8.2363 (1.34)
test_swap_layerfast[resnet50-cuda]         59.2809 (1.0)      6.1520 (1.0)
------------------------------------------------------------------------------

Legend:
  Outliers: 1 Standard Deviation from Mean; 1.5 IQR (InterQuartile Range) from 1st Quartile.
=========================== short test summary info ============================
FAILED benchmarks/bench_ops.py::test_score_layerfast[C10-fp32-cuda] - RuntimeError: boom
1 failed, 18 passed, 19 deselected in 36.96s
"""


def test_the_summary_keeps_every_op_benchmark_group_title_and_the_bench_steps_counts(
        tmp_path: Path) -> None:
    """summary() kept the bench rows by `grep -E '^(Name|test_|-- )'`: no title starts with "-- "
    (pytest-benchmark draws a run of dashes, or none when the title is wider than the table), so
    every group's title was dropped and with it what a row measured (the affine_relu rows say
    only "[cuda]": the shape and dtype are in the title); the bench step's pass/fail count and
    FAILED lines were not in the summary either."""
    text = SCRIPT.read_text()
    func = text[text.index("summary() {"):text.index("trap summary EXIT")]
    log, out = tmp_path / "log", tmp_path / "out"
    log.mkdir()
    out.mkdir()
    (log / "bench-ops.log").write_text(BENCH_OPS_LOG)
    (log / "cuda-ops-tests.log").write_text("== 163 passed, 342 deselected in 9.37s ==\n")
    env = {**os.environ, "LOG": str(log), "OUT": str(out), "phase": "test"}
    subprocess.run(["bash", "-c", f"{func}\nsummary"], env=env, cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=60)
    summary = (out / "summary.txt").read_text()
    assert "cuda-ops-tests.log: == 163 passed" in summary
    assert "bench-ops.log: 1 failed, 18 passed, 19 deselected in 36.96s" in summary
    assert "FAILED benchmarks/bench_ops.py::test_score_layerfast[C10-fp32-cuda]" in summary
    for line in ("-------------------------- benchmark: 3 tests ---",
                 " benchmark 'BN+add+ReLU K=7 C=64 (64, 448, 56, 56) bfloat16 cuda': 2 tests",
                 "------------------- benchmark 'swap resnet50 cuda': 2 tests ---",
                 "Name (time in us)", "test_affine_relu_layerfast[cuda]     95.1200",
                 "test_swap_layerfast[resnet50-cuda]", "test_cpu_bottleneck[fold]"):
        assert line in summary, (line, summary)
    assert "Wrote benchmark data" not in summary and "Legend" not in summary


def test_the_test_phase_runs_only_the_cpu_cases_in_its_cpu_tests_step() -> None:
    """`test`'s cpu-tests step (the engine and op files "on the CPU under the device's torch")
    ran those files whole: on the device that ran their CUDA cases a second time (the op tests'
    ~160 of them ran in cuda-ops-tests already), inside a 120 s cap."""
    text = SCRIPT.read_text()
    line = next(ln for ln in text.splitlines() if "step cpu-tests " in ln)
    assert '-m "not cuda"' in line, line

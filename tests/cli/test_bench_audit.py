"""Audit of `layerfast bench` (layerfast/bench.py): is the comparison with the naive loop fair,
and does the output say what was measured? No test here depends on how long anything took."""

from __future__ import annotations

import argparse

import pytest

import layerfast.bench as bench
import layerfast.engine.flops as flops


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(["--device", "cpu", "--data", "digits", "--max-samples", "32", *argv])


@pytest.fixture
def quick(monkeypatch):
    """`bench.run` without the half-second GEMM that measures the rate (any rate will do)."""
    monkeypatch.setattr(flops, "measure_rate", lambda device, precision, seconds=0.5: 1e10)


def test_naive_loop_is_timed_on_a_fair_sample(monkeypatch, quick) -> None:
    """3 units × (5 reinit + 2 rerandom) + baseline = 22 variants, 4 timed: evenly spaced
    indices (0, 7, 14, 21) hit the same slot of every unit's 7, so the naive loop was timed on
    the baseline and three `rerandom seed 2` variants, never one read from a checkpoint file
    (ResNet-50 block granularity, 127 variants and 4 timed, is the same). The sample must hold
    both kinds and reach the first and the last unit, and the output must name it."""
    timed: list = []

    def fake_naive(model, variants, src, device, batch_size, warmup=False):
        timed.extend(variants)
        return 0.0, 1.0, [0] * len(variants)  # counts: this test is about which are timed

    monkeypatch.setattr(bench, "naive_pass", fake_naive)
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "4", "--no-prefix-only"))
    assert out["variants"] == 22 and out["units"] == 3
    assert len(timed) == 4 and out["naive_timed_variants"] == 4 and out["naive_scaled"]
    kinds = {v.kind for v in timed}
    assert {"reinit", "rerandom"} <= kinds
    units = [v.unit for v in timed if v.unit != "*"]
    assert units[0] == "fc1" and units[-1] == "fc3"
    assert out["naive_timed"] == [v.label for v in timed]
    assert out["seconds"]["naive"] == pytest.approx(22 / 4)


def test_naive_sample_spreads_over_kinds_and_units() -> None:
    from types import SimpleNamespace as V

    def variants(units: int) -> list:
        per = ["reinit"] * 5 + ["rerandom"] * 2
        return [V(kind="baseline", unit="*")] + [
            V(kind=k, unit=u) for u in range(units) for k in per
        ]

    for units, k in [(18, 4), (54, 4), (3, 4), (4, 8), (11, 8), (18, 2), (18, 3)]:
        vs = variants(units)
        idx = bench.naive_sample(vs, k)
        assert len(idx) == len(set(idx)) == k and idx == sorted(idx)
        picked = [vs[i] for i in idx]
        assert {"reinit", "rerandom"} <= {v.kind for v in picked}, (units, k)
        if k >= 3:
            assert picked[0].unit == 0 and max(v.unit for v in picked) == units - 1, (units, k)
    vs = variants(3)
    assert bench.naive_sample(vs, len(vs)) == list(range(len(vs)))
    assert len(bench.naive_sample(vs, 1)) == 1


def test_channels_last_is_reported_as_the_pass_ran(monkeypatch, quick) -> None:
    """`Evaluator.run` turns channels_last off when the model cannot run in it (layout auto:
    on CUDA with bf16). bench recorded `ev.channels_last` before the pass, so the output said
    channels_last for a pass that ran contiguous. Simulated on the CPU: the layout rule says
    channels_last, the probe says the model cannot."""
    import layerfast.engine.evaluator as evaluator

    def settle(self, x):
        self._layout_checked = True
        self.channels_last = False
        return False

    monkeypatch.setattr(evaluator, "channels_last", lambda *a, **k: True)
    monkeypatch.setattr(evaluator.Evaluator, "settle_layout", settle)
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2"))
    assert out["channels_last"] is False
    assert out["layerfast_plan"]["channels_last"] is False
    assert out["fanout_plan"]["channels_last"] is False


def test_the_timed_seconds_are_the_phases_plus_the_probes(quick) -> None:
    """The pass's clock (`timings["total"]`) starts after `Evaluator.run` has planned B and
    checked the layout (a trace, the plan, probe forwards), which the timed seconds include:
    the phases never added up to the row's seconds, and nothing said where the rest went."""
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2"))
    for mode in ("layerfast", "fanout"):
        ph, probes = out[f"{mode}_phases"], out[f"{mode}_probes"]
        assert probes >= 0
        assert ph["total"] + probes == pytest.approx(out["seconds"][mode], abs=3e-4)
        parts = sum(v for k, v in ph.items() if k != "total")
        assert parts <= ph["total"] + 1e-3


def _table_rows():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_table.py"
    spec = importlib.util.spec_from_file_location("bench_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.rows


def test_the_gpu_table_says_when_the_naive_time_is_scaled(quick) -> None:
    """`naive s` of a run with --naive-variants is k variants' time times V/k; the table
    printed it like a measurement. It must say so, and the ratio must be the JSON's."""
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "3", "--no-prefix-only"))
    lines = _table_rows()(out, "fcn")
    assert "timed on 3 of 22 variants, scaled x7.3" in "\n".join(lines)
    assert f"{out['speedup_vs_naive']['layerfast']:8.1f}" in lines[0]
    full = bench.run(_args("--arch", "fcn2x16", "--no-prefix-only"))
    assert not any("scaled" in ln for ln in _table_rows()(full, "fcn"))


def test_the_text_says_the_naive_batch_and_a_small_floor(monkeypatch, quick, capsys) -> None:
    """The floor of a small run printed as `= 0.000 s` (3 decimals), and the naive loop's
    batch size (256 unless --batch-size; layerfast plans its own) was stated nowhere."""
    monkeypatch.setattr(flops, "measure_rate", lambda device, precision, seconds=0.5: 1e12)
    assert bench.main(_args("--arch", "fcn2x16", "--no-prefix-only")) == 0
    text = capsys.readouterr().out
    floor = next(ln for ln in text.splitlines() if ln.startswith("compute floor:"))
    secs = float(floor.split(") = ")[1].split(" s ")[0])
    assert secs > 0
    assert "DataLoader pass at B=32, all the samples (256 asked)" in text  # 32 samples (s22)
    out = bench.run(_args("--arch", "fcn2x16", "--no-prefix-only", "--batch-size", "64"))
    assert out["naive_batch_size"] == 64


def test_engine_benchmark_keeps_how_the_naive_time_was_scaled(monkeypatch, quick) -> None:
    """benchmarks/bench_engine.py stored `naive_scaled` but not k (nor which variants), so a
    stored naive figure scaled ×V/k could not be told from a measurement of all V."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_engine.py"
    spec = importlib.util.spec_from_file_location("bench_engine", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Benchmark:
        extra_info: dict = {}

        def pedantic(self, fn, rounds, iterations):
            fn()

    b = Benchmark()
    mod._bench(b, "--arch", "fcn2x16", "--data", "digits", "--max-samples", "32", "--device",
               "cpu", "--naive-variants", "3", "--no-prefix-only")
    info = b.extra_info
    assert info["naive_scaled"] and info["naive_timed_variants"] == 3
    assert len(info["naive_timed"]) == 3 and info["naive_batch_size"] == 256
    assert "layerfast_probes" in info and "layerfast_phases" in info


def test_naive_one_time_costs_are_not_scaled_by_v_over_k(monkeypatch, quick) -> None:
    """Timed on k of V variants, the naive loop's time is scaled by V/k; its first batch (fp32
    kernels loaded and chosen, allocator growth: layerfast ran before it, in bf16 on CUDA) was
    inside the timed sample and so counted V/k times. Now one batch, timed apart, runs
    first, outside the figure (as every mode's warm-up, session 22). Checked by counting the
    model's own forward calls inside `naive_pass`."""
    import layerfast.models as models

    calls = {"n": 0}
    build = models.build_model

    def counted(*a, **k):
        model, spec = build(*a, **k)
        model.register_forward_pre_hook(lambda m, args: calls.__setitem__("n", calls["n"] + 1))
        return model, spec

    naive = bench.naive_pass

    def counting_naive(*a, **k):
        # the model's own forward, as naive_pass calls it (its warm-up and its timed loop are
        # two calls since session 22: every approach warms up before any is timed)
        calls["n"] = 0
        result = naive(*a, **k)
        calls["naive"] = calls.get("naive", 0) + calls["n"]
        return result

    monkeypatch.setattr(models, "build_model", counted)
    monkeypatch.setattr(bench, "naive_pass", counting_naive)
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2", "--no-prefix-only"))
    # 32 samples, one batch of 256: one warm-up batch + one batch per timed variant
    assert calls["naive"] == 1 + 2
    assert out["naive_warmup_s"] > 0
    calls["naive"] = 0
    full = bench.run(_args("--arch", "fcn2x16", "--no-prefix-only"))
    assert full["naive_warmup_s"] > 0 and calls["naive"] == 1 + 22  # unscaled: warmed too


def test_floor_rate_is_not_below_what_the_model_itself_reaches(monkeypatch) -> None:
    """On the 2 CPU cores a 1024² GEMM ran at 53 GFLOP/s while ResNet-20's own forward ran its
    convolutions at 77: the floor at the GEMM's rate came out above layerfast's time
    ("layerfast at 0.6× the floor"). The rate is now the best of the GEMM's and the model's
    forward's at the pass's batch size. Here the GEMM is made slow; the floor must not be."""
    monkeypatch.setattr(flops, "measure_rate", lambda device, precision, seconds=0.5: 1.0)
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2", "--no-prefix-only"))
    f = out["floor"]
    assert f["rate_tflops_gemm"] == 1e-12
    assert f["rate_tflops_forward"] > 1e-12
    assert f["rate_tflops_measured"] == max(f["rate_tflops_gemm"], f["rate_tflops_forward"])
    needed = f["gflop_per_sample"]["needed"] * 1e9 * out["n"]
    assert f["seconds_measured_rate"] == pytest.approx(needed / (f["rate_tflops_measured"] * 1e12))


BRANCHY = """
import torch.nn as nn


def branchy(num_classes=10, in_shape=None):
    return Branchy(num_classes)


class Branchy(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.l1, self.l2 = nn.Linear(64, 8), nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.l1(x.flatten(1))
        if h.sum() > 1e9:  # data-dependent: fx cannot trace it
            h = h * 0
        return self.l2(h.relu())
"""


@pytest.mark.parametrize("traceable", [True, False])
def test_a_model_benched_untraced_is_a_warning_kept_in_the_json(
    tmp_path, monkeypatch, capsys, quick, traceable
) -> None:
    """A model fx cannot trace runs every variant's whole forward: the "layerfast" figure then
    times the naive loop against itself. That showed only as the plan's `untraced`; it is now
    a warning on stderr and in the JSON's `warnings`, as in analyze's run.json."""
    (tmp_path / "branchy_bench.py").write_text(BRANCHY)
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = "fcn2x16" if traceable else "branchy_bench:branchy"
    out = bench.run(_args("--arch", arch, "--naive-variants", "2", "--no-prefix-only"))
    err = capsys.readouterr().err
    assert bool(out["layerfast_plan"]["untraced"]) is not traceable
    mine = [w for w in out["warnings"] if w.startswith("the model ran untraced (")]
    assert len(mine) == (not traceable) and all(f"layerfast: warning: {w}" in err for w in mine)
    flagged = [ln for ln in _table_rows()(out, "m")
               if ln.startswith("    WARNING: the model ran untraced")]
    assert len(flagged) == (not traceable)  # the GPU session's table shows it too
    if not traceable:  # the text's last line counts them: the table is what gets copied
        monkeypatch.setattr(bench, "run", lambda args: out)
        bench.main(_args("--arch", arch))
        last = capsys.readouterr().out.rstrip().splitlines()[-1]
        assert last == "1 warning (stderr, above; also in --json's warnings)"


def test_no_room_for_the_synthetic_checkpoints_is_one_clear_error(monkeypatch, quick) -> None:
    """bench writes its synthetic checkpoints under TMPDIR; a full disk there was torch's
    "inline_container.cc ... unexpected pos" traceback. It is one line naming TMPDIR now."""
    import errno
    import os

    import layerfast.checkpoints.save as save
    from layerfast.errors import LayerfastError

    def full(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(save, "save_atomic", full)
    with pytest.raises(LayerfastError, match=r"cannot write bench's synthetic checkpoints in "
                       r"\S+layerfast-bench-\S+ \(No space left on device\): set TMPDIR"):
        bench.run(_args("--arch", "fcn2x16"))


def test_the_results_are_checked_against_the_naive_loop(monkeypatch, quick, capsys) -> None:
    """The naive loop's correct@1 counts were computed and thrown away: a speed figure for an
    engine that measured something else would have gone out unremarked. Both approaches' counts
    on the variants the loop ran are compared; beyond the bound it is a warning in the JSON."""
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "3"))
    agree = out["agreement_with_naive"]
    assert agree["variants"] == 3 and agree["bound"] == 1.0
    assert agree["max_abs_diff_correct1"] == {"layerfast": 0.0, "fanout": 0.0}  # CPU fp32
    assert out["warnings"] == []
    real = bench.naive_pass

    def off_by_two(*a, **k):
        warm, loop, counts = real(*a, **k)
        return warm, loop, [c + 2 for c in counts]

    monkeypatch.setattr(bench, "naive_pass", off_by_two)
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "3"))
    assert out["agreement_with_naive"]["max_abs_diff_correct1"]["layerfast"] == 2.0
    assert out["warnings"] == ["correct@1 differs from the naive loop's by up to 2 of 32 samples "
                               "on the 3 variants both ran (fp32): the figures may not compare "
                               "like with like"]
    monkeypatch.setattr(bench, "run", lambda args: out)
    bench.main(_args("--arch", "fcn2x16"))
    text = capsys.readouterr().out
    assert "results: correct@1 on the 3 variants the naive loop ran differs from its count by " \
           "at most 2 of 32 samples" in text


def test_a_mode_faster_than_the_floor_is_a_warning(monkeypatch) -> None:
    """The floor's rate is measured in the same run; on a loaded machine it came out low and a
    mode ran "faster than the floor" while the text still said "at 1.6× the floor"."""
    real = flops.floor_report

    def slow_rate(*a, **k):  # as if the rate had been measured 1e6× too low
        f = real(*a, **k)
        return {**f, "seconds_measured_rate": f["seconds_measured_rate"] * 1e6}

    monkeypatch.setattr(flops, "measure_rate", lambda device, precision, seconds=0.5: 1e10)
    monkeypatch.setattr(flops, "floor_report", slow_rate)
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2", "--no-prefix-only"))
    assert out["times_floor"]["layerfast"] < 1
    mine = [w for w in out["warnings"] if "the compute floor" in w]
    assert len(mine) == 1 and "so the floor is no lower bound in this run" in mine[0]


def test_each_approach_says_when_it_starts(quick, capsys) -> None:
    """A ResNet bench ran for minutes with nothing on stdout or stderr until the table."""
    bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("layerfast bench:")]
    assert lines == ["layerfast bench: warming up each approach on one batch (untimed) ...",
                     "layerfast bench: timing layerfast on 22 variants × 32 samples ...",
                     "layerfast bench: timing fanout on 22 variants × 32 samples ...",
                     "layerfast bench: timing the naive loop on 2 of 22 variants × 32 samples ..."]


def test_the_agreement_bound_is_at_least_one_sample() -> None:
    """0.5% of 64 samples is a third of one: a single near-tie flip in bf16 warned."""
    import torch

    out = bench._agreement({"layerfast": torch.tensor([10.0])}, [0], [11], 64, "bf16",
                           torch.device("cuda"))
    assert out["bound"] == 1.0 and out["max_abs_diff_correct1"] == {"layerfast": 1.0}


def test_a_model_with_non_finite_logits_is_a_warning(tmp_path, monkeypatch, quick) -> None:
    """analyze refuses a final model with NaN/Inf logits; bench timed it and said nothing."""
    (tmp_path / "inf_bench.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Inf(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1)) * float('inf')\n"
        "def make(num_classes, in_shape):\n"
        "    return Inf()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = bench.run(_args("--arch", "inf_bench:make", "--naive-variants", "2", "--no-prefix-only"))
    assert "the final model gives NaN or Inf logits on this data: the figures time a model whose "\
           "errors mean nothing (analyze refuses it)" in out["warnings"]

"""Review of `layerfast bench` (layerfast/bench.py) and its figures: defects found by experiment
on the CPU, each pinned here. No test depends on how long anything took."""

from __future__ import annotations

import layerfast.bench as bench
import layerfast.engine.flops as flops
from tests.cli import test_bench_audit as _audit

# the audit's helpers: its argument parser, its `quick` fixture (no half-second GEMM) and its
# loader of scripts/bench_table.py's rows
_args, quick, _table_rows = _audit._args, _audit.quick, _audit._table_rows


def test_the_floor_forward_runs_at_the_batch_the_pass_ran(monkeypatch, quick) -> None:
    """The model's own forward rate (the floor's) was measured on `--batch-size` zero samples
    even when the data held fewer: `--batch-size 1000000000000 --max-samples 40` timed both
    approaches and then died in `forward_rate` with torch's "DefaultCPUAllocator: can't
    allocate memory: you tried to allocate 256000000000000 bytes" traceback (exit 1, nothing
    printed), and a smaller excess measured the rate at a batch no pass had run. The pass's
    batches hold at most n samples; so must the floor's forward."""
    seen: list[int] = []
    real = flops.forward_rate

    def recording(model, sample_shape, device, precision, batch_size, *a, **k):
        seen.append(batch_size)
        return real(model, sample_shape, device, precision, min(batch_size, 64), *a,
                    seconds=0.01)

    monkeypatch.setattr(flops, "forward_rate", recording)
    out = bench.run(_args("--arch", "fcn2x16", "--batch-size", str(10**12), "--naive-variants",
                          "2", "--no-prefix-only"))
    assert seen == [32]
    assert out["floor"]["rate_tflops_forward"] > 0


ELEMENTWISE = """
import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(10))

    def reset_parameters(self):
        nn.init.normal_(self.w)

    def forward(self, x):
        return x.flatten(1)[:, :10] * self.w


def make(num_classes, in_shape):
    return nn.Sequential(Scale())
"""


def test_a_model_without_matrix_flops_has_no_floor_not_a_crash(tmp_path, monkeypatch, quick,
                                                               capsys) -> None:
    """The floor counts matrix FLOPs only; a model without a conv or matmul (a learned
    elementwise scale) needs 0 of them, and `times_floor` divided each time by 0 s: a
    ZeroDivisionError traceback (exit 1) after every approach had been timed, nothing printed.
    Its ×floor is "none" (null in the JSON), said as such in the text and in the GPU table."""
    (tmp_path / "elementwise_bench.py").write_text(ELEMENTWISE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = bench.run(_args("--arch", "elementwise_bench:make", "--naive-variants", "2"))
    assert out["floor"]["seconds_measured_rate"] == 0
    assert out["times_floor"] == {"layerfast": None, "fanout": None, "naive": None}
    assert not [w for w in out["warnings"] if "compute floor" in w]
    monkeypatch.setattr(bench, "run", lambda args: out)
    assert bench.main(_args()) == 0
    floor = next(ln for ln in capsys.readouterr().out.splitlines()
                 if ln.startswith("compute floor:"))
    assert floor.endswith("no matrix FLOPs to floor layerfast's time")
    lines = _table_rows()(out, "elementwise")  # the GPU session's table kept the row
    assert lines[0].startswith("elementwise") and lines[0].split()[-2] == "nan"


def test_a_warning_while_opening_the_data_is_kept_in_the_json(monkeypatch, quick) -> None:
    """`open_data` can warn (a .beton whose sidecar says it holds the train split, used as the
    test split: FFCV, not installed here, so simulated), but bench opened the data before its
    `collect_warnings` block: the warning reached stderr only, not the JSON's `warnings`, which
    is what a figure is judged by later (decisions.md: bench keeps its warnings as train's
    manifest and analyze's run.json do)."""
    import layerfast.data as data
    from layerfast.errors import warn

    real = data.open_data

    def warning_open(*a, **k):
        warn("data.beton holds the train split of 'x' (its sidecar says so), used here as the "
             "test split")
        return real(*a, **k)

    monkeypatch.setattr(data, "open_data", warning_open)
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2", "--no-prefix-only"))
    assert any(w.startswith("data.beton holds the train split") for w in out["warnings"])


def test_a_warning_each_timed_mode_repeats_is_kept_once(quick, capsys) -> None:
    """Each timed mode (and --profile's pass) builds its own Evaluator, and one that warns on
    construction warned once per mode: `--precision tf32 --device cpu` put the same "tf32 is a
    CUDA mode" message twice in the JSON's `warnings`, and the text's last line counted
    "2 warnings" for one."""
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2", "--precision", "tf32"))
    tf32 = [w for w in out["warnings"] if w.startswith("precision tf32")]
    assert len(tf32) == 1, out["warnings"]


def test_profile_samples_without_profile_is_said(quick) -> None:
    """`--profile-samples N` sizes the --profile pass; without --profile nothing is profiled
    and the option did nothing, silently (decisions.md: options that would do nothing are
    said, as bench's --glue is when no timed mode fans out)."""
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2", "--no-prefix-only",
                          "--profile-samples", "64"))
    assert "profile" not in out
    assert "--profile-samples 64 has no effect without --profile" in out["warnings"]
    out = bench.run(_args("--arch", "fcn2x16", "--naive-variants", "2", "--no-prefix-only"))
    assert out["warnings"] == []

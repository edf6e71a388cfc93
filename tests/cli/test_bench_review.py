"""Review of `layerfast bench` (layerfast/bench.py) and its figures: defects found by experiment
on the CPU, each pinned here. No test depends on how long anything took."""

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

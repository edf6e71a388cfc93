"""The compute floor of a model built in bfloat16 (review s23, the CPU bf16 mode). Such a model
runs its own bfloat16 forward in every mode (`precision.for_model` records it as fp32), so its
matmuls are bfloat16 ones; the floor's GEMM was timed in float32 for it, several times slower
on a CPU with AVX512-BF16 or AMX: a floor too high, which layerfast looked closer to than it was
(`layerfast bench --arch mynet:bf16_factory` said 36x the floor, 189x at the bf16 GEMM's rate:
0.056 against 0.342 TFLOP/s on this machine's 2 cores)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerfast.engine.flops as flops
from layerfast.engine.graph import Program
from layerfast.engine.plan import make_plan


@pytest.mark.parametrize(("dtype", "gemm"), [(torch.bfloat16, "bf16"), (torch.float32, "fp32"),
                                             (torch.float16, "fp32")])
def test_the_floor_gemm_runs_in_a_bf16_models_dtype(dtype, gemm, monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(flops, "measure_rate",
                        lambda device, precision, seconds=0.5: asked.append(precision) or 1e10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    keysets = [{"1.weight"}, {"3.weight"}]
    plan = make_plan(Program(model), keysets, False, 1)
    out = flops.floor_report(model, plan, (1, 8, 8), 100, torch.device("cpu"), "fp32",
                             keysets=keysets)
    assert asked == [gemm]
    assert out["rate_tflops_gemm"] == 1e10 / 1e12

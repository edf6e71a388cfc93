"""The compute floor of a model built in float16, on CUDA (session 24). Its matmuls run on
tensor cores at the bf16 rate (989 TFLOP/s on an H100 against 67 in fp32), but the floor timed
an fp32 GEMM and took the fp32 datasheet peak: a "floor" some 15x above what the pass needs,
which a pass could beat, and that made layerfast look close to its floor. On the CPU float16
keeps the fp32 GEMM (no float16 units there: fp32 is the faster rate, so still a floor).

No GPU runs here: the CUDA branch is driven with `measure_rate` and `datasheet_rate` stubbed,
which is all it decides (which GEMM to time, which datasheet column to read)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerfast.engine.flops as flops
from layerfast.engine.graph import Program
from layerfast.engine.plan import make_plan


def _floor_on(device: str, dtype: torch.dtype, precision: str,
              monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str], dict]:
    gemm: list[str] = []
    sheet: list[str] = []
    monkeypatch.setattr(flops, "measure_rate",
                        lambda device, precision, seconds=0.5: gemm.append(precision) or 1e12)
    monkeypatch.setattr(flops, "datasheet_rate",
                        lambda device, precision: sheet.append(precision) or 5e14)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    keysets = [{"1.weight"}, {"3.weight"}]
    plan = make_plan(Program(model), keysets, False, 1)
    out = flops.floor_report(model, plan, (1, 8, 8), 100, torch.device(device), precision,
                             keysets=keysets)
    return gemm, sheet, out


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_a_float16_model_on_cuda_is_floored_at_the_float16_rate(precision, monkeypatch):
    gemm, sheet, out = _floor_on("cuda", torch.float16, precision, monkeypatch)
    assert gemm == sheet == ["fp16"]
    assert out["rate_tflops_datasheet"] == 500.0


@pytest.mark.parametrize(("dtype", "math"), [(torch.float16, "fp32"), (torch.float64, "fp32"),
                                             (torch.bfloat16, "bf16")])
def test_the_cpu_and_other_dtypes_keep_their_gemm(dtype, math, monkeypatch):
    gemm, _, _ = _floor_on("cpu", dtype, "fp32", monkeypatch)
    assert gemm == [math]


def test_the_float16_gemm_and_datasheet_column_exist():
    """The GEMM `measure_rate("fp16")` times is a float16 one, and every known GPU has an
    fp16 peak equal to its bf16 one (dense tensor-core figures, NVIDIA's datasheets)."""
    seen: list[torch.dtype] = []
    real = torch.randn

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "randn", spy)
        assert flops.measure_rate(torch.device("cpu"), "fp16", seconds=0.0) > 0
    assert seen == [torch.float16, torch.float16]
    for _, rates in flops.DATASHEET_TFLOPS:
        assert rates["fp16"] == rates["bf16"]

"""The compute floor (issue 4): the matrix FLOPs a pass cannot avoid, and the time they take.

A pass must run the baseline once per sample and, for every variant, the suffix from the cut it
starts at; a variant equal to the baseline costs nothing. Anything above that — glue, memory
traffic, launches, idle time — is overhead, so `seconds(flops) / rate` is a floor no
implementation of the same plan can beat. We count FLOPs with `torch.utils.flop_counter`
(matmul, convolution and attention, 2 FLOPs per multiply-add) step by step along the engine's
own `Program`, so the suffix of each cut is exactly what the engine runs. The rate is measured
in the same run (a large GEMM at the pass's precision) and, for known GPUs, also taken from the
datasheet; BENCHMARKS.md reports both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from layerfast.engine.graph import Program, no_inplace_modules
from layerfast.engine.plan import Plan

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by precision.
# Matched against torch.cuda.get_device_name in this order (the SXM H100 is the plain "H100").
DATASHEET_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


@dataclass
class PassFlops:
    """FLOPs per sample of one pass over all variants, and of the naive loop's."""

    forward: int  # one full forward (the baseline)
    suffixes: int  # the variants' suffixes, summed
    naive: int  # one full forward per variant (what the naive loop computes)

    @property
    def needed(self) -> int:
        return self.forward + self.suffixes


def cumulative_flops(prog: Program, x: torch.Tensor) -> list[int]:
    """`out[i]`: matrix FLOPs of steps 0..i of `prog` on input `x` (out[-1] is the forward)."""
    done = [0] * len(prog.steps)
    with FlopCounterMode(display=False) as counter:

        def mark(i: int) -> None:
            done[i] = counter.get_total_flops()

        prog.run(x, 0, after_step=mark)
        total = counter.get_total_flops()
    for i in range(1, len(done)):  # steps not run (input, output) carry the count forward
        done[i] = max(done[i], done[i - 1])
    done[-1] = total
    return done


def pass_flops(model: nn.Module, plan: Plan, sample_shape: Sequence[int]) -> PassFlops:
    """FLOPs per sample for `plan` (an `Evaluator`'s plan for `model`), counted on the CPU.

    The model is traced afresh; `Program` is deterministic, so its step indices are the plan's.
    """
    was_training = model.training
    p0 = next(iter(model.parameters()), None)
    dtype = p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32
    device = p0.device if p0 is not None else torch.device("cpu")
    model.eval()
    try:
        with no_inplace_modules(model), torch.inference_mode():
            prog = Program(model)
            x = torch.zeros((2, *sample_shape), dtype=dtype, device=device)
            cum = cumulative_flops(prog, x)
    finally:
        model.train(was_training)
    forward = cum[-1] // 2
    suffixes = sum(
        len(g.members) * (cum[-1] - (cum[g.start] if g.start else 0)) // 2 for g in plan.groups
    )
    n_variants = sum(len(g.members) for g in plan.groups) + len(plan.same_as_baseline)
    return PassFlops(forward, suffixes, forward * n_variants)


def datasheet_rate(device: torch.device, precision: str) -> float | None:
    """FLOP/s from the datasheet for a known GPU at `precision`, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, rates in DATASHEET_TFLOPS:
        if key in name:
            return rates.get(precision, rates["fp32"]) * 1e12
    return None


def measure_rate(device: torch.device, precision: str, seconds: float = 0.5) -> float:
    """FLOP/s of a large square GEMM at the pass's precision on `device`: the best a matrix
    unit here does in practice (bf16 on CUDA; tf32 as `torch.backends` allows; else fp32)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" and cuda else torch.float32
    n = 8192 if cuda else 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for _ in range(3):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            for _ in range(5):
                a @ b
            reps += 5
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 * reps / elapsed


def floor_report(
    model: nn.Module,
    plan: Plan,
    sample_shape: Sequence[int],
    n_samples: int,
    device: torch.device,
    precision: str,
) -> dict:
    """The floor for a pass of `n_samples`: FLOPs, measured and datasheet rates, seconds."""
    f = pass_flops(model, plan, sample_shape)
    measured = measure_rate(device, precision)
    sheet = datasheet_rate(device, precision)
    total = f.needed * n_samples
    return {
        "gflop_per_sample": {
            "forward": f.forward / 1e9,
            "suffixes": f.suffixes / 1e9,
            "needed": f.needed / 1e9,
            "naive": f.naive / 1e9,
        },
        "tflop": total / 1e12,
        "rate_tflops_measured": measured / 1e12,
        "rate_tflops_datasheet": sheet / 1e12 if sheet else None,
        "seconds_measured_rate": total / measured,
        "seconds_datasheet_rate": total / sheet if sheet else None,
        "what": "matrix FLOPs of the baseline forward plus each variant's suffix, "
        "at a large GEMM's rate in the pass's precision (measured here; datasheet for known GPUs)",
    }

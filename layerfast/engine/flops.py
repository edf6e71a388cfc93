"""The compute floor (issue 4): the matrix FLOPs a pass cannot avoid, and the time they take.

A pass must run the baseline once per sample and, for every variant, every step whose value
depends on one of the variant's changed tensors (its *cone*: the steps reading them and all
steps downstream of those); a variant equal to the baseline costs nothing. Steps of a suffix
outside the cone compute the baseline's own values: the fan-out computes them once for a whole
group, and a conv left alone inside a unit (a downsample, a block's first conv when only its
second changed) need not be run again at all. Anything above the cone — glue, memory traffic,
launches, idle time, recomputed baseline values — is overhead, so `seconds(flops) / rate` is a
floor no implementation can beat. `suffixes_from_cut` is what running each variant's suffix
whole from its start cut costs (the swap path's work, never less than the cone).

We count FLOPs with `torch.utils.flop_counter` (matmul, convolution and attention, 2 FLOPs per
multiply-add; BatchNorm, activations, pooling, additions and copies count 0) step by step along
the engine's own `Program`, so cuts and cones are the engine's. The rate is measured in the same
run (a large GEMM at the pass's precision) and, for known GPUs, also taken from the datasheet;
BENCHMARKS.md reports both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from layerfast.engine.graph import Program, Ref, no_inplace_modules, refs_in
from layerfast.engine.plan import Plan
from layerfast.engine.precision import model_dtype, precision_context, tf32_allowed

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by precision.
# Matched against torch.cuda.get_device_name in this order (the SXM H100 is the plain "H100").
DATASHEET_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


@dataclass
class PassFlops:
    """FLOPs per sample of one pass over all variants, and of the naive loop's."""

    forward: int  # one full forward (the baseline)
    suffixes: int  # the variants' cones (the steps that depend on a changed tensor), summed
    naive: int  # one full forward per variant (what the naive loop computes)
    suffixes_from_cut: int = 0  # each variant's whole suffix from its start cut, summed

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


def cone(prog: Program, keys: Iterable[str]) -> set[int]:
    """Indices of the steps whose value depends on any of `keys`: the steps that read one, and
    every step that reads a value computed from one (or a value written in place from one)."""
    keys = {prog.canonical_key(k) for k in keys}
    tainted: set[int] = set()
    for s in prog.steps:
        if s.keys & keys or any(r in tainted for r in refs_in(s.args) + refs_in(s.kwargs)):
            tainted.add(s.index)
            if not prog.is_inplace(s):
                continue
            target = prog.mutated(s)
            if isinstance(target, Ref):  # `x += f(changed)`: later readers of x see the change
                tainted.add(target.index)
            elif target is None:  # it may write into any of its arguments
                tainted.update(refs_in(s.args) + refs_in(s.kwargs))
    return {i for i in tainted if prog.steps[i].op not in ("input", "output")}


def pass_flops(
    model: nn.Module, plan: Plan, sample_shape: Sequence[int], keysets: Sequence[Iterable[str]]
) -> PassFlops:
    """FLOPs per sample for `plan` (an `Evaluator`'s plan for `model`), counted on the CPU.

    `keysets[i]`: the state keys variant i overrides (i as in the plan's members). The model is
    traced afresh (or not, when the plan says the engine ran it untraced); `Program` is
    deterministic, so its step indices are the plan's.
    """
    was_training = model.training
    p0 = next(iter(model.parameters()), None)
    dtype = p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32
    device = p0.device if p0 is not None else torch.device("cpu")
    model.eval()
    try:
        with no_inplace_modules(model), torch.inference_mode():
            # the program the engine ran: untraced where its trace proved not to be the forward
            prog = Program(model, trace=plan.untraced is None)
            x = torch.zeros((2, *sample_shape), dtype=dtype, device=device)
            cum = cumulative_flops(prog, x)
    finally:
        model.train(was_training)
    per_step = [cum[0]] + [b - a for a, b in zip(cum, cum[1:], strict=False)]
    cones: dict[frozenset[str], int] = {}

    def cone_flops(i: int) -> int:
        keys = frozenset(keysets[i])
        if keys not in cones:
            cones[keys] = sum(per_step[j] for j in cone(prog, keys))
        return cones[keys]

    # x is a batch of 2: halve every count for FLOPs per sample
    forward = cum[-1] // 2
    suffixes = sum(cone_flops(i) for g in plan.groups for i in g.members) // 2
    from_cut = (
        sum(len(g.members) * (cum[-1] - (cum[g.start] if g.start else 0)) for g in plan.groups) // 2
    )
    n_variants = sum(len(g.members) for g in plan.groups) + len(plan.same_as_baseline)
    return PassFlops(forward, suffixes, forward * n_variants, from_cut)


def datasheet_rate(device: torch.device, precision: str) -> float | None:
    """FLOP/s from the datasheet for a known GPU at `precision`, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, rates in DATASHEET_TFLOPS:
        if key in name:
            return rates.get(precision, rates["fp32"]) * 1e12
    return None


def measure_rate(
    device: torch.device,
    precision: str,
    seconds: float = 0.5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """FLOP/s of a large square GEMM at the pass's precision on `device`: the best a matrix
    unit here does in practice (bf16 wherever the pass runs bf16 autocast, the CPU included:
    oneDNN on a CPU with AVX512-BF16 or AMX runs it at several times its fp32 rate, and an fp32
    GEMM made the floor of a CPU bf16 pass too high; tf32 as `torch.backends` allows; else fp32).

    Timed in chunks of 5 GEMMs for `seconds`; the rate is the best chunk's, not the mean: on a
    shared machine a chunk that another process slowed down says nothing about what the unit
    can do, and a rate too low makes the floor too high (layerfast would look closer to it)."""
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 8192 if cuda else 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    chunk = 5
    with tf32_allowed(precision == "tf32", cudnn=False):
        for _ in range(3):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best, start = math.inf, clock()
        while True:
            t0 = clock()
            for _ in range(chunk):
                a @ b
            if cuda:
                torch.cuda.synchronize(device)
            t1 = clock()
            best = min(best, t1 - t0)
            if t1 - start >= seconds:
                break
    return 2 * n**3 * chunk / max(best, 1e-12)


def forward_rate(
    model: nn.Module,
    sample_shape: Sequence[int],
    device: torch.device,
    precision: str,
    batch_size: int,
    channels_last: bool = False,
    seconds: float = 0.5,
) -> float:
    """Matrix FLOP/s the model's own forward reaches here: its matrix FLOPs (all of its time
    counted, BatchNorm and activations too) over the best of a few timed forwards of
    `batch_size` zero samples, at the pass's precision and layout. On a CPU, oneDNN's
    convolutions can beat a square GEMM (ResNet-20 at 32², 2 cores: 77 GFLOP/s against 53 for
    1024² and 63 for 2048²), and a floor at the GEMM's rate is then no floor."""
    p0 = next(iter(model.parameters()), None)
    dtype = p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), precision_context(precision, device):
            x = torch.zeros((batch_size, *sample_shape), dtype=dtype, device=device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with FlopCounterMode(display=False) as counter:
                model(x)
            flop = counter.get_total_flops()
            best, start = math.inf, time.perf_counter()
            while True:
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                best = min(best, t1 - t0)
                if t1 - start >= seconds:
                    break
    finally:
        model.train(was_training)
    return flop / max(best, 1e-12)


def floor_report(
    model: nn.Module,
    plan: Plan,
    sample_shape: Sequence[int],
    n_samples: int,
    device: torch.device,
    precision: str,
    *,
    keysets: Sequence[Iterable[str]],
    batch_size: int | None = None,
    channels_last: bool = False,
) -> dict:
    """The floor for a pass of `n_samples`: FLOPs, measured and datasheet rates, seconds.
    `keysets`: each variant's overridden state keys, in the plan's variant order. The measured
    rate is the best of a large GEMM's and, given the pass's `batch_size` (and layout), the
    model's own forward's: a floor must not be beaten by the very work it counts."""
    f = pass_flops(model, plan, sample_shape, keysets)
    # A model built in bfloat16 runs its own bfloat16 forward in every mode (recorded as fp32,
    # `precision.for_model`): its matmuls, and so its floor's GEMM and datasheet rate, are
    # bfloat16 ones (the fp32 datasheet peak was a tenth of the bf16 GEMM measured beside it).
    # A float16 model's are float16 ones on CUDA too, where tensor cores run float16 at the
    # bf16 rate (an fp32 GEMM, 15x slower on an H100, made a floor above the pass's time).
    # On a CPU, float16 (and float64 anywhere) keep the float32 GEMM: a CPU without float16
    # units runs both slower, so that floor is lower than theirs, loose but still a floor.
    dtype = model_dtype(model)
    math = ("bf16" if dtype == "bfloat16"
            else "fp16" if dtype == "float16" and device.type == "cuda" else precision)
    gemm = measure_rate(device, math)
    fwd = None
    if batch_size:
        fwd = forward_rate(model, sample_shape, device, precision, batch_size, channels_last)
    measured = max(gemm, fwd or 0.0)
    sheet = datasheet_rate(device, math)
    total = f.needed * n_samples
    return {
        "gflop_per_sample": {
            "forward": f.forward / 1e9,
            "suffixes": f.suffixes / 1e9,
            "needed": f.needed / 1e9,
            "naive": f.naive / 1e9,
            "suffixes_from_cut": f.suffixes_from_cut / 1e9,
        },
        "tflop": total / 1e12,
        "rate_tflops_measured": measured / 1e12,
        "rate_tflops_gemm": gemm / 1e12,
        "rate_tflops_forward": fwd / 1e12 if fwd is not None else None,
        "rate_tflops_datasheet": sheet / 1e12 if sheet else None,
        "seconds_measured_rate": total / measured,
        "seconds_datasheet_rate": total / sheet if sheet else None,
        "what": "matrix FLOPs (conv, matmul, attention; 2 per multiply-add) of the baseline "
        "forward plus, for each variant, the steps that depend on its changed tensors, at the "
        "best rate measured here in the pass's precision (bf16 for a model built in it, "
        "float16 on CUDA for one built in float16; a "
        "large GEMM, or the model's own "
        "forward at the pass's batch size if faster; datasheet for known GPUs)",
    }

"""Review of the compiled ops (csrc/, layerfast/ops.py) and their callers, session 17.

CPU tests of defects a GPU run (or a CPU-only build on a GPU machine) would expose, and
`cuda`-marked tests that check the same on a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch

from layerfast import ops
from layerfast.engine import Evaluator


def _tiny_model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 24), torch.nn.ReLU(),
                                torch.nn.Linear(24, 7))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    variants = [{"1.weight": torch.randn(24, 16, generator=g)},
                {"3.weight": torch.randn(7, 24, generator=g)}]  # fmt: skip
    x = torch.randn(24, 1, 4, 4, generator=g)
    y = torch.randint(0, 7, (24,), generator=g)
    return model, variants, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]


def test_evaluator_scores_without_a_compiled_score_kernel(monkeypatch):
    """A build without CUDA kernels (FORCE_CUDA=0, which README recommends when nvcc and torch
    disagree, or torch with CUDA but no nvcc at install time) has no `score_` for CUDA: the
    Evaluator called it anyway, and the first batch on the GPU died with the dispatcher's
    NotImplementedError. ops.py says callers use `score_reference` there. Simulated on the
    CPU: `has_kernel` says no, and `score_` raises what the dispatcher raises."""
    model, variants, batches = _tiny_model_and_batches()
    want = Evaluator(model, variants, device="cpu", fanout=False, batch_size=8).run(batches)

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'layerfast::score_' with arguments from the "
                                  "'CUDA' backend.")

    real_has = ops.has_kernel
    monkeypatch.setattr(ops, "has_kernel", lambda op, dev: op != "score_" and real_has(op, dev))
    monkeypatch.setattr(ops, "score_", no_kernel)
    got = Evaluator(model, variants, device="cpu", fanout=False, batch_size=8).run(batches)
    torch.testing.assert_close(got.counts, want.counts, rtol=1e-6, atol=1e-5)


# ---- affine_relu on the CPU: no slower than the torch ops it replaces ---------------------


def _best_ms(fn, reps: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@pytest.mark.parametrize(
    "shape, cl",
    [((8, 256, 28, 28), True), ((2048, 1024), False)],
    ids=["channels_last-no-residual", "2d-batchnorm1d"],
)
def test_affine_relu_cpu_not_slower_than_torch(shape, cl):
    """The op exists because one pass beats BN + ReLU as torch ops (DESIGN.md §7: a compiled
    op earns its place by a benchmark). Two common forms lost to torch 2-3x on the CPU: without
    a residual, a channels_last pixel was walked one channel per call (runs of C_r = 1), and a
    2-D x ([N, C], BatchNorm1d after a Linear) one element per plane."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    scale, shift = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    view = (1, C) + (1,) * (x.dim() - 2)
    sv, hv = scale.view(view), shift.view(view)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        op = _best_ms(lambda: ops.affine_relu(x, scale, shift, None, True))
        ref = _best_ms(lambda: torch.relu(x * sv + hv))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(ops.affine_relu(x, scale, shift, None, True),
                               ops.affine_relu_reference(x, scale, shift, None, True))
    assert op < ref, f"affine_relu {op:.1f} ms vs torch ops {ref:.1f} ms"

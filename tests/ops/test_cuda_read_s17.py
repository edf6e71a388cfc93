"""Review of the compiled ops (csrc/, layerfast/ops.py) and their callers, session 17.

CPU tests of defects a GPU run (or a CPU-only build on a GPU machine) would expose, and
`cuda`-marked tests that check the same on a GPU.
"""

from __future__ import annotations

import math

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


# ---- affine_relu on the CPU: the forms that took the per-element path -----------------------
# Without a residual, a channels_last pixel was walked one channel per call, and a 2-D x
# ([N, C], BatchNorm1d after a Linear) one element per plane: 2-3x slower than the torch ops
# the op replaces. The timing is `benchmarks/bench_ops.py::test_bn_relu_*` (timings never gate
# tests); here the faster paths must compute what the reference does.


@pytest.mark.parametrize(
    "shape, cl",
    [((2, 24, 5, 7), True), ((37, 40), False), ((3, 5, 1, 1), False), ((3, 5, 1, 1), True)],
    ids=["channels_last-no-residual", "2d-batchnorm1d", "1x1-contiguous", "1x1-channels_last"],
)
@pytest.mark.parametrize("relu", [True, False])
def test_affine_relu_cpu_runs_of_a_pixel_equal_the_reference(shape, cl, relu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    scale, shift = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    got = ops.affine_relu(x, scale, shift, None, relu)
    torch.testing.assert_close(got, ops.affine_relu_reference(x, scale, shift, None, relu),
                               rtol=0, atol=0)
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


# ---- CUDA: tensors over 2^31 elements (32-bit index overflow) -------------------------------
# The kernels index with int64 throughout (read in csrc/cuda/*.cu); no test had a tensor past
# 2^31 elements, where an int or unsigned index would wrap. Each needs < 20 GB of GPU memory.


def _skip_small_gpu(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


@pytest.mark.cuda
@pytest.mark.slow
def test_score_cuda_logits_past_2_31_elements():
    """[1, 129, 2^24] bf16: rows 128 on start at element 2^31. Odd rows put a 1 on the label
    (the last class, at the far end of each row), even rows on class 0: the counts are known."""
    _skip_small_gpu(6)
    B, C = 129, 2**24
    logits = torch.zeros(1, B, C, dtype=torch.bfloat16, device="cuda")
    odd = torch.arange(1, B, 2, device="cuda")
    even = torch.arange(0, B, 2, device="cuda")
    logits[0, odd, C - 1] = 1
    logits[0, even, 0] = 1
    labels = torch.full((B,), C - 1, dtype=torch.int64, device="cuda")
    ref = torch.where(torch.arange(B, device="cuda") % 2 == 1, C - 1, 0)
    acc = torch.zeros(1, 4, dtype=torch.float64, device="cuda")
    ops.score_(logits, labels, ref, acc)
    got = acc.cpu()[0]
    n_odd = len(odd)
    lse = torch.log(torch.tensor(math.e + (C - 1), dtype=torch.float64)).item()
    want_loss = n_odd * (lse - 1) + (B - n_odd) * lse
    assert got[0].item() == n_odd and got[1].item() == n_odd and got[3].item() == B, got
    assert abs(got[2].item() - want_loss) < 1e-3 * want_loss, (got, want_loss)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
def test_affine_relu_cuda_past_2_31_elements(cl):
    """x [1, 3, 2^15, 2^15] bf16 (3·2^30 elements) with a one-channel residual: each output
    channel is one known constant, checked over the whole tensor (the last 2^30 elements lie
    past 2^31)."""
    _skip_small_gpu(24)
    x = torch.zeros(1, 3, 2**15, 2**15, dtype=torch.bfloat16, device="cuda")
    r = torch.ones(1, 1, 2**15, 2**15, dtype=torch.bfloat16, device="cuda")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last)
    scale = torch.tensor([1.0, 2.0, 3.0], device="cuda")
    shift = torch.tensor([0.5, -2.0, 2.0], device="cuda")
    out = ops.affine_relu(x, scale, shift, r, True)
    assert out.stride() == x.stride()
    for c, want in enumerate((1.5, 0.0, 3.0)):
        ch = out[:, c]
        assert ch.amin().item() == want and ch.amax().item() == want, (c, want)


@pytest.mark.cuda
@pytest.mark.slow
def test_swap_cuda_pair_past_2_31_bytes_misaligned():
    """A uint8 pair of 2^31 + 4099 bytes, starting 1 and 3 bytes into their storages (bytewise
    path: no common alignment), and a float32 pair of 2^31 + 5 elements 4 bytes in (4-byte
    units, 16-byte misaligned): every byte moves, the bytes around the views do not."""
    _skip_small_gpu(24)
    n = 2**31 + 4099
    a_base = torch.zeros(n + 8, dtype=torch.uint8, device="cuda")
    b_base = torch.full((n + 8,), 2, dtype=torch.uint8, device="cuda")
    a, b = a_base[1 : 1 + n], b_base[3 : 3 + n]
    ops.swap_([a], [b])
    assert (a == 2).all() and (b == 0).all()
    assert a_base[0].item() == 0 and a_base[n + 1 :].eq(0).all()
    assert b_base[:3].eq(2).all() and b_base[n + 3 :].eq(2).all()
    del a_base, b_base, a, b
    m = 2**31 + 5
    f_base = torch.zeros(m + 1, device="cuda")
    g = torch.full((m,), 7.0, device="cuda")
    tail = torch.arange(1.0, 11.0, device="cuda")
    g[-10:] = tail
    f = f_base[1:]
    ops.swap_([f], [g])
    assert torch.equal(f[-10:], tail) and f[:-10].eq(7).all()
    assert g.eq(0).all() and f_base[0].item() == 0

"""`layerfast::affine_relu` against its pure-torch reference, on every dtype, both memory layouts,
with and without a (broadcast) residual and ReLU, plus its errors and `opcheck`.

Tolerance: the kernels compute in float32 and round once, like the reference; they may contract
x·scale + shift into an FMA (nvcc does), so fp32 is compared to a few ulps, half types to one ulp.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layerfast import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, C, spatial, C_r): C_r = 0 means no residual
SHAPES = [
    (2, 6, (5, 7), 0),
    (3, 12, (4, 4), 12),
    (3, 12, (4, 4), 4),  # K = 3 variants side by side, one shared skip
    (1, 8, (1, 1), 8),  # both layouts at once
    (4, 16, (9,), 16),  # 3-D (BatchNorm1d after a conv1d)
    (5, 10, (), 5),  # 2-D (BatchNorm1d after a linear)
    (2, 1, (3, 3), 1),
]


def _tol(dtype):
    return {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


def make(N, C, S, Cr, dtype, device, cl=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, *S, generator=g).to(dtype)
    scale = torch.rand(C, generator=g) + 0.5
    shift = torch.randn(C, generator=g)
    r = torch.randn(N, Cr, *S, generator=g).to(dtype) if Cr else None
    if cl and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    return x.to(device), scale.to(device), shift.to(device), None if r is None else r.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}r{s[3]}")
def test_matches_reference(device, dtype, cl, relu, shape):
    x, scale, shift, r = make(*shape, dtype, device, cl)
    got = ops.affine_relu(x, scale, shift, r, relu)
    want = ops.affine_relu_reference(x, scale, shift, r, relu)
    assert got.shape == x.shape and got.dtype == x.dtype and got.stride() == x.stride()
    torch.testing.assert_close(got, want, **_tol(dtype))
    if relu:
        assert (got >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
def test_equals_batchnorm_add_relu(device, cl):
    """What the engine replaces: F.batch_norm (eval) -> + skip -> relu, with the skip shared by
    K = 4 variants side by side (repeated K times for the torch version)."""
    K, N, C, H, W = 4, 3, 8, 6, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, K * C, H, W, generator=g)
    skip = torch.randn(N, C, H, W, generator=g)
    mean, var = torch.randn(K * C, generator=g), torch.rand(K * C, generator=g) + 0.1
    w, b = torch.randn(K * C, generator=g), torch.randn(K * C, generator=g)
    eps = 1e-5
    if cl:
        x, skip = (t.contiguous(memory_format=torch.channels_last) for t in (x, skip))
    x, skip, mean, var, w, b = (t.to(device) for t in (x, skip, mean, var, w, b))
    want = F.relu(F.batch_norm(x, mean, var, w, b, False, 0.0, eps) + skip.repeat(1, K, 1, 1))
    scale = w * torch.rsqrt(var + eps)
    got = ops.affine_relu(x, scale, b - mean * scale, skip, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_keeps_nan_and_inf(device):
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), -1.0, 2.0]]).view(1, 5, 1)
    one, zero = torch.ones(5), torch.zeros(5)
    got = ops.affine_relu(x.to(device), one.to(device), zero.to(device), None, True).cpu().flatten()
    assert torch.isnan(got[0]) and got[1] == float("inf") and got[2] == 0 and got[3] == 0 and got[4] == 2


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    x, scale, shift, _ = make(0, 4, (3, 3), 0, torch.float32, device)
    assert ops.affine_relu(x, scale, shift, None, True).shape == (0, 4, 3, 3)


def test_cpu_independent_of_thread_count():
    x, scale, shift, r = make(8, 64, (12, 12), 16, torch.float32, "cpu", cl=True, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.affine_relu(x, scale, shift, r, True)
        torch.set_num_threads(max(threads, 2))
        many = ops.affine_relu(x, scale, shift, r, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    x, scale, shift, r = make(2, 6, (4, 4), 3, torch.float32, device)
    with pytest.raises(RuntimeError, match=r"affine_relu: x must have shape \[N, C, \.\.\.\]"):
        ops.affine_relu(x.flatten(), scale, shift)
    with pytest.raises(RuntimeError, match=r"affine_relu: x must be float32, float16 or bfloat16"):
        ops.affine_relu(x.double(), scale, shift)
    with pytest.raises(RuntimeError, match=r"affine_relu: x must be contiguous or channels_last"):
        ops.affine_relu(x.transpose(2, 3), scale, shift)
    with pytest.raises(RuntimeError, match=r"affine_relu: scale must have shape \[C\] = \[6\]"):
        ops.affine_relu(x, scale[:5], shift)
    with pytest.raises(RuntimeError, match=r"affine_relu: shift must be float32"):
        ops.affine_relu(x, scale, shift.double())
    with pytest.raises(RuntimeError, match=r"affine_relu: residual must have shape \[N, C_r"):
        ops.affine_relu(x, scale, shift, torch.zeros(2, 3, 4, 5, device=device))  # spatial
    with pytest.raises(RuntimeError, match=r"affine_relu: residual must have shape \[N, C_r"):
        ops.affine_relu(x, scale, shift, torch.zeros(2, 4, 4, 4, device=device))  # 4 ∤ 6
    with pytest.raises(RuntimeError, match=r"affine_relu: residual must have x's dtype"):
        ops.affine_relu(x, scale, shift, r.half())
    with pytest.raises(RuntimeError, match=r"affine_relu: residual must have x's memory layout"):
        ops.affine_relu(x, scale, shift, r.contiguous(memory_format=torch.channels_last))


def test_device_mismatch_error():
    x, scale, shift, _ = make(2, 6, (4, 4), 0, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"affine_relu: scale is on meta but x is on cpu"):
        ops.affine_relu(x, scale.to("meta"), shift)


def test_autograd_refused():
    x, scale, shift, _ = make(2, 6, (4, 4), 0, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"affine_relu is not differentiable"):
        ops.affine_relu(x.requires_grad_(), scale, shift)
    with torch.no_grad():
        assert ops.affine_relu(x, scale, shift).grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        make(2, 6, (5, 7), 0, torch.float32, device),
        make(3, 12, (4, 4), 4, torch.bfloat16, device, cl=True),
        make(4, 16, (9,), 16, torch.float16, device),
    ]
    for x, scale, shift, r in samples:
        for relu in (True, False):
            torch.library.opcheck(torch.ops.layerfast.affine_relu.default, (x, scale, shift, r, relu),
                                  test_utils=("test_schema", "test_faketensor",
                                              "test_autograd_registration"))


def test_compiles():
    x, scale, shift, r = make(3, 12, (4, 4), 4, torch.float32, "cpu")
    want = ops.affine_relu(x, scale, shift, r, True)
    got = torch.compile(ops.affine_relu, fullgraph=True)(x, scale, shift, r, True)
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_cuda_one_launch_no_sync():
    from torch.profiler import ProfilerActivity, profile

    x, scale, shift, r = make(64, 7 * 64, (28, 28), 64, torch.bfloat16, "cuda", cl=True)
    ops.affine_relu(x, scale, shift, r, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = ops.affine_relu(x, scale, shift, r, True)
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "affine_relu" in kernels[0], kernels
    torch.testing.assert_close(got, ops.affine_relu_reference(x, scale, shift, r, True),
                               **_tol(torch.bfloat16))


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    x, scale, shift, r = make(4, 32, (8, 8), 8, torch.float32, "cuda", seed=6)
    x2 = torch.randn_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # s is kept busy, then x is overwritten on s: a kernel launched on any other stream
        # (e.g. the default one) would read the old x
        torch.cuda._sleep(100_000_000)
        x.copy_(x2)
        got = ops.affine_relu(x, scale, shift, r, True)
    s.synchronize()
    torch.testing.assert_close(got, ops.affine_relu_reference(x2, scale, shift, r, True),
                               **_tol(torch.float32))


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape, dtype",
    [
        # planes (37·41) and channel runs that straddle the threads' 4-element steps
        ((3, 1000, (37, 41), 250), torch.float32),
        # more elements (75.5M) than one grid-stride pass covers (65,536 blocks × 256 threads
        # × 4 = 2^26): threads take a second step, which lands mid-plane and mid-pixel
        ((2, 1024, (192, 192), 256), torch.float16),
    ],
)
def test_cuda_large_index_math(shape, dtype):
    x, scale, shift, r = make(*shape, dtype, "cuda", seed=5)
    if dtype == torch.float16:  # the shape does what its comment says
        assert x.numel() > 2**26
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        rr = r if t.is_contiguous() else r.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ops.affine_relu(t, scale, shift, rr, True),
                                   ops.affine_relu_reference(t, scale, shift, rr, True),
                                   **_tol(dtype))


# ---- the CUDA kernel's index arithmetic, run on the CPU ------------------------------------
# `_affine_relu_cuda_logic` executes csrc/affine_relu.h's `run_vec` — the very function each CUDA
# thread runs per grid-stride step — for every step, on the CPU. Shapes where runs of kVec = 4
# elements cross planes, pixels, channel runs of the residual and the batch dim.
AWKWARD = [
    (3, 5, (3, 3), 5),  # S = 9: planes end mid-vector
    (2, 6, (1, 7), 3),  # K = 2 over C_r = 3 channels
    (2, 12, (5, 3), 2),  # C_r = 2: the residual run restarts inside every vector (CL)
    (1, 7, (1, 1), 7),  # one pixel
    (4, 9, (2, 2), 1),  # C_r = 1: one skip channel for all
    (2, 3, (13,), 3),  # 3-D
    (7, 5, (), 5),  # 2-D
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("shape", AWKWARD + SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}r{s[3]}")
def test_cuda_logic_on_cpu_matches_reference(dtype, cl, relu, shape):
    for res in (True, False):
        N, C, S, Cr = shape
        x, scale, shift, r = make(N, C, S, Cr if res else 0, dtype, "cpu", cl, seed=C + N)
        got = torch.ops.layerfast._affine_relu_cuda_logic(x, scale, shift, r, relu)
        want = ops.affine_relu_reference(x, scale, shift, r, relu)
        torch.testing.assert_close(got, want, **_tol(dtype))


def test_cuda_logic_opcheck():
    x, scale, shift, r = make(3, 12, (4, 4), 4, torch.float32, "cpu", cl=True)
    torch.library.opcheck(torch.ops.layerfast._affine_relu_cuda_logic.default,
                          (x, scale, shift, r, True),
                          test_utils=("test_schema", "test_faketensor"))

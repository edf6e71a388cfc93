"""`layerfast::swap_` against the pure-torch reference, its checks, and `opcheck` (DESIGN.md §7.4).

Every comparison is bitwise (tensors viewed as bytes), so NaN payloads and -0.0 count. Tests on
'cuda' are marked `cuda` and skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from layerfast import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
# 0 elements, 1, odd sizes, one byte past a 64 KiB chunk, a few MiB (several CPU/GPU chunks).
SHAPES = [(0,), (1,), (3,), (17,), (3, 5, 7), (1000,), (65537,), (2, 0, 3), (512, 1031)]


def rand(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=gen) == 1
    elif dtype == torch.uint8:
        t = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    elif dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=gen, dtype=dtype)
    else:
        t = torch.randint(-(2**30), 2**30, shape, generator=gen, dtype=dtype)
    return t.to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as raw bytes (exact comparison, NaN payloads included)."""
    t = t.contiguous()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1).view(torch.uint8).cpu()


def assert_bits_equal(xs, ys) -> None:
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert x.shape == y.shape and x.dtype == y.dtype, i
        assert torch.equal(bits(x), bits(y)), f"pair {i} differs ({x.dtype}{list(x.shape)})"


def make_lists(specs, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = [rand(shape, dtype, device, gen) for shape, dtype in specs]
    b = [rand(shape, dtype, device, gen) for shape, dtype in specs]
    return a, b


def clones(ts):
    return [t.clone() for t in ts]


def check_swap(a, b) -> None:
    """swap_ exchanges every pair in place: values swapped (bitwise), data pointers kept, and the
    result equals the reference's."""
    a0, b0 = clones(a), clones(b)
    ra, rb = clones(a), clones(b)
    ptrs = [(x.data_ptr(), y.data_ptr()) for x, y in zip(a, b, strict=True)]
    ops.swap_(a, b)
    ops.swap_reference(ra, rb)
    assert_bits_equal(a, b0)
    assert_bits_equal(b, a0)
    assert_bits_equal(a, ra)
    assert_bits_equal(b, rb)
    assert ptrs == [(x.data_ptr(), y.data_ptr()) for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swap_matches_reference(device, dtype):
    a, b = make_lists([(s, dtype) for s in SHAPES], device)
    check_swap(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_mixed_list_of_300(device):
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 5000, (300,), generator=gen).tolist()
    specs = [((n,), DTYPES[i % len(DTYPES)]) for i, n in enumerate(sizes)]
    a, b = make_lists(specs, device, seed=2)
    check_swap(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_twice_restores_special_values(device):
    nan_payload = torch.tensor([0x7FC00001, 0x7F800001, 0xFFC12345], dtype=torch.int64)
    special = torch.cat([
        nan_payload.to(torch.int32).view(torch.float32),
        torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), 1e-45]),
    ]).to(device)
    other = torch.arange(special.numel(), dtype=torch.float32, device=device)
    a, b = [special.clone()], [other.clone()]
    ops.swap_(a, b)
    assert_bits_equal(a, [other])
    assert_bits_equal(b, [special])
    ops.swap_(a, b)
    assert_bits_equal(a, [special])
    assert_bits_equal(b, [other])


def _layout_pairs(device, seed):
    """Pairs that are not plain contiguous: each is (a, b, base tensors to check untouched)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    u = torch.randn(2, 3, 5, 4, generator=g)
    w = torch.randn(2, 3, 5, 4, generator=g)
    bytes_a = torch.randint(0, 256, (4099,), generator=g, dtype=torch.uint8)
    bytes_b = torch.randint(0, 256, (4099,), generator=g, dtype=torch.uint8)
    f_a, f_b = torch.randn(70001, generator=g), torch.randn(70001, generator=g)
    s_a, s_b = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    c_a = torch.randn(5, 3, dtype=torch.complex64, generator=g)
    c_b = torch.randn(5, 3, dtype=torch.complex64, generator=g)
    w_a = torch.randint(0, 256, (70010,), generator=g, dtype=torch.uint8)
    w_b = torch.randint(0, 256, (70010,), generator=g, dtype=torch.uint8)
    h_a, h_b = torch.randn(20002, generator=g), torch.randn(20002, generator=g)
    t = [
        t.to(device)
        for t in (x, y, u, w, bytes_a, bytes_b, f_a, f_b, s_a, s_b, c_a, c_b, w_a, w_b, h_a, h_b)
    ]
    x, y, u, w, bytes_a, bytes_b, f_a, f_b, s_a, s_b, c_a, c_b, w_a, w_b, h_a, h_b = t
    cl = torch.channels_last
    return [
        (x.t(), y.t()),  # transposed, same strides: bytewise
        (x.clone(), y.t().contiguous().t()),  # different layouts: fallback
        (u.contiguous(memory_format=cl), w.contiguous(memory_format=cl)),  # channels_last
        (u.clone(), w.contiguous(memory_format=cl)),  # contiguous vs channels_last
        (bytes_a[1:4000], bytes_b[3:4002]),  # misaligned starts, different offsets
        (bytes_a[5:4005], bytes_b[21:4021]),  # same offset modulo 16, not aligned
        (f_a[1:70001], f_b[1:70001]),  # same offset modulo 16 (4 B), crosses a 64 KiB chunk
        # same offset modulo 4 but not 16 (CUDA: 4-byte units): a 3-byte head, a 64 KiB chunk
        # boundary; then 4-byte aligned starts 4 and 8 bytes in, over 80000 bytes
        (w_a[5:70005], w_b[9:70009]),
        (h_a[1:20001], h_b[2:20002]),
        (s_a[:, ::2], s_b[:, 1::2]),  # gaps: fallback, the other columns must stay
        (c_a.t(), c_b.t()),  # complex, transposed
    ], [x, y, u, w, bytes_a, bytes_b, f_a, f_b, s_a, s_b, c_a, c_b, w_a, w_b, h_a, h_b]


@pytest.mark.parametrize("device", DEVICES)
def test_swap_views_and_layouts(device):
    pairs, bases = _layout_pairs(device, seed=3)
    ref_pairs, ref_bases = _layout_pairs(device, seed=3)
    # one pair at a time (some pairs share a base tensor), each checked right after its swap
    for i, ((a, b), (ra, rb)) in enumerate(zip(pairs, ref_pairs, strict=True)):
        a0, b0 = a.clone(), b.clone()
        ops.swap_([a], [b])
        ops.swap_reference([ra], [rb])
        assert torch.equal(a.cpu(), b0.cpu()), i
        assert torch.equal(b.cpu(), a0.cpu()), i
    # the bases (including elements outside the views) equal the reference's
    assert_bits_equal(bases, ref_bases)


def test_swap_refuses_conjugate_views():
    # torch's Conjugate fallback stops lazily conjugated tensors before any kernel runs
    c = torch.randn(3, dtype=torch.complex64)
    d = torch.randn(3, dtype=torch.complex64)
    c0 = c.clone()
    with pytest.raises(RuntimeError, match="conjugate"):
        ops.swap_([c.conj()], [d])
    assert torch.equal(c, c0)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_empty_and_zero_element(device):
    ops.swap_([], [])
    a = [torch.empty(0, device=device), torch.empty(3, 0, dtype=torch.int64, device=device)]
    b = [torch.empty(0, device=device), torch.empty(3, 0, dtype=torch.int64, device=device)]
    ops.swap_(a, b)
    assert [t.shape for t in a] == [(0,), (3, 0)]


@pytest.mark.parametrize("device", DEVICES)
def test_swap_same_memory_is_noop(device):
    x = torch.arange(10.0, device=device)
    ops.swap_([x, x[2:5]], [x, x[2:5]])
    assert torch.equal(x.cpu(), torch.arange(10.0))


@pytest.mark.parametrize("device", DEVICES)
def test_swap_errors(device):
    f = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match=r"layerfast::swap_: a and b must have the same length, got 2 and 1"):
        ops.swap_([f, f.clone()], [f.clone()])
    with pytest.raises(RuntimeError, match=r"a\[1\] has shape \[3\] but b\[1\] has shape \[4\]"):
        ops.swap_([f.clone(), f.clone()], [f.clone(), torch.zeros(4, device=device)])
    with pytest.raises(RuntimeError, match=r"a\[0\] has dtype Float but b\[0\] has dtype Double"):
        ops.swap_([f.clone()], [f.double()])
    base = torch.arange(10.0, device=device)
    with pytest.raises(RuntimeError, match=r"a\[0\] and b\[0\] share memory without being the same view of it"):
        ops.swap_([base[:6]], [base[4:]])
    with pytest.raises(RuntimeError, match=r"a\[0\] or b\[0\] has elements that share memory"):
        ops.swap_([torch.zeros(1, device=device).expand(4)], [torch.ones(4, device=device)])
    # nothing was swapped by the failing calls
    assert torch.equal(base.cpu(), torch.arange(10.0))


def test_swap_device_mismatch_error():
    # 'meta' stands in for a second device on CPU-only machines (see the cuda tests below)
    with pytest.raises(RuntimeError, match=r"a\[0\] is torch.float32 on cpu but b\[0\] is torch.float32 on meta"):
        ops.swap_([torch.zeros(3)], [torch.zeros(3, device="meta")])
    # pairs on different devices: dispatched to the meta kernel, which used to do nothing
    x, y = torch.zeros(3), torch.ones(3)
    m = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"a\[1\] is on meta but a\[0\] is on cpu"):
        ops.swap_([x, m], [y, m.clone()])
    assert x.eq(0).all() and y.eq(1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_swap_autograd_and_versions(device):
    p = torch.nn.Parameter(torch.ones(3, device=device))
    q = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match=r"layerfast::swap_: a\[0\] requires grad.*torch.no_grad"):
        ops.swap_([p], [q])
    v_p, v_q = p._version, q._version
    with torch.no_grad():
        ops.swap_([p], [q])
    assert (p._version, q._version) == (v_p + 1, v_q + 1)  # like torch's own in-place ops
    assert torch.equal(p.detach().cpu(), torch.zeros(3))
    with torch.inference_mode():
        ops.swap_([p], [q])
    assert torch.equal(p.detach().cpu(), torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
def test_swap_opcheck(device):
    samples = [
        make_lists([((5,), torch.float32), ((2, 3), torch.int64), ((0,), torch.bool)], device),
        make_lists([((4, 4), torch.bfloat16)], device),
        ([], []),
    ]
    x, y = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    samples.append(([x.t()], [y.t().contiguous()]))
    for a, b in samples:
        torch.library.opcheck(torch.ops.layerfast.swap_.default, (a, b))


def test_swap_compiles():
    a, b = make_lists([((5,), torch.float32), ((3,), torch.int64)], "cpu")
    a0, b0 = clones(a), clones(b)
    torch.compile(ops.swap_, fullgraph=True)(a, b)
    assert_bits_equal(a, b0)
    assert_bits_equal(b, a0)


# ---- CUDA only ---------------------------------------------------------------------------


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-50 (161 tensors, 25.6M parameters), read
    off the registry's torchvision-exact model built on the meta device (no memory, no init)."""
    from layerfast.models.resnet import imagenet_resnet

    with torch.device("meta"):
        model = imagenet_resnet("resnet50", 1000, (3, 224, 224))
    return [tuple(p.shape) for p in model.parameters()]


def _cuda_kernels(fn) -> list[str]:
    """Names of the GPU activities (kernels, memcpys, memsets) that `fn` launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm up (lazy initialisation)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
def test_swap_300_tensors_one_launch():
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(1, 3000, (300,), generator=gen).tolist()
    a, b = make_lists([((n,), DTYPES[i % len(DTYPES)]) for i, n in enumerate(sizes)], "cuda")
    kernels = _cuda_kernels(lambda: ops.swap_(a, b))
    assert len(kernels) == 1 and "swap_kernel" in kernels[0], kernels


@pytest.mark.cuda
def test_swap_resnet50_sized_list_one_launch():
    shapes = resnet50_shapes()
    assert len(shapes) == 161 and 25e6 < sum(torch.Size(s).numel() for s in shapes) < 26e6
    a = [torch.randn(s, device="cuda") for s in shapes]
    b = [torch.randn(s, device="cuda") for s in shapes]
    kernels = _cuda_kernels(lambda: ops.swap_(a, b))
    assert len(kernels) == 1, kernels
    check_swap(a, b)


@pytest.mark.cuda
def test_swap_long_list_launches_per_1024():
    a, b = make_lists([((7,), torch.float32)] * 1500, "cuda")
    kernels = _cuda_kernels(lambda: ops.swap_(a, b))
    assert len(kernels) == 2, kernels  # 1024 + 476 pairs
    check_swap(a, b)


@pytest.mark.cuda
def test_swap_cuda_device_errors():
    c, g = torch.zeros(3), torch.zeros(3, device="cuda")
    with pytest.raises(RuntimeError, match=r"a\[0\] is on cpu but b\[0\] is on cuda:0"):
        ops.swap_([c], [g])
    with pytest.raises(RuntimeError, match=r"all tensors must be on one CUDA device.*a\[1\] is on cpu"):
        ops.swap_([g, c], [g.clone(), c.clone()])
    # a CPU tensor first: the same message (not CUDAGuard's "non-CUDA DeviceType")
    with pytest.raises(RuntimeError, match=r"device; a\[1\] is on cuda:0 but a\[0\] is on cpu"):
        ops.swap_([c, g], [c.clone(), g.clone()])
    # a failing call swaps nothing, not even the pairs before the bad one (here a copy-fallback
    # pair: transposed vs contiguous layouts)
    x, y = torch.randn(4, 6, device="cuda"), torch.randn(6, 4, device="cuda").t()
    x0, y0 = x.clone(), y.clone()
    with pytest.raises(RuntimeError, match=r"a\[1\] is on cpu"):
        ops.swap_([x, c], [y, c.clone()])
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.cuda
def test_swap_cuda_no_host_sync_and_current_stream():
    a, b = make_lists([((1000,), torch.float32), ((33,), torch.uint8)], "cuda")
    b0 = clones(b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(s):
            # s is kept busy, then a is overwritten on s: a swap launched on any other stream
            # (e.g. the default one) would run first and b would not get the new values
            torch.cuda._sleep(100_000_000)
            a[0].fill_(7.0)
            a[1].fill_(3)
            ops.swap_(a, b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s.synchronize()
    assert_bits_equal(a, b0)
    assert (b[0] == 7).all() and (b[1] == 3).all()

"""`layerfast::score_` against the pure-torch reference and hand-computed cases, its checks, and
`opcheck` (DESIGN.md §7.5). Columns of acc: correct@1, correct@5, summed cross-entropy,
agreement. Tests on 'cuda' are marked `cuda` and skip without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from layerfast import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (V, B, C): single row, small, C < 5 (top-5 = top-1), C = 5, more rows than a CUDA block, C=1000
SHAPES = [(1, 1, 1), (3, 7, 10), (2, 5, 3), (2, 9, 4), (4, 33, 5), (2, 70, 17), (5, 64, 1000)]


def make_inputs(V, B, C, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(V, B, C, generator=g)).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    # the baseline: variant 0's predictions, as the engine computes them
    ref_pred = logits[0].float().argmax(-1) if V else torch.randint(0, C, (B,), generator=g)
    # scoring adds into what is there: counts so far (integers, so any order of adding them is
    # exact) and a loss sum
    acc = torch.randint(0, 100, (V, 4), generator=g).double()
    acc[:, 2] += torch.rand(V, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (logits, labels, ref_pred, acc)]


def assert_acc_close(got: torch.Tensor, want: torch.Tensor, B: int) -> None:
    got, want = got.cpu(), want.cpu()
    # counts are exact; the loss sum may differ in float32 rounding of each row
    torch.testing.assert_close(got[:, [0, 1, 3]], want[:, [0, 1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-5, atol=1e-5 * max(B, 1),
                               equal_nan=True)


def run_both(logits, labels, ref_pred, acc):
    got, want = acc.clone(), acc.clone()
    ops.score_(logits, labels, ref_pred, got)
    ops.score_reference(logits, labels, ref_pred, want)
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_score_matches_reference(device, dtype, shape):
    logits, labels, ref_pred, acc = make_inputs(*shape, dtype, device)
    got, want = run_both(logits, labels, ref_pred, acc)
    assert not torch.equal(got.cpu(), acc.cpu()) or shape[1] == 0
    assert_acc_close(got, want, shape[1])


@pytest.mark.parametrize("device", DEVICES)
def test_score_hand_computed(device):
    # V=2, B=3, C=6; computed by hand, independent of the reference
    logits = torch.tensor([
        [[1.0, 3.0, 3.0, 0.0, 0.0, 0.0],    # tie at 1 and 2: pred 1; label 2 not correct@1
         [0.0, 0.0, 0.0, 0.0, 0.0, 9.0],    # pred 5 = label
         [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]],   # label 5: five classes above it, not correct@5
        [[2.0, 2.0, 2.0, 2.0, 2.0, 2.0],    # all tied: pred 0, label 2 is correct@5 only
         [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],    # label 5: five classes above it
         [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]],   # pred 1 (first of three); label 5 tied with it
    ], device=device)
    labels = torch.tensor([2, 5, 5], device=device)  # shared by both variants
    ref_pred = torch.tensor([1, 0, 0], device=device)
    acc = torch.zeros(2, 4, dtype=torch.float64, device=device)
    ops.score_(logits, labels, ref_pred, acc)

    def ce(row, label):
        return math.log(sum(math.exp(x) for x in row)) - row[label]

    rows = logits.tolist()
    want = torch.tensor([
        [1, 2, sum(ce(rows[0][b], int(labels[b])) for b in range(3)), 2],
        [0, 2, sum(ce(rows[1][b], int(labels[b])) for b in range(3)), 1],
    ], dtype=torch.float64)
    torch.testing.assert_close(acc.cpu(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_score_ties_take_the_first_index(device, dtype):
    # every row is constant: the prediction is class 0, and labels 0..2 rank among the first 5
    V, B, C = 2, 40, 300
    logits = torch.full((V, B, C), 1.5, dtype=dtype, device=device)
    labels = torch.arange(B, device=device) % 3  # classes 0, 1, 2
    ref_pred = torch.zeros(B, dtype=torch.int64, device=device)
    acc = torch.zeros(V, 4, dtype=torch.float64, device=device)
    ops.score_(logits, labels, ref_pred, acc)
    n0 = int((labels == 0).sum())
    assert acc[:, 0].tolist() == [n0, n0]
    assert acc[:, 1].tolist() == [B, B]
    assert acc[:, 3].tolist() == [B, B]
    torch.testing.assert_close(acc[:, 2].cpu(), torch.full((V,), B * math.log(C), dtype=torch.float64))
    got, want = run_both(logits, labels, ref_pred, torch.zeros_like(acc))
    assert_acc_close(got, want, B)


@pytest.mark.parametrize("device", DEVICES)
def test_score_top5_ranks_ties_by_index(device):
    # k classes at 6.0 above the label; then a block of 10 classes tied at 5.0 that holds the
    # label at position `pos` within it: the label ranks k + pos (a stable descending sort)
    C = 20
    rows, labels, want5 = [], [], 0
    for k in range(8):
        for pos in (0, 3, 9):
            row = torch.zeros(C)
            row[:k] = 6.0
            row[k:k + 10] = 5.0
            rows.append(row)
            labels.append(k + pos)
            want5 += k + pos < 5
    logits = torch.stack(rows).unsqueeze(0).to(device)  # V=1, B=24
    labels = torch.tensor(labels, device=device)
    acc = torch.zeros(1, 4, dtype=torch.float64, device=device)
    ops.score_(logits, labels, labels, acc)
    assert acc[0, 1].item() == want5 == 7  # (k, pos) in (0..4, 0) and (0..1, 3)
    order = torch.sort(logits[0], dim=1, descending=True, stable=True).indices
    assert (order[:, :5] == labels[:, None]).any(1).sum().item() == want5
    got, want = run_both(logits, labels, labels, torch.zeros_like(acc))
    assert_acc_close(got, want, len(rows))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_ranks_as_a_stable_descending_sort(device, dtype):
    """correct@1 and correct@5 are the label's place in `torch.sort(descending=True,
    stable=True)`, NaN first: rows drawn from a few values, ±inf and NaN (many ties)."""
    g = torch.Generator().manual_seed(7)
    V, B, C = 3, 400, 12
    pool = torch.tensor([-math.inf, -1.0, 0.0, 0.5, 2.0, math.inf, math.nan])
    logits = pool[torch.randint(0, len(pool), (V, B, C), generator=g)].to(dtype)
    logits[0, :50] = math.nan  # all-NaN rows, and constant rows
    logits[1, :50] = 0.0
    labels = torch.randint(0, C, (B,), generator=g)
    order = torch.sort(logits.float(), dim=2, descending=True, stable=True).indices
    place = (order == labels[None, :, None]).float().argmax(2)  # [V, B]
    acc = torch.zeros(V, 4, dtype=torch.float64, device=device)
    ops.score_(logits.to(device), labels.to(device), labels.to(device), acc)
    assert acc[:, 0].tolist() == (place == 0).sum(1).double().tolist()
    assert acc[:, 1].tolist() == (place < 5).sum(1).double().tolist()
    ref = torch.zeros(V, 4, dtype=torch.float64)
    ops.score_reference(logits, labels, labels, ref)
    assert ref[:, :2].tolist() == acc[:, :2].cpu().tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 2, 3, 4])
def test_score_small_c_top5_is_top1(device, C):
    logits, labels, ref_pred, acc = make_inputs(3, 50, C, torch.float32, device, seed=C)
    acc.zero_()
    ops.score_(logits, labels, ref_pred, acc)
    assert torch.equal(acc[:, 1], acc[:, 0])
    if C > 1:
        assert (acc[:, 0] < 50).all()  # some samples are wrong, so top-5 is not trivially all


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_score_non_finite_logits(device, dtype):
    logits, labels, ref_pred, acc = make_inputs(3, 12, 9, dtype, device, seed=5)
    logits[0, :, 7] = -math.inf          # a masked class (never the label: a finite loss)
    labels[labels == 7] = 0
    logits[1, 0, :] = -math.inf          # a row with nothing but -inf
    logits[1, 1, 2] = math.inf           # +inf wins the argmax
    logits[1, 2, 4] = math.nan           # NaN counts as maximal, as in torch.argmax
    logits[2, 3, :] = math.nan
    got, want = run_both(logits, labels, ref_pred, acc)
    assert_acc_close(got, want, 12)
    assert math.isnan(got[1, 2].item()) and math.isnan(got[2, 2].item())
    assert math.isfinite(got[0, 2].item())


@pytest.mark.parametrize("device", DEVICES)
def test_score_accumulates_in_place(device):
    logits, labels, ref_pred, acc = make_inputs(4, 20, 12, torch.float32, device, seed=6)
    start = acc.clone()
    once = acc.clone()
    ops.score_(logits, labels, ref_pred, once)
    ptr, version = acc.data_ptr(), acc._version
    ops.score_(logits, labels, ref_pred, acc)
    ops.score_(logits, labels, ref_pred, acc)
    assert acc.data_ptr() == ptr and acc._version == version + 2
    torch.testing.assert_close(acc - start, 2 * (once - start))


@pytest.mark.parametrize("device", DEVICES)
def test_score_row_slice_and_strided_labels(device):
    # the engine scores one variant into a row view of a bigger accumulator
    logits, labels, ref_pred, _ = make_inputs(1, 30, 10, torch.float32, device, seed=7)
    big = torch.zeros(5, 4, dtype=torch.float64, device=device)
    strided = torch.stack([labels, labels], 1)[:, 0]  # stride 2
    assert strided.stride() == (2,)
    ops.score_(logits, strided, ref_pred, big[2:3])
    want = torch.zeros(1, 4, dtype=torch.float64, device=device)
    ops.score_reference(logits, labels, ref_pred, want)
    assert_acc_close(big[2:3], want, 30)
    assert big[[0, 1, 3, 4]].abs().sum().item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_score_empty(device):
    for V, B in [(0, 5), (3, 0)]:
        logits, labels, ref_pred, acc = make_inputs(V, B, 7, torch.float32, device)
        before = acc.clone()
        ops.score_(logits, labels, ref_pred, acc)
        assert torch.equal(acc, before)


@pytest.mark.parametrize("device", DEVICES)
def test_score_errors(device):
    logits, labels, ref_pred, acc = make_inputs(2, 6, 10, torch.float32, device)

    def fails(match, lg=logits, lb=labels, rp=ref_pred, ac=acc):
        with pytest.raises(RuntimeError, match=match):
            ops.score_(lg, lb, rp, ac)

    fails(r"layerfast::score_: logits must have shape \[V, B, C\], got \[6, 10\]", lg=logits[0])
    fails(r"logits must be float32, float16 or bfloat16, got Double", lg=logits.double())
    fails(r"logits must be contiguous \(call .contiguous\(\) first\)",
          lg=logits.transpose(0, 1).contiguous().transpose(0, 1))
    fails(r"logits must have at least one class", lg=logits[:, :, :0])
    fails(r"labels must have shape \[B\] = \[6\].*got \[5\]", lb=labels[:5])
    fails(r"labels must be int64, got Int", lb=labels.int())
    fails(r"ref_pred must have shape \[B\] = \[6\].*got \[6, 1\]", rp=ref_pred[:, None])
    fails(r"ref_pred must be int64, got Int", rp=ref_pred.int())
    fails(r"acc must have shape \[V, 4\] = \[2, 4\].*got \[2, 3\]", ac=acc[:, :3].contiguous())
    fails(r"acc must be float64, got Float", ac=acc.float())
    fails(r"acc must be contiguous", ac=torch.zeros(4, 2, dtype=torch.float64, device=device).t())
    before = acc.clone()
    bad = labels.clone()
    bad[4] = 10
    if device == "cpu":  # on CUDA this is a device-side assert that loses the context
        fails(r"layerfast::score_: labels\[4\] = 10 is out of range \[0, 10\)", lb=bad)
        bad[4] = -1
        fails(r"labels\[4\] = -1 is out of range", lb=bad)
    assert torch.equal(acc, before)  # failed calls add nothing


def test_score_device_mismatch_error():
    logits, labels, ref_pred, acc = make_inputs(2, 6, 10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"layerfast::score_: all tensors must be on one device"):
        ops.score_(logits, labels, ref_pred, acc.to("meta"))


@pytest.mark.parametrize("device", DEVICES)
def test_score_autograd(device):
    logits, labels, ref_pred, acc = make_inputs(2, 6, 10, torch.float32, device)
    logits.requires_grad_()
    ops.score_(logits, labels, ref_pred, acc)  # scoring training logits is fine
    assert acc.grad_fn is None and not acc.requires_grad
    with pytest.raises(RuntimeError, match=r"layerfast::score_: acc requires grad"):
        ops.score_(logits, labels, ref_pred, acc.clone().requires_grad_())


def test_score_cpu_independent_of_thread_count():
    logits, labels, ref_pred, acc = make_inputs(6, 200, 300, torch.float32, "cpu", seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = acc.clone()
        ops.score_(logits, labels, ref_pred, one)
        torch.set_num_threads(max(threads, 2))
        many = acc.clone()
        ops.score_(logits, labels, ref_pred, many)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
def test_score_opcheck(device):
    samples = [
        make_inputs(3, 7, 10, torch.float32, device),
        make_inputs(2, 5, 3, torch.bfloat16, device),
        make_inputs(1, 33, 1000, torch.float16, device),
    ]
    lg, lb, rp, ac = make_inputs(2, 4, 6, torch.float32, device)
    samples.append([lg.requires_grad_(), lb, rp, ac])
    for args in samples:
        torch.library.opcheck(torch.ops.layerfast.score_.default, tuple(args))


def test_score_compiles():
    logits, labels, ref_pred, acc = make_inputs(3, 7, 10, torch.float32, "cpu")
    want = acc.clone()
    ops.score_(logits, labels, ref_pred, want)
    torch.compile(ops.score_, fullgraph=True)(logits, labels, ref_pred, acc)
    torch.testing.assert_close(acc, want)


# ---- CUDA only ---------------------------------------------------------------------------


@pytest.mark.cuda
def test_score_cuda_two_launches_no_sync():
    from torch.profiler import ProfilerActivity, profile

    logits, labels, ref_pred, acc = make_inputs(32, 256, 1000, torch.bfloat16, "cuda")
    want = acc.clone()
    ops.score_reference(logits, labels, ref_pred, want)
    ops.score_(logits, labels, ref_pred, acc.clone())  # warm up
    torch.cuda.synchronize()
    got = acc.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ops.score_(logits, labels, ref_pred, got)
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2 and "score_kernel" in kernels[0] and "sum_partials" in kernels[1], kernels
    assert_acc_close(got, want, 256)


@pytest.mark.cuda
def test_score_cuda_is_bitwise_repeatable():
    """No float atomics: the same inputs give the same bits, loss sum included, every time."""
    logits, labels, ref_pred, acc = make_inputs(16, 4096, 1000, torch.float32, "cuda", seed=3)
    runs = []
    for _ in range(5):
        got = acc.clone()
        for _ in range(3):  # accumulate over several calls, as the engine does per batch
            ops.score_(logits, labels, ref_pred, got)
        runs.append(got.cpu())
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    want = acc.clone()
    for _ in range(3):
        ops.score_reference(logits, labels, ref_pred, want)
    assert_acc_close(runs[0].cuda(), want, 3 * 4096)


@pytest.mark.cuda
def test_score_cuda_matches_cpu():
    args = make_inputs(8, 1000, 37, torch.float32, "cpu", seed=9)
    cpu = args[3].clone()
    ops.score_(*args[:3], cpu)
    gpu = args[3].cuda()
    ops.score_(*[t.cuda() for t in args[:3]], gpu)
    assert_acc_close(gpu, cpu, 1000)


@pytest.mark.cuda
def test_score_cuda_runs_on_the_current_stream():
    logits, labels, ref_pred, acc = make_inputs(4, 100, 50, torch.float32, "cuda", seed=11)
    want = torch.zeros_like(acc)
    ops.score_reference(logits, labels, ref_pred, want)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # s is kept busy, then acc is zeroed on s: a score_ launched on any other stream (e.g.
        # the default one) would add into the old acc first and the zeroing would erase it
        torch.cuda._sleep(100_000_000)
        acc.zero_()
        ops.score_(logits, labels, ref_pred, acc)
    s.synchronize()
    assert_acc_close(acc, want, 100)


@pytest.mark.cuda
def test_score_cuda_device_errors():
    logits, labels, ref_pred, acc = make_inputs(2, 6, 10, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match=r"all tensors must be on one device.*labels on cpu"):
        ops.score_(logits, labels.cpu(), ref_pred, acc)


def test_has_kernel():
    assert ops.has_kernel("swap_", "cpu") and ops.has_kernel("score_", torch.device("cpu"))
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("layerfast::score_", "CUDA")
    assert ops.has_kernel("score_", "cuda") == cuda
    assert not ops.has_kernel("score_", "meta")
    with pytest.raises(RuntimeError, match="layerfast::nope_ does not exist"):
        ops.has_kernel("nope_", "cpu")

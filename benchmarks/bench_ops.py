"""The compiled ops against the pure-torch way of doing the same thing (DESIGN.md §7: a compiled
op earns its place by a benchmark).

    pytest benchmarks/ --benchmark-enable                 # CPU, and CUDA where a GPU is visible
    pytest benchmarks/ --benchmark-enable -m "not cuda"   # CPU only

- swap_ vs three `torch._foreach_copy_` through a preallocated temporary list (the best torch
  can do; it also needs a third copy of the weights in memory), on a ResNet-50-like list
  (161 tensors, 25.6M float32 parameters) and on a small list (one unit: 20 small tensors).
- score_ vs `score_reference` (argmax, gather, compare, logsumexp, sums in torch ops) for
  V=32 variants, B=256 samples, C=1000 and C=10 classes.
- affine_relu vs what the fan-out would otherwise run on the fold form: eval `F.batch_norm`,
  `+ skip` (the shared skip broadcast over K, as fanrun does it) and `relu` — a ResNet block's
  end with K=7 variants side by side, 64 channels each (CPU: 8 samples at 28², fp32; CUDA: 64
  samples at 56², bf16, channels_last); and BN + ReLU without a skip on a channels_last conv
  output and on a 2-D [N, C] one (BatchNorm1d after a Linear), fp32.

Each case runs a fixed, small number of rounds so the CPU suite takes about half a minute. CUDA
rounds end with `torch.cuda.synchronize()`, so they measure the latency of one call. Before it
is timed, each case checks once that its way computes what the other way does (the op tests'
tolerances): a figure for a wrong result would mean nothing. The test suite collects these
files too and, with timing disabled, runs each case once: the checks run in CI.
"""

from __future__ import annotations

import pytest
import torch

from layerfast import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-50 (161 tensors, 25.6M parameters), read
    off the registry's torchvision-exact model built on the meta device (no memory, no init)."""
    from layerfast.models.resnet import imagenet_resnet

    with torch.device("meta"):
        model = imagenet_resnet("resnet50", 1000, (3, 224, 224))
    return [tuple(p.shape) for p in model.parameters()]


def small_shapes() -> list[tuple[int, ...]]:
    """One unit's worth: 20 tensors of 64 to ~37K elements."""
    return [(64 * (i + 1) ** 2,) if i % 2 else (64 * (i + 1),) for i in range(20)]


LISTS = {"resnet50": resnet50_shapes, "small": small_shapes}


def _runner(fn, device):
    if device == "cuda":

        def run():
            fn()
            torch.cuda.synchronize()

        return run
    return fn


def _rounds(device: str, heavy: bool) -> int:
    return 50 if device == "cuda" else (8 if heavy else 200)


def _swap_lists(name: str, device: str):
    g = torch.Generator().manual_seed(0)
    shapes = LISTS[name]()
    a = [torch.randn(s, generator=g).to(device) for s in shapes]
    b = [torch.randn(s, generator=g).to(device) for s in shapes]
    return a, b


def _check_swap(swap, a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """One call of `swap` on copies exchanges every pair's values (both ways, bit for bit)."""
    x, y = [t.clone() for t in a], [t.clone() for t in b]
    swap(x, y)
    for before_a, before_b, after_a, after_b in zip(a, b, x, y, strict=True):
        assert torch.equal(after_a, before_b) and torch.equal(after_b, before_a)


def _foreach_swap(a: list[torch.Tensor], b: list[torch.Tensor],
                  tmp: list[torch.Tensor] | None = None) -> None:
    tmp = tmp if tmp is not None else [torch.empty_like(t) for t in a]
    torch._foreach_copy_(tmp, a)
    torch._foreach_copy_(a, b)
    torch._foreach_copy_(b, tmp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LISTS))
def test_swap_layerfast(benchmark, name, device):
    a, b = _swap_lists(name, device)
    _check_swap(ops.swap_, a, b)
    benchmark.group = f"swap {name} {device}"
    run = _runner(lambda: ops.swap_(a, b), device)
    benchmark.pedantic(run, rounds=_rounds(device, name == "resnet50"), warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LISTS))
def test_swap_foreach_copy(benchmark, name, device):
    a, b = _swap_lists(name, device)
    _check_swap(_foreach_swap, a, b)
    tmp = [torch.empty_like(t) for t in a]

    def swap():
        _foreach_swap(a, b, tmp)

    benchmark.group = f"swap {name} {device}"
    run = _runner(swap, device)
    benchmark.pedantic(run, rounds=_rounds(device, name == "resnet50"), warmup_rounds=1)


def _score_inputs(C: int, device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    V, B = 32, 256
    logits = torch.randn(V, B, C, generator=g).to(device, dtype)
    labels = torch.randint(0, C, (B,), generator=g).to(device)
    ref_pred = logits[0].argmax(-1)
    acc = torch.zeros(V, 4, dtype=torch.float64, device=device)
    return logits, labels, ref_pred, acc


def _check_score(logits, labels, ref_pred) -> None:
    """score_ and score_reference agree on fresh sums: counts exactly, the loss sum to 1e-5
    (two summation orders in float64 of float32 terms; tests/ops/test_ops_score.py)."""
    got, want = (torch.zeros(logits.shape[0], 4, dtype=torch.float64, device=logits.device)
                 for _ in range(2))
    ops.score_(logits, labels, ref_pred, got)
    ops.score_reference(logits, labels, ref_pred, want)
    torch.testing.assert_close(got[:, [0, 1, 3]], want[:, [0, 1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-5, atol=1e-5 * logits.shape[1])


SCORE_CASES = [
    pytest.param(1000, torch.float32, id="C1000-fp32"),
    pytest.param(10, torch.float32, id="C10-fp32"),
    pytest.param(1000, torch.bfloat16, id="C1000-bf16"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("C", "dtype"), SCORE_CASES)
def test_score_layerfast(benchmark, C, dtype, device):
    logits, labels, ref_pred, acc = _score_inputs(C, device, dtype)
    _check_score(logits, labels, ref_pred)
    benchmark.group = f"score V=32 B=256 C={C} {str(dtype)[6:]} {device}"
    run = _runner(lambda: ops.score_(logits, labels, ref_pred, acc), device)
    benchmark.pedantic(run, rounds=_rounds(device, C >= 1000), warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("C", "dtype"), SCORE_CASES)
def test_score_torch_ops(benchmark, C, dtype, device):
    logits, labels, ref_pred, acc = _score_inputs(C, device, dtype)
    _check_score(logits, labels, ref_pred)
    benchmark.group = f"score V=32 B=256 C={C} {str(dtype)[6:]} {device}"
    run = _runner(lambda: ops.score_reference(logits, labels, ref_pred, acc), device)
    benchmark.pedantic(run, rounds=_rounds(device, C >= 1000), warmup_rounds=1)


def _affine_inputs(device: str):
    K, C = 7, 64
    B, hw, dtype, cl = (64, 56, torch.bfloat16, True) if device == "cuda" else (8, 28, torch.float32, False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, K * C, hw, hw, generator=g).to(device, dtype)
    skip = torch.randn(B, C, hw, hw, generator=g).to(device, dtype)
    if cl:
        x, skip = (t.contiguous(memory_format=torch.channels_last) for t in (x, skip))
    mean, var = torch.randn(K * C).to(device), (torch.rand(K * C) + 0.5).to(device)
    w, b = torch.randn(K * C).to(device), torch.randn(K * C).to(device)
    scale = w * torch.rsqrt(var + 1e-5)
    return K, C, x, skip, (mean, var, w, b), (scale, b - mean * scale)


def _bn_add_relu(K, C, x, skip, mean, var, w, b):
    """The torch way: eval BatchNorm, + the shared skip broadcast over K, ReLU."""
    y = torch.nn.functional.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5)
    y = (y.unflatten(1, (K, C)) + skip.unsqueeze(1)).flatten(1, 2)
    return torch.relu(y)


def _check_affine_relu(K, C, x, skip, bn, scale, shift) -> None:
    """The op equals the torch way (tests/ops/test_ops_affine_relu.py's tolerances by dtype)."""
    tol = {"rtol": 1e-5, "atol": 1e-5} if x.dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(ops.affine_relu(x, scale, shift, skip, True),
                               _bn_add_relu(K, C, x, skip, *bn), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_affine_relu_layerfast(benchmark, device):
    K, C, x, skip, bn, (scale, shift) = _affine_inputs(device)
    _check_affine_relu(K, C, x, skip, bn, scale, shift)
    benchmark.group = f"BN+add+ReLU K={K} C={C} {tuple(x.shape)} {str(x.dtype)[6:]} {device}"
    run = _runner(lambda: ops.affine_relu(x, scale, shift, skip, True), device)
    benchmark.pedantic(run, rounds=_rounds(device, False) // 4, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
def test_affine_relu_torch_ops(benchmark, device):
    K, C, x, skip, bn, (scale, shift) = _affine_inputs(device)
    _check_affine_relu(K, C, x, skip, bn, scale, shift)
    B, S = x.shape[0], x.shape[2:]

    def torch_way():
        return _bn_add_relu(K, C, x, skip, *bn)

    benchmark.group = f"BN+add+ReLU K={K} C={C} {(B, K * C, *S)} {str(x.dtype)[6:]} {device}"
    run = _runner(torch_way, device)
    benchmark.pedantic(run, rounds=_rounds(device, False) // 4, warmup_rounds=1)


# BN + ReLU without a residual, in the two forms the CPU kernel once walked element by element
# (session 17): a channels_last conv output, and a 2-D [N, C] one (BatchNorm1d after a Linear).
BN_RELU_CASES = [((8, 256, 28, 28), True), ((2048, 1024), False)]
BN_RELU_IDS = ["channels_last", "2d"]


def _bn_relu_inputs(shape, cl: bool, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    mean, var = torch.randn(C).to(device), (torch.rand(C) + 0.5).to(device)
    w, b = torch.randn(C).to(device), torch.randn(C).to(device)
    scale = w * torch.rsqrt(var + 1e-5)
    bn = (mean, var, w, b)
    torch.testing.assert_close(ops.affine_relu(x, scale, b - mean * scale, None, True),
                               _bn_relu(x, *bn), rtol=1e-5, atol=1e-5)
    return x, bn, (scale, b - mean * scale)


def _bn_relu(x, mean, var, w, b):
    return torch.relu(torch.nn.functional.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "cl"), BN_RELU_CASES, ids=BN_RELU_IDS)
def test_bn_relu_layerfast(benchmark, shape, cl, device):
    x, _, (scale, shift) = _bn_relu_inputs(shape, cl, device)
    benchmark.group = f"BN+ReLU {tuple(x.shape)}{' channels_last' if cl else ''} {device}"
    run = _runner(lambda: ops.affine_relu(x, scale, shift, None, True), device)
    benchmark.pedantic(run, rounds=_rounds(device, False) // 4, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "cl"), BN_RELU_CASES, ids=BN_RELU_IDS)
def test_bn_relu_torch_ops(benchmark, shape, cl, device):
    x, bn, _ = _bn_relu_inputs(shape, cl, device)
    benchmark.group = f"BN+ReLU {tuple(x.shape)}{' channels_last' if cl else ''} {device}"
    run = _runner(lambda: _bn_relu(x, *bn), device)
    benchmark.pedantic(run, rounds=_rounds(device, False) // 4, warmup_rounds=1)

"""The CUDA kernels of `torch.ops.layerfast.*` on a GPU that is not the current device.

Each launcher sets the inputs' device (CUDAGuard) and launches on that device's current stream;
run on cuda:1 while cuda:0 is current, a kernel launched on the wrong device would read foreign
pointers (an illegal address) and a result read back would differ. Needs two GPUs: marked `cuda`
and skipped on machines with fewer.
"""

from __future__ import annotations

import pytest
import torch

from layerfast import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


def test_ops_on_a_non_current_device():
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)

    # swap_: a bytewise pair and a copy-fallback pair (transposed layout)
    a = [torch.randn(1000, generator=g).to(dev), torch.randn(4, 6, generator=g).to(dev)]
    b = [torch.randn(1000, generator=g).to(dev), torch.randn(6, 4, generator=g).to(dev).t()]
    a0, b0 = [t.clone() for t in a], [t.clone() for t in b]
    ops.swap_(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a, b0, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(b, a0, strict=True))
    # tensors on two GPUs: refused before anything is swapped
    c, d = torch.randn(5, device="cuda:0"), torch.randn(5, device="cuda:0")
    with pytest.raises(RuntimeError, match=r"one CUDA device; a\[0\] is on cuda:1 but a\[2\]"):
        ops.swap_(a + [c], b + [d])
    assert all(torch.equal(x, y) for x, y in zip(a, b0, strict=True))

    # score_
    logits = (3 * torch.randn(3, 70, 20, generator=g)).to(dev)
    labels = torch.randint(0, 20, (70,), generator=g).to(dev)
    ref = logits[0].argmax(-1)
    got = torch.zeros(3, 4, dtype=torch.float64, device=dev)
    want = torch.zeros(3, 4, dtype=torch.float64, device=dev)
    ops.score_(logits, labels, ref, got)
    ops.score_reference(logits, labels, ref, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)

    # affine_relu
    x = torch.randn(2, 8, 5, 5, generator=g).to(dev)
    scale, shift = torch.rand(8, generator=g).to(dev), torch.randn(8, generator=g).to(dev)
    r = torch.randn(2, 4, 5, 5, generator=g).to(dev)
    out = ops.affine_relu(x, scale, shift, r, True)
    assert out.device == dev
    torch.testing.assert_close(
        out, ops.affine_relu_reference(x, scale, shift, r, True), rtol=1e-6, atol=1e-6
    )
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0

"""Precision modes on the CPU (review s18): what `fp32` and `bf16` run is what they say,
whatever the caller's own torch state, and the engine's bf16 is a plain bf16 autocast loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.errors import collect_warnings


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    ).to(dtype).eval()


def _case(dtype: torch.dtype = torch.float32):
    m = _net(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 16, 16, generator=g).to(dtype)
    y = torch.randint(0, 10, (96,), generator=g)
    variants = [
        {"1.weight": (torch.randn(128, 256, generator=g) * 0.05).to(dtype)},
        {"3.weight": (torch.randn(64, 128, generator=g) * 0.1).to(dtype),
         "3.bias": torch.zeros(64, dtype=dtype)},
    ]
    return m, variants, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


def _logits(m, variants, batches, precision, **kw):
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg)

    res = Evaluator(m, variants, device="cpu", precision=precision, fanout=False, **kw).run(
        batches, on_logits=hook)
    return res, torch.stack([torch.cat(got[i]) for i in range(len(variants))])


def _plain_loop(m, variants, batches, autocast: bool) -> torch.Tensor:
    """Reset, full forward, keep the logits: the reference the engine is held to."""
    state = {k: v.clone() for k, v in m.state_dict().items()}
    out = []
    with torch.no_grad():
        for v in variants:
            m.load_state_dict(v, strict=False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out.append(torch.cat([m(x) for x, _ in batches]).float())
            m.load_state_dict(state)
    return torch.stack(out)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_fp32_pass_ignores_a_callers_autocast(precision):
    """A caller evaluating inside its own `torch.autocast("cpu", dtype=torch.bfloat16)` (an
    eval inside a mixed-precision training loop) got a bf16 pass recorded as fp32: the fp32
    mode entered no autocast context of its own, so the caller's stayed in force."""
    m, variants, batches = _case()
    ref, l_ref = _logits(m, variants, batches, precision)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res, got = _logits(m, variants, batches, precision)
        assert torch.is_autocast_enabled("cpu")  # the caller's context is back
    assert res.precision == "fp32"
    assert torch.equal(got, l_ref)
    assert torch.equal(res.counts, ref.counts)
    assert torch.equal(l_ref, _plain_loop(m, variants, batches, autocast=False))


def test_fp32_pass_ignores_a_callers_float32_matmul_precision():
    """`torch.set_float32_matmul_precision("medium")` (Lightning's hint, common at the top of
    training scripts) also lets oneDNN run float32 matmuls in bf16 on the CPU (AMX, AVX512-BF16);
    the fp32 mode turned TF32 off for CUDA but left oneDNN's setting as the caller had it, so an
    fp32 pass of a Linear model ran its matmuls in bf16 there, recorded as fp32. Checked by the
    setting a forward sees (any CPU) and by the logits (different only on such CPUs)."""
    m, variants, batches = _case()
    _, l_ref = _logits(m, variants, batches, "fp32")
    seen: list[str] = []
    h = m[1].register_forward_hook(
        lambda *_: seen.append(torch.backends.mkldnn.matmul.fp32_precision))
    torch.set_float32_matmul_precision("medium")
    try:
        before = torch.backends.mkldnn.matmul.fp32_precision
        _, got = _logits(m, variants, batches, "fp32")
        assert torch.get_float32_matmul_precision() == "medium"  # the caller's, back
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    finally:
        torch.set_float32_matmul_precision("highest")
        h.remove()
    assert seen and set(seen) == {"ieee"}, set(seen)
    assert torch.equal(got, l_ref)


def test_bf16_swap_path_is_a_plain_bf16_autocast_loop_bit_for_bit():
    """On the CPU's swap path the engine's bf16 is exactly a plain `torch.autocast("cpu",
    torch.bfloat16)` loop (prefix sharing reuses bf16 activations the same loop computes). The
    existing bf16 tests only bound bf16 against fp32, which autocast to float16 also met (tried:
    every one of them passed with `dtype=torch.float16` in `precision_context`)."""
    m, variants, batches = _case()
    res, got = _logits(m, variants, batches, "bf16")
    assert res.precision == "bf16"
    assert torch.equal(got, _plain_loop(m, variants, batches, autocast=True))
    assert not torch.equal(got, _plain_loop(m, variants, batches, autocast=False))


def test_bf16_on_a_float64_model_is_said_and_recorded_as_what_ran():
    """bf16 autocast leaves float64 tensors alone: a float64 model ran its float64 forward, bit
    for bit the fp32 mode's, recorded as bf16 with no word (docs/decisions.md: options that would
    do nothing are said, and what ran is recorded)."""
    m, variants, batches = _case(torch.float64)
    ref, l_ref = _logits(m, variants, batches, "fp32")
    with collect_warnings() as warned:
        res, got = _logits(m, variants, batches, "bf16")
    assert res.precision == "fp32"
    assert any("float64" in w and "bf16" in w for w in warned), warned
    assert torch.equal(got, l_ref)

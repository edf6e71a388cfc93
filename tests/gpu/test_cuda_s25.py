"""Session 25's real torchvision models, checked on a CUDA GPU (every test here is `cuda`:
skipped without one; `scripts/gpu_session.sh`'s cuda-new-tests step runs them).

Session 25 ran 65 torchvision models (all up to ~100M parameters, random weights, BatchNorm
statistics perturbed) through the Evaluator on the CPU against the naive loop: all traced,
no fallback, fan-out off bit for bit, fan-out on to fp32 rounding (tests/engine/test_zoo_s25.py
keeps seven of them). None of that has run on CUDA, where the defaults differ (bf16,
channels_last, fan-out on, cuDNN's own algorithms per shape). Here the same seven models:

1. fp32 with TF32 off, contiguous, fan-out off and on, against the naive loop on the GPU in
   full float32: counts up to one near-tie flip per variant, the loss sum to rounding; traced;
   with fan-out on every variant but the live-equal one fanned, none falling back.
2. The CUDA default (`precision="auto"`: bf16 autocast, channels_last, fan-out on) against a
   plain loop of the model's own forward under bf16 autocast in channels_last on the GPU:
   the logits within 5% of the largest one (bf16 keeps 8 bits; the fan-out's fused glue
   rounds in other places, docs/engine.md "Exactness"), traced, the model's state unchanged.

The bound in 2 is looser than the CPU's on purpose: it catches a wrong variant (a reset that
did not happen, rows of another variant: logits off by O(1) of their scale), not rounding.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.naive import naive_evaluate
from layerfast.engine.precision import tf32_allowed
from layerfast.models import load_tensors
from tests.engine.test_engine_fuzz2 import _perturb_norms
from tests.engine.test_zoo_s25 import ZOO, _zoo_variants

DEVICE = "cuda"
N, BS = 24, 16  # a partial last batch


def _case(name: str) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list]:
    tvm = pytest.importorskip("torchvision.models")
    kw, side = ZOO[name]
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=10, **kw).eval()
    _perturb_norms(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 3, side, side, generator=g), torch.randint(0, 10, (N,), generator=g)
    return model, _zoo_variants(model), [(x[i:i + BS], y[i:i + BS]) for i in range(0, N, BS)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(
        torch.equal(before[k], after[k].to(before[k].device)) for k in before)


@pytest.mark.cuda
@pytest.mark.parametrize("fanout", [False, True])
@pytest.mark.parametrize("name", list(ZOO))
def test_fp32_on_cuda_matches_the_naive_loop(name: str, fanout: bool) -> None:
    model, variants, batches = _case(name)
    with tf32_allowed(False):
        want = naive_evaluate(copy.deepcopy(model), variants, lambda: batches, device=DEVICE)
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = Evaluator(model, variants, device=DEVICE, precision="fp32", layout="contiguous",
                        batch_size=BS, fanout=fanout).run(batches)
    plan, got = res.plan, res.counts.cpu()
    what = f"{name} fanout={fanout}: plan {plan}"
    assert plan["untraced"] is None, what
    if fanout:
        assert plan["fanned_variants"] == len(variants) - 1, what
        assert plan["fanout_fallbacks"] == {}, what
    diff = (got[:, [0, 1, 3]] - want[:, [0, 1, 3]]).abs().max().item()
    assert diff <= 1, (what, got, want)
    assert torch.allclose(got[:, 2], want[:, 2], rtol=1e-4, atol=1e-3), (what, got, want)
    assert _same_state(before, model), what


def _bf16_loop(model: nn.Module, variants: list, batches: list) -> torch.Tensor:
    """Reset, the model's own forward under bf16 autocast in channels_last on the GPU (TF32
    allowed, as the bf16 mode runs it), the logits as float32 on the CPU."""
    model = copy.deepcopy(model).to(DEVICE).to(memory_format=torch.channels_last)
    out = []
    with torch.no_grad(), tf32_allowed(True):
        for ov in variants:
            m = copy.deepcopy(model)
            load_tensors(m, {k: t.to(DEVICE) for k, t in ov.items()}, strict=False)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                out.append(torch.cat([
                    m(x.to(DEVICE).to(memory_format=torch.channels_last)).float().cpu()
                    for x, _ in batches]))
    return torch.stack(out)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(ZOO))
def test_cuda_default_matches_a_bf16_loop(name: str) -> None:
    model, variants, batches = _case(name)
    ref = _bf16_loop(model, variants, batches)
    before = _state(model)
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits) -> None:
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg.float().cpu())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = Evaluator(model, variants, device=DEVICE, batch_size=BS).run(batches, on_logits=hook)
    what = f"{name}: plan {res.plan}"
    assert res.plan["untraced"] is None, what
    logits = torch.stack([torch.cat(got[i]) for i in range(len(variants))])
    scale = max(ref.abs().max().item(), 1.0)
    err = (logits - ref).abs().max().item()
    assert err <= 0.05 * scale, f"{what}: max |Δlogit| {err:.3g} of {scale:.3g}"
    assert _same_state(before, model), what

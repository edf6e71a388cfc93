"""The fanned unit itself (session 20): the forms of conv / linear / BatchNorm a unit takes, run
as K stacked weight sets (`fanrun.apply_fanned`), against the naive loop.

1. A BatchNorm applied to a K·B batch (a `--bn separate` unit on a shared conv output, a BN after
   a fanned Linear, every BN in `glue="unfolded"`) ran its per-variant affine in x's dtype: under
   bf16 autocast (the CUDA default) scale and shift were rounded to bf16 first, and x·scale
   cancelled against shift with bf16 errors, ~17x the error of the model's own BatchNorm, which
   computes in float32. The fanned and the swapped bf16 runs of one model disagreed.
2. A sparse variant tensor failed in `copy_` with a bare RuntimeError (Python API).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanrun import GLUE_MODES, apply_fanned, stack_module

# ---- 1. a BatchNorm on a K·B batch, in bf16 ------------------------------------------------


def _offset_bn(C: int) -> nn.BatchNorm2d:
    """An eval BN whose running mean is large against its std: x·scale and shift are both
    large and cancel, as after a ReLU or a biased conv."""
    bn = nn.BatchNorm2d(C).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g) * 3 + 5)
        bn.running_var.copy_(torch.rand(C, generator=g) * 0.5 + 0.05)
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
    return bn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_bn_on_a_narrow_batch_is_as_exact_as_the_models_own(dtype: torch.dtype) -> None:
    C, B, K = 32, 16, 3
    bn = _offset_bn(C)
    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(B, C, 6, 6, generator=g) * bn.running_var.sqrt()[:, None, None]
    x = (x32 + bn.running_mean[:, None, None]).to(dtype)
    with torch.no_grad():
        st = stack_module(bn, [{} for _ in range(K)])  # K copies of the final BN
        y = apply_fanned(bn, st, x, False, K)
        own = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                           bn.eps)
        exact = bn(x.float())
    assert y.dtype == dtype and y.shape == (K * B, C, 6, 6)
    own_err = (own.float() - exact).abs().mean()
    for k in range(K):
        err = (y[k * B:(k + 1) * B].float() - exact).abs().mean()
        assert err <= 1.5 * own_err, (err, own_err)  # was ~17x (bf16)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x) + 8.0)).flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
def test_a_bn_unit_fanned_in_bf16_gives_the_swapped_runs_numbers(glue: str) -> None:
    """`--bn separate` under bf16 autocast (CPU autocast here, CUDA's default mode): the BN
    unit's group fans out on the shared conv output; its loss must be the swap path's."""
    torch.manual_seed(0)
    m = _BNNet().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 6, 6, generator=g), torch.randint(0, 10, (64,), generator=g)
    with torch.no_grad():
        h = m.conv(x) + 8.0
        m.bn.running_mean.copy_(h.mean((0, 2, 3)))
        m.bn.running_var.copy_(h.var((0, 2, 3)))
    vs = [{"bn.weight": m.bn.weight.detach() * (1 + 0.1 * k), "bn.bias": m.bn.bias.detach() + 0.1 * k}
          for k in range(1, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fanned = Evaluator(m, vs, device="cpu", precision="bf16", fanout=True,
                           glue=glue).run([(x, y)])
        swapped = Evaluator(m, vs, device="cpu", precision="bf16", fanout=False).run([(x, y)])
    assert fanned.plan["fanned_variants"] == 3, fanned.plan
    # was 0.37 apart (a loss sum over 64 samples)
    assert torch.allclose(fanned.counts[:, 2], swapped.counts[:, 2], rtol=1e-5, atol=1e-3), (
        fanned.counts, swapped.counts)


# ---- 2. a sparse variant tensor ------------------------------------------------------------


@pytest.mark.parametrize("fanout", [True, False])
def test_a_sparse_variant_tensor_is_refused_with_a_clear_error(fanout: bool) -> None:
    """It failed in `copy_` with a bare RuntimeError ("copy_() between dense and sparse Tensors
    is not implemented"); the checkpoint loader already refuses sparse tensors by name."""
    from layerfast.errors import LayerfastError

    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)).eval()
    w = m[2].weight.detach()
    vs = [{"2.weight": w.to_sparse()}, {"2.weight": w * 2}]
    x = torch.randn(4, 8)
    with pytest.raises(LayerfastError, match=r"not dense.*2\.weight: sparse_coo.*to_dense"):
        Evaluator(m, vs, device="cpu", precision="fp32", fanout=fanout).run(
            [(x, torch.zeros(4, dtype=torch.long))])

"""Fan-out (the GPU default) accepts per-sample reductions and torchvision's stochastic depth
in eval: `x.mean([2, 3])` (MnasNet, SE blocks) and `stochastic_depth(..., training=False)`
(EfficientNet, Swin, ConvNeXt) kept every group before them on the swap path. Exercised on the
CPU with `fanout="on"`: counts equal the swap path's, logits to rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator


class Reduced(nn.Module):
    """conv -> ReLU -> a reduction chosen by `how` -> linear head."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))
        if self.how == "mean23":
            h = h.mean([2, 3])
        elif self.how == "torch.mean":
            h = torch.mean(h, dim=(2, 3))
        elif self.how == "sum-1":
            h = h.flatten(2).sum(-1)
        elif self.how == "whole":  # every sample mixed: must not fan
            h = h.flatten(2).mean(-1) - h.mean()
        return self.fc(h)


class Deep(nn.Module):
    """Two conv blocks with torchvision's StochasticDepth after each, as EfficientNet has."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.sd = StochasticDepth(0.5, "row")
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = h + self.sd(torch.relu(self.block(h)))
        return self.fc(h.mean([2, 3]))


def _run(model: nn.Module, fanout: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    w = model.conv.weight
    variants = [{"conv.weight": torch.randn(w.shape, generator=g) * w.std() * 3}
                for _ in range(3)]
    x = torch.randn(7, 3, 6, 6, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    return Evaluator(model.eval(), variants, device="cpu", precision="fp32", fanout=fanout).run(
        [(x[:4], y[:4]), (x[4:], y[4:])])


@pytest.mark.parametrize("how", ["mean23", "torch.mean", "sum-1"])
def test_per_sample_reductions_fan_out_and_count_as_the_swap_path(how: str) -> None:
    torch.manual_seed(0)
    m = Reduced(how)
    on = _run(m, "on")
    off = _run(m, "off")
    assert on.plan["fanned_variants"] == 3 and on.plan["swapped_variants"] == 0, on.plan
    assert torch.equal(on.counts[:, [0, 1, 3]], off.counts[:, [0, 1, 3]])
    assert torch.allclose(on.counts[:, 2], off.counts[:, 2], rtol=1e-5, atol=1e-5)


def test_a_reduction_over_the_whole_tensor_does_not_fan() -> None:
    torch.manual_seed(0)
    m = Reduced("whole")
    on = _run(m, "on")
    off = _run(m, "off")
    assert on.plan["fanned_variants"] == 0, on.plan  # h.mean() mixes the K variants' samples
    assert torch.equal(on.counts, off.counts)


def test_stochastic_depth_in_eval_fans_out() -> None:
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = Deep()
    on = _run(m, "on")
    off = _run(m, "off")
    assert on.plan["fanned_variants"] == 3, on.plan
    assert torch.equal(on.counts[:, [0, 1, 3]], off.counts[:, [0, 1, 3]])
    assert torch.allclose(on.counts[:, 2], off.counts[:, 2], rtol=1e-5, atol=1e-5)


def test_a_negative_dim_that_is_the_batch_dim_still_falls_back() -> None:
    """`mean(-2)` on [B, C] reduces over the batch: recorded at planning, refused at run."""

    class BatchMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x)).mean([2, 3])
            return self.fc(h - h.mean(-2, keepdim=True))

    torch.manual_seed(0)
    m = BatchMean()
    on = _run(m, "on")
    off = _run(m, "off")
    assert on.plan["fanned_variants"] == 0
    assert torch.equal(on.counts, off.counts)

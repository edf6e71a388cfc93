"""Adversarial models against the fan-out proof, round 4 (session 20): interactions of forms
the proof accepts one by one. Each model here was fanned and gave other numbers than the naive
loop; each must now give the naive loop's counts (refused by the proof, or sent to the swap
path at run time), while the legitimate forms next to it keep fanning.

1. A fanned step that returns, in eager mode, a view of a value the K variants share
   (`x2.view(h.size(0), -1)`, `x2.to(h)`, `x2[:, :h.size(1)]`: fanned only through a size, a
   template or an index bound) holds a K-fold copy when fanned; a later in-place write into
   the shared value (`x2.relu_()`, an `nn.ReLU(inplace=True)`, `x2 += 1`) reaches the view in
   eager mode and not the copy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.fanout.test_fanatk_s19 import _data, _not_fanned, _same_as_naive

# ---- 1. a write into a shared value that a fanned step viewed ------------------------------


class ViewThenWrite(nn.Module):
    """`view`: how the fanned step views the shared `x2`; `write`: how x2 is then written."""

    def __init__(self, view: str, write: str) -> None:
        super().__init__()
        self.view, self.write = view, write
        self.lin = nn.Linear(8, 8)
        self.lin2 = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        x2 = x * 2  # shared by the K variants
        if self.view == "view":
            g = x2.view(h.size(0), -1)  # eager: a view of x2
        elif self.view == "to":
            g = x2.to(h)  # eager: x2 itself
        else:
            g = x2[:, : h.size(1)]  # eager: a view of x2
        if self.write == "relu_":
            x2.relu_()
        elif self.write == "module":
            self.act(x2)
        elif self.write == "iadd":
            x2 += 1
        elif self.write == "view":  # through another view of x2
            x2[:, :4].mul_(-1)
        else:  # writes into the variants' own value and into a private shared one: fine
            h = h.relu_() + self.lin2(x).relu_()
        return self.fc(h + g)


@pytest.mark.parametrize("write", ["relu_", "module", "iadd", "view"])
@pytest.mark.parametrize("view", ["view", "to", "slice"])
def test_a_write_into_a_shared_value_a_fanned_step_viewed_is_not_fanned(
    view: str, write: str
) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(ViewThenWrite(view, write), "lin", _data())
    _not_fanned(plan, "in place")


@pytest.mark.parametrize("view", ["view", "to", "slice"])
def test_a_fanned_view_of_a_shared_value_nobody_writes_still_fans(view: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(ViewThenWrite(view, "none"), "lin", _data())
    assert plan["fanned_variants"] == 3 and not plan["fanout_fallbacks"], plan


# ---- 2. `view(-1, N)`: the batch entry inferred ----------------------------------------------


class InferredBatch(nn.Module):
    """`x.view(-1, 16 * 5 * 5)` (the classic PyTorch tutorial's flatten): per sample exactly
    where N is each sample's size; `split` views each sample as 2 rows of 32 (and back)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # [B, 4, 8, 8]
        if self.how == "flatten":
            return self.fc(h.view(-1, 4 * 8 * 8))
        if self.how == "reshape3":
            return self.fc(h.reshape(-1, 16, 16).flatten(1))
        if self.how == "split":  # each sample -> 2 rows of 128: a row is not a sample
            z = h.view(-1, 128).softmax(1)  # over half a sample
            return self.fc(z.view(h.size(0), -1))
        # "mixed": a fanned value computed with the shared input, its batch inferred
        return self.fc((h * x).view(-1, 256))


@pytest.mark.parametrize("glue", ["fused", "fold", "unfolded"])
@pytest.mark.parametrize("how", ["flatten", "reshape3", "mixed"])
def test_a_view_with_the_batch_inferred_fans_out_and_matches(how: str, glue: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(InferredBatch(how), "conv", _data(shape=(1, 8, 8)), glue=glue)
    assert plan["fanned_variants"] == 3 and not plan["fanout_fallbacks"], plan


def test_a_view_with_the_batch_inferred_that_splits_samples_is_not_fanned() -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(InferredBatch("split"), "conv", _data(shape=(1, 8, 8)))
    assert plan["fanned_variants"] == 0, plan

"""Adversarial models against the fan-out proof (session 20, round 3): each one was accepted
by `fanout.prove_fan` and ran fanned with other numbers than the naive loop. Every model here
must now give the naive loop's counts, its loss to rounding, by being refused by the proof or
sent to the swap path at run time.

1. A fanned value that is not the K variants' batch. A step is fanned when any argument is,
   so `p.to(h)` (a `to` template), `p * h.size(1)` (a size) make the tensor `p` fanned with
   its own rows, not K·B. A view then took its dim 0 as K·B (`p.to(h).view(h.size(0), -1)`
   cut a [B·N] tensor into K·B rows of N/K where eager mode has B rows of N), a view's batch
   entry `p.to(h).size(0)` (B) put K variants' rows of `h` in one row, and an overridden
   module applied to `p.to(h)` split p's rows into K blocks, one per variant.
2. `nn.Softmax(dim=1)` / `nn.LogSoftmax` (not wrong numbers: a slow path) were refused as "not on
   the allow-list" although the proof has a dim check for them that `F.softmax` passes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.fanout.test_fanatk_s19 import _data, _not_fanned, _same_as_naive

# ---- 1. fanned values that are not the K variants' batch ------------------------------------


class Laundered(nn.Module):
    """lin -> a tensor made fanned by a size or a `to` template, read as if it were K·B."""

    def __init__(self, how: str, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.register_buffer("tok", torch.randn(shape))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "to-view":  # [18, 8] -> [B, 144/B]; fanned [K·B, 144/(K·B)]
            g = self.tok.to(h).view(h.size(0), -1).sum(1, keepdim=True)
        elif self.how == "size-reshape":
            g = (self.tok * h.size(1)).reshape(h.shape[0], -1).sum(1, keepdim=True)
        elif self.how == "batch-entry":  # B from the buffer: fanned, K variants in one row
            g = h.view(self.tok.to(h).size(0), -1).softmax(1).view(h.size(0), -1)
        else:  # "unit-on-buffer": the unit applied to [R, 8], split into K blocks of R/K rows
            g = self.lin(self.tok.to(h)).view(h.size(0), -1)[:, :8]
        return self.fc(h * g)


@pytest.mark.parametrize(
    ("how", "shape", "n"),
    [
        ("to-view", (18, 8), 6),
        ("size-reshape", (1, 144), 6),
        ("batch-entry", (6, 8), 6),
        ("unit-on-buffer", (6, 8), 2),
    ],
)
def test_a_fanned_value_that_is_not_the_batch_is_not_read_as_k_times_b(
        how: str, shape: tuple[int, ...], n: int) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(Laundered(how, shape), "lin", _data(n=n))
    _not_fanned(plan, "not the K variants' batch")


# ---- 2. nn.Softmax / nn.LogSoftmax modules --------------------------------------------------


@pytest.mark.parametrize("glue", ["fused", "unfolded"])
def test_softmax_modules_over_a_sample_dim_fan_and_match_naive(glue: str) -> None:
    """`F.softmax(h, 1)` fanned but `nn.Softmax(dim=1)` did not: the module's dim check sat
    behind the allow-list test it never passed ("module type not on the allow-list")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softmax(dim=1), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 16), nn.LogSoftmax(dim=-1), nn.Linear(16, 10))
    plan = _same_as_naive(model, "0", _data(shape=(1, 8, 8)), glue=glue)
    assert plan["fanned_variants"] == 3 and not plan["fanout_fallbacks"], plan


@pytest.mark.parametrize(("dim", "words"), [(0, "batch dim"), (None, "batch dim"),
                                            (-2, "NotPerSample")])
def test_softmax_modules_over_the_batch_dim_are_not_fanned(dim: int | None, words: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Softmax(dim=dim), nn.Linear(16, 10))
    plan = _same_as_naive(model, "0", _data())
    _not_fanned(plan, words)

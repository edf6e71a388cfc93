"""Adversarial models against the session-20 fan-out allow-list additions (exp, abs, clamp,
pow, softmax, squeeze/unsqueeze, max/min, normalize, unflatten, expand_as, negative size
items, 0-d shared values, out=). Each must give the naive loop's counts, fanned or not.

1. A per-channel function on the fold form with a keyword tensor argument that is its own
   input (`torch.exp(g, out=g)`, `torch.abs(g, out=g)`, `torch.clamp(g, 0, 1, out=g)`): the
   fold path passed the unresolved `Ref` on to torch, a TypeError, so every such group fell
   back to the swap path ("TypeError: exp(): argument 'out' must be Tensor, not Ref").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine.fanrun import GLUE_MODES
from tests.test_fanatk_s19 import _data, _same_as_naive

# ---- 1. a keyword tensor argument on the fold form ------------------------------------------

_OUT_SELF = {
    "exp": lambda g: torch.exp(g, out=g),
    "abs": lambda g: torch.abs(g, out=g),
    "clamp": lambda g: torch.clamp(g, -0.5, 0.5, out=g),
}


class OutSelf(nn.Module):
    """A conv's output scaled (`g`, a fold-form value in the fold glues), then `op(g, out=g)`."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.conv(x) * 0.1
        return self.fc(_OUT_SELF[self.op](g).flatten(1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("op", sorted(_OUT_SELF))
def test_a_keyword_ref_on_the_fold_form_fans(op: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(OutSelf(op), "conv", _data(shape=(1, 4, 4)), glue=glue, layout=layout)
    assert plan["fanned_variants"] > 0 and not plan["fanout_fallbacks"], plan

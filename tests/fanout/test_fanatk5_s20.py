"""Adversarial models against the session-20 fan-out allow-list additions (exp, abs, clamp,
pow, softmax, squeeze/unsqueeze, max/min, normalize, unflatten, expand_as, negative size
items, 0-d shared values, out=). Each must give the naive loop's counts, fanned or not.

1. A per-channel function on the fold form with a keyword tensor argument that is its own
   input (`torch.exp(g, out=g)`, `torch.abs(g, out=g)`, `torch.clamp(g, 0, 1, out=g)`): the
   fold path passed the unresolved `Ref` on to torch, a TypeError, so every such group fell
   back to the swap path ("TypeError: exp(): argument 'out' must be Tensor, not Ref").
3. A new elementwise form whose first argument is the shared value (`torch.pow(u, h)`,
   `u.max(h)`, `torch.clamp(u, min=h)`, `u.clip(h, None)`, `torch.abs(u.expand_as(h))`) returns
   a new tensor, but was not in
   `optables`' fresh lists: the proof took it for a possible view of `u`, so any later in-place
   write (`.sub_`, `.relu_()`) refused the group ("writes in place into a view of a value the K
   variants share").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.fanrun import GLUE_MODES
from tests.fanout.test_fanatk_s19 import _data, _same_as_naive

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


# ---- 2. the brief's adversarial edges: each matches the naive loop, fanned or not -----------

_EDGES = {
    # negative dims that reach the batch dim of a low-rank value
    "unsqueeze(-2) of rank 1": lambda s, h, x: h[:, 0].unsqueeze(-2).mT + h,
    "squeeze(-2) of rank 2": lambda s, h, x: h[:, :1].squeeze(-2) * h,
    "amax((-1, -2)) of rank 2": lambda s, h, x: h - h.amax(dim=(-1, -2), keepdim=True),
    "max(-2) of rank 2": lambda s, h, x: h - h.max(dim=-2, keepdim=True).values,
    "normalize(-2) of rank 2": lambda s, h, x: F.normalize(h, dim=-2),
    "shape[-1] of rank 1": lambda s, h, x: h / h[:, 0].shape[-1],
    "unflatten(-2) of rank 2": lambda s, h, x: h.unflatten(-2, (-1, 1)).flatten(1),
    # operands that broadcast across the batch
    "max(h, x.mean(0))": lambda s, h, x: torch.max(h, x.mean(0)),
    "clamp(h, min=x[:1])": lambda s, h, x: h.clamp(min=x[:1]),
    "x.mean(0, keepdim).expand_as(h)": lambda s, h, x: h * x.mean(0, keepdim=True).expand_as(h),
    "p1 ** h": lambda s, h, x: s.p1 ** (h * 0.1),
    "h.abs().pow(x)": lambda s, h, x: h.abs().pow(x),
    "max(h, p)": lambda s, h, x: torch.max(h, s.p),
    "h * max(1).indices": lambda s, h, x: h * h.max(1, keepdim=True).indices.float(),
    # in-place writes into shared values or views of them
    "u.sub_(h[:, :1]) then u": lambda s, h, x: _then(lambda u: u.sub_(h[:, :1]), x * 2, h),
    "u.expand_as(h).sub_(h) then u": lambda s, h, x: _then(lambda u: u.expand_as(h).sub_(h),
                                                           x * 2, h),
    "u.expand_as(h), u.add_(1)": lambda s, h, x: _viewed(lambda u: u.expand_as(h), x * 2, h),
    "z.expand_as(h), z.add_(1)": lambda s, h, x: _viewed(lambda z: z.expand_as(h), x.sum(), h),
    "z.sub_(h.size(1)) between uses": lambda s, h, x: _between(x.sum(), h),
}


def _then(write, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    write(u)
    return h * u


def _viewed(view, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    v = view(u)
    u.add_(1.0)
    return h * v


def _between(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    a = h * z
    z.sub_(h.size(1))
    return a + h * z


class Edge(nn.Module):
    """`how` applied to a Linear's [B, 8] output `h` and the shared input `x` [B, 8]."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.p = nn.Parameter(torch.randn(8))
        self.p1 = nn.Parameter(torch.rand(1) + 0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_EDGES[self.how](self, self.lin(x), x))


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", list(_EDGES))
def test_adversarial_edges_match_the_naive_loop(how: str, glue: str) -> None:
    torch.manual_seed(0)
    # B = 6: the values of rank 1 and 2 above are eager-valid only where no dim equals B
    _same_as_naive(Edge(how), "lin", _data(), glue=glue)


# ---- 3. the new elementwise forms return new tensors ------------------------------------------

_FRESH_THEN_WRITE = {
    "torch.pow(u, h).sub_(u)": lambda h, u: torch.pow(u.abs() + 0.5, h.clamp(-1, 1)).sub_(u),
    "u.max(h).relu_()": lambda h, u: u.max(h).relu_(),
    "torch.min(u, h).add_(1)": lambda h, u: torch.min(u, h).add_(1.0),
    "torch.clamp(u, min=h).add_(1)": lambda h, u: torch.clamp(u, min=h).add_(1.0),
    "u.clip(h, None).mul_(2)": lambda h, u: u.clip(h, None).mul_(2.0),
    # one-argument forms of a view of `u` the fanned step took (`u.expand_as(h)`)
    "torch.abs(u.expand_as(h)).sub_(h)": lambda h, u: torch.abs(u.expand_as(h)).sub_(h),
    "F.softplus(u.expand_as(h)).sub_(h)": lambda h, u: F.softplus(u.expand_as(h)).sub_(h),
    "F.normalize(u.expand_as(h)).sub_(h)": lambda h, u: F.normalize(u.expand_as(h)).sub_(h),
}


class FreshThenWrite(nn.Module):
    """`how`: a new elementwise form on the shared `u` (first) and the fanned `h`, written in
    place; `u` is read again afterwards (a write into it would have to reach that read)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x * 0.5
        return self.fc(_FRESH_THEN_WRITE[self.how](self.lin(x), u) + u)


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", list(_FRESH_THEN_WRITE))
def test_a_new_elementwise_form_on_a_shared_value_is_fresh(how: str, glue: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(FreshThenWrite(how), "lin", _data(), glue=glue)
    assert plan["fanned_variants"] > 0 and not plan["fanout_refused"], plan
    assert not plan["fanout_fallbacks"], plan

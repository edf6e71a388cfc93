"""`h.reshape(h.shape[0], -1)` fans out as `h.reshape(h.size(0), -1)` does (session 19).

`v.shape` traces as `getattr(v, "shape")`, which was not on fan-out's allow-list, so the most
common way custom models flatten before their head ran every group on the swap path (exact,
slow). It is now read as `v.size()`: item 0 (K·B when fanned) only as a view/reshape's batch
entry, the other items freely; the shape used whole, item 0 in arithmetic, or a negative item
is refused, with the reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanout import prove_fan
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate


class Flat(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if self.how == "shape0":
            h = h.reshape(h.shape[0], -1)
        elif self.how == "shape-items":  # every item read, item 0 as the batch entry only
            n, c, hh, ww = h.shape
            h = h.view(n, c * hh * ww)
        elif self.how == "shape-arith":  # K·B when fanned: would scale by 1/K
            h = h.reshape(h.shape[0], -1) * (8.0 / h.shape[0])
        elif self.how == "shape-whole":  # the whole shape used
            h = (h + h.new_zeros(h.shape)).reshape(h.size(0), -1)
        elif self.how == "shape-neg":  # item -4 is the batch dim of a rank-4 value
            h = h.reshape(h.shape[-4], -1)
        return self.fc(h)


def _run(how: str) -> dict:
    torch.manual_seed(0)
    model = Flat(how).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    variants = [{"conv.weight": torch.randn(4, 3, 3, 3, generator=g)} for _ in range(3)]
    x = torch.randn(7, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run(batches)
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    return res.plan


@pytest.mark.parametrize("how", ["shape0", "shape-items"])
def test_shape_item_zero_as_the_batch_entry_fans_and_matches_naive(how: str) -> None:
    plan = _run(how)
    assert plan["fanned_variants"] == 3 and plan["fanout_refused"] == {}, plan
    assert plan["fanout_fallbacks"] == {}, plan


@pytest.mark.parametrize(("how", "words"), [("shape-arith", "batch size"),
                                            ("shape-whole", "whole size"),
                                            ("shape-neg", "whole size")])
def test_other_uses_of_the_shape_are_refused_with_a_reason(how: str, words: str) -> None:
    prog = Program(Flat(how).eval())
    keys = {"conv.weight"}
    why = prove_fan(prog, prog.start_cut(keys), keys)
    assert isinstance(why, str) and words in why, why
    plan = _run(how)
    assert plan["fanned_variants"] == 0, plan

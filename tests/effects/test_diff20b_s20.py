"""Review of session 20's later commits (d2bc08f..91a4b0a), second pass: the effects check's
values reached through Python state.

1. A step that keeps in Python state a tensor it made but does not return (`self.h =
   h.clone()`, `self.feat = torch.relu(h)` in a replaced forward) and a later step that reads
   (or writes into) it: a variant started between the two read the tensor the previous run
   had left there (a's last variant's, for c's variants), other numbers than the naive loop.
   The check took only the steps' values as holders; such a tensor is the step's as well.
2. The same with a tensor no step made that a step writes into (`self.keep.copy_(h)`: a
   plain tensor attribute, or a buffer no variant changes): the writer is its producer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.evaluator import Evaluator
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate
from tests.effects.test_effects3_s20 import _Four
from tests.engine.test_traceatk_s19 import _batches
from tests.fanout.test_fan_s19 import _variants

# ---- 1. a tensor a step made, kept in Python state, not its value ----------------------------


def _keeps_own(how: str) -> nn.Module:
    """b keeps a tensor it makes from its input h (not its value); d reads it (`read`), or c
    writes into it and d reads it (`write`)."""
    torch.manual_seed(0)
    m = _Four()
    box: dict[str, torch.Tensor] = {}
    b, c, d = m.b, m.c, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        box["h"] = h.clone() if how != "derived" else torch.relu(h) * 2
        return F.linear(h, b.weight, b.bias)

    def fc(g: torch.Tensor) -> torch.Tensor:
        box["h"].mul_(2)
        return F.linear(g, c.weight, c.bias)

    if how == "write":
        m.c.forward = fc
    m.b.forward = fb
    m.d.forward = lambda g: F.linear(g + box["h"], d.weight, d.bias)
    return m.eval()


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("how", ["read", "derived", "write"])
def test_a_tensor_a_step_keeps_in_python_state_is_its_own(how: str, fanout: bool) -> None:
    """c's variants start after b and ran d on the tensor a's last variant had left in the
    state (or, written into by c, the baseline's doubled once more per run): b is made
    opaque, so every variant runs b again, and the counts equal the naive loop's."""
    prog = Program(_keeps_own(how))
    found = prog.unseen_effects(torch.randn(4, 64))
    b = next(s.index for s in prog.steps if s.target == "b")
    assert found is not None and b in found[0] | found[1], found
    m = _keeps_own(how)
    variants = _variants(m, ["a", "c"], n=3)
    batches = _batches()
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    want = naive_evaluate(_keeps_own(how), variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


class _Temps(nn.Module):
    """Intermediates inside steps (freed when the step ends) at addresses later reused: not
    tensors kept past their step."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x) * 2 + 1)
        g = torch.sigmoid(self.b(h) - h.mean(1, keepdim=True))
        return self.c(g * 3)


def test_a_plain_model_keeps_no_tensors_past_its_steps() -> None:
    prog = Program(_Temps().eval())
    assert prog.unseen_effects(torch.randn(4, 64)) == (set(), set())


# ---- 2. a write into state no step made: a plain tensor attribute, a buffer ------------------


def _writes_state(how: str) -> nn.Module:
    """b copies its input h into a tensor of its own (a plain attribute, or a buffer no
    variant changes); d reads it back."""
    torch.manual_seed(0)
    m = _Four()
    b, d = m.b, m.d
    if how == "buffer":
        m.b.register_buffer("keep", torch.zeros(64, 64), persistent=False)
    else:
        m.b.keep = torch.zeros(64, 64)

    def fb(h: torch.Tensor) -> torch.Tensor:
        b.keep[: h.shape[0]].copy_(h)
        return F.linear(h, b.weight, b.bias)

    m.b.forward = fb
    m.d.forward = lambda g: F.linear(g + b.keep[: g.shape[0]], d.weight, d.bias)
    return m.eval()


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("how", ["attribute", "buffer"])
def test_a_write_into_a_tensor_of_python_state_makes_the_writer_opaque(
    how: str, fanout: bool
) -> None:
    """c's variants start after b and ran d on what a's last variant had copied into b's
    tensor: the writer is made opaque, and the counts equal the naive loop's."""
    prog = Program(_writes_state(how))
    found = prog.unseen_effects(torch.randn(8, 64))
    b = next(s.index for s in prog.steps if s.target == "b")
    assert found is not None and b in found[0] | found[1], found
    m = _writes_state(how)
    variants = _variants(m, ["a", "c"], n=3)
    batches = _batches()
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    want = naive_evaluate(_writes_state(how), variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)

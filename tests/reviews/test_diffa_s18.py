"""Review of the session's engine changes (diffa, s18): regressions they introduced."""

from __future__ import annotations

import torch
from torch import nn

from layerfast.engine import Evaluator


def _batches(n: int = 40, d: int = 12, c: int = 5) -> list:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    return [(x[:24], y[:24]), (x[24:], y[24:])]


class SparseProjection(nn.Module):
    """A fixed sparse projection held as a (non-persistent) sparse buffer: `torch.equal` has no
    sparse kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 5)
        self.register_buffer("proj", (torch.eye(16) * 2).to_sparse(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(torch.sparse.mm(self.proj, h.t()).t())


def test_a_model_with_a_sparse_buffer_is_evaluated_and_given_back_as_it_came() -> None:
    """borrow's new value check (`torch.equal` on every buffer) raised NotImplementedError on a
    sparse buffer when the pass ended, which failed a run that worked before, and left the
    model in eval mode (the rest of the restore never ran)."""
    torch.manual_seed(0)
    m = SparseProjection().train()
    batches = _batches()
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    res = Evaluator(m, [{}, {"b.weight": w}], device="cpu", precision="fp32").run(batches)
    assert m.training and all(c.training for c in m.children())
    m.eval()
    with torch.no_grad():
        base = sum(int((m(x).argmax(1) == y).sum()) for x, y in batches)
    assert res.counts[0, 0].item() == base

"""Models with unusual forwards, through `Evaluator` and a custom `--arch` (session 18 review):
each case against a naive oracle (reset the unit with `load_state_dict`, full eval forward under
no_grad, count), with fan-out off and on."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.tracing import trace


def _oracle(model: nn.Module, variants: list[dict], batches: list) -> torch.Tensor:
    """correct@1 and agreement per variant: the final model's state before every variant,
    then the variant's tensors, a full eval-mode forward over every batch."""
    base = copy.deepcopy(model.state_dict())
    model.eval()
    out = torch.zeros(len(variants), 2, dtype=torch.float64)
    with torch.no_grad():
        model.load_state_dict(base)
        ref = [model(x).argmax(1) for x, _ in batches]
        for i, v in enumerate(variants):
            model.load_state_dict(base)
            model.load_state_dict(v, strict=False)
            for j, (x, y) in enumerate(batches):
                p = model(x).argmax(1)
                out[i, 0] += (p == y).sum().item()
                out[i, 1] += (p == ref[j]).sum().item()
        model.load_state_dict(base)
    return out


def _variants(model: nn.Module, keys: list[list[str]]) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    sd = model.state_dict()
    return [{}] + [{k: torch.randn(sd[k].shape, generator=g) for k in ks} for ks in keys]


def _batches(n: int = 40, d: int = 12, c: int = 5) -> list:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    return [(x[:24], y[:24]), (x[24:], y[24:])]


class CallCounter(nn.Module):
    """A forward that counts its calls in a buffer (`self.calls += 1`, the buffer re-assigned)
    and reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 5)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.b(torch.relu(self.a(x))) * (self.calls > 0)


def test_tracing_leaves_no_proxy_in_a_buffer_the_forward_reassigns() -> None:
    m = CallCounter()
    calls = m.calls
    trace(m)
    assert m._buffers["calls"] is calls


@pytest.mark.parametrize("fanout", ["off", "on"])
def test_a_forward_that_counts_its_calls_in_a_buffer_is_evaluated(fanout: str) -> None:
    torch.manual_seed(0)
    m = CallCounter()
    batches = _batches()
    variants = _variants(m, [["a.weight", "a.bias"], ["b.weight"]])
    ref = _oracle(m, variants, batches)
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    assert torch.equal(res.counts[:, [0, 3]], ref)


class RunningMean(nn.Module):
    """A custom layer that updates a running mean in place in eval mode too, and reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 5)
        self.register_buffer("mean", torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.mean.mul_(0.5).add_(0.5 * h.mean(0))
        return self.b(torch.relu(h - self.mean))


@pytest.mark.parametrize("fanout", ["off", "on"])
def test_a_buffer_the_forward_writes_in_place_comes_back_bit_for_bit(fanout: str) -> None:
    """Evaluator's contract: every tensor as it was, bit for bit. On the CPU the pass runs on
    the model's own tensors, so a forward's in-place write stayed, and a second run started from
    another state and gave other sums."""
    torch.manual_seed(0)
    m, batches = RunningMean(), _batches()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    variants = _variants(m, [["b.weight"]])
    first = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    again = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    assert torch.equal(first.counts, again.counts)


class ForcedDropout(nn.Module):
    """Dropout kept on in eval mode (`F.dropout(..., training=True)`, MC dropout): the forward
    is random."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.dropout(torch.relu(self.a(x)), 0.5, training=True))


def test_a_random_forward_is_named_as_such_not_called_exact(capsys) -> None:
    """Its counts change from run to run; the untraced warning blamed the trace ("the traced
    program's logits differ") and called the results exact."""
    from layerfast.engine.plan import warn_plan

    torch.manual_seed(0)
    m = ForcedDropout()
    res = Evaluator(m, _variants(m, [["b.weight"]]), device="cpu", precision="fp32",
                    fanout="off").run(_batches())
    assert "not deterministic" in res.plan["untraced"]
    warn_plan(res.plan)
    err = capsys.readouterr().err
    assert "F.dropout" in err and "change from run to run" in err and "exact" not in err

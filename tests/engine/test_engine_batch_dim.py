"""Cuts whose value does not hold the batch in dim 0.

A proven cut is where one value carries all state; nothing made it batch-first. A sequence-first
LSTM's input (`nn.LSTM`'s default layout), `x.transpose(0, 1)` or `x.unsqueeze(0)` is such a
value: a variant started there had its "batch" sliced along the sequence and was scored against
labels of another length (an internal error, `score_`'s shape check), or, when the sequence
was as long as the batch and an out-of-memory back-off cut it, against the wrong samples.
Such cuts are found on the first batch (`verify.unbatched_cuts`) and not used.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator, naive_evaluate
from layerfast.engine.graph import Program
from layerfast.engine.verify import unbatched_cuts


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is as fast and does not fight the other tests."""


class SeqFirst(nn.Module):
    """A linear embedding, then an LSTM in its default (seq, batch, feature) layout."""

    def __init__(self, steps: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.inp = nn.Linear(8, 8)
        self.rnn = nn.LSTM(8, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.view(x.shape[0], self.steps, 8)).transpose(0, 1)
        out, _ = self.rnn(h)
        return self.fc(out[-1])


class Unsqueezed(nn.Module):
    """A batch moved to dim 1 by `unsqueeze(0)` between two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).unsqueeze(0)
        return self.fc(torch.relu(self.b(h))[0])


def _variants(model: nn.Module) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out: list[dict] = [{}]
    for k, p in model.state_dict().items():
        if p.is_floating_point() and not k.startswith("fc"):
            out.append({k: torch.randn(p.shape, generator=g) * 0.5})
    return out


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, **kw) -> Evaluator:
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
    variants = _variants(model)
    ev = Evaluator(model, variants, device="cpu", precision="fp32", **kw)
    got = ev.run(batches).counts
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]])
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=1e-5)
    return ev


@pytest.mark.parametrize("batch", [6, 4, 5])  # 4: as many samples as steps
def test_a_sequence_first_cut_is_not_used(batch: int) -> None:
    torch.manual_seed(0)
    model = SeqFirst().eval()
    x, y = torch.randn(12, 32), torch.randint(0, 10, (12,))
    ev = _check(model, x, y, batch)
    prog = Program(model)
    assert ev._unbatched and ev._unbatched <= set(prog.cuts)
    assert not set(ev.last_plan.cuts) & ev._unbatched


def test_an_unsqueezed_cut_is_not_used() -> None:
    torch.manual_seed(0)
    model = Unsqueezed().eval()
    x, y = torch.randn(10, 12), torch.randint(0, 10, (10,))
    ev = _check(model, x, y, 5)
    assert ev._unbatched


def test_batch_first_cuts_are_all_kept() -> None:
    """A plain MLP: every cut holds the batch in dim 0, prefix sharing is untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 10)).eval()
    prog = Program(model)
    assert prog.cuts and unbatched_cuts(prog, torch.randn(6, 12), torch.device("cpu")) == set()
    ev = _check(model, torch.randn(10, 12), torch.randint(0, 10, (10,)), 5)
    assert not ev._unbatched and ev.last_plan.cuts


def test_a_sequence_as_long_as_the_batch_after_an_out_of_memory_back_off(monkeypatch) -> None:
    """Seq len == batch size: the cut's shape[0] matched the batch, and after a back-off the
    swap path sliced it into halves of the *sequence*, scored against half of the labels."""
    torch.manual_seed(0)
    model = SeqFirst().eval()
    x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
    real = Program.run
    calls = {"n": 0}

    def flaky(self, x, start=0, *a, **k):
        if start > 0 and x.shape[0] == 4 and calls["n"] == 0:  # the first suffix run: "OOM"
            calls["n"] += 1
            raise torch.OutOfMemoryError("simulated")
        return real(self, x, start, *a, **k)

    monkeypatch.setattr(Program, "run", flaky)
    _check(model, x, y, 4)


def test_the_cuts_found_stay_out_of_every_pass() -> None:
    """Several passes over the data: each builds its own program; none may use the cut."""
    torch.manual_seed(0)
    model = SeqFirst().eval()
    x, y = torch.randn(12, 32), torch.randint(0, 10, (12,))
    ev = _check(model, x, y, 6, stage_bytes=1)
    assert len(ev.passes()) > 1 and ev._unbatched


def test_the_check_backs_off_when_a_run_fails(monkeypatch) -> None:
    """Out of memory (or any failure) on 8 samples: the check tries 4 and 2 instead and still
    finds the cut; with no run at all, no cut counts as proven."""
    torch.manual_seed(0)
    model = SeqFirst().eval()
    prog = Program(model)
    x = torch.randn(8, 32)
    want = unbatched_cuts(prog, x, torch.device("cpu"))
    real, sizes = Program.run, []

    def flaky(self, x, start=0, *a, **k):
        sizes.append(x.shape[0])
        if x.shape[0] == 8:
            raise torch.OutOfMemoryError("simulated")
        return real(self, x, start, *a, **k)

    monkeypatch.setattr(Program, "run", flaky)
    assert want and unbatched_cuts(prog, x, torch.device("cpu")) == want
    assert sizes == [8, 4, 2]

    def broken(self, x, *a, **k):
        raise RuntimeError("fails on any batch")

    monkeypatch.setattr(Program, "run", broken)
    assert unbatched_cuts(prog, x, torch.device("cpu")) == set(prog.cuts)

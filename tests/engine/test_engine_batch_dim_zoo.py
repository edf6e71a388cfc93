"""More values that do not hold the batch the way the engine assumes (a zoo review, 2026-12-06).

`verify.unbatched_cuts` drops cuts whose dim 0 is not the batch, found by running the program
on 8 and 4 samples of the first batch. Two assumptions remain:

1. The first batch has at least 2 samples. With one, only one size is tried and an
   `unsqueeze(0)` value, [1, B, ...], looks batch-first; every later batch's variants start there
   and the swap path slices it as if dim 0 were the batch (an internal `score_` error).
2. A cut that holds B rows in dim 0 holds each sample's own row, and the suffix from it treats
   rows independently. The out-of-memory back-offs (`_run_swapped`'s halves, `_pass_rows`)
   cut the batch into pieces on that assumption. A cut whose rows are a permutation of the
   samples (chunk + cat in the other order, undone later) is then scored against other labels,
   and a model with batch statistics (`h - h.mean(0)`) is scored on pieces the naive loop never
   saw: silently different counts, where DESIGN §7 says a back-off leaves them unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator, naive_evaluate
from layerfast.engine.graph import Program
from layerfast.errors import LayerfastError
from tests.engine.test_engine_batch_dim import Unsqueezed


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is as fast and does not fight the other tests."""


class SwappedHalves(nn.Module):
    """Row-local as a whole (output row i depends on sample i alone), but between the two cats
    the rows are the batch's halves swapped."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.a(x).chunk(2, 0)
        h = torch.relu(self.b(torch.cat([q, p], 0)))
        n = h.shape[0]
        p, q = h.split([n - n // 2, n // 2], 0)
        return self.fc(torch.cat([q, p], 0))


class BatchStats(nn.Module):
    """Centred on the batch's mean: its output depends on which samples share a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(h - h.mean(0))


def _variants(model: nn.Module) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {k: p + torch.randn(p.shape, generator=g) * 0.5}
        for k, p in model.state_dict().items()
    ]


def _expect_naive(model, batches, variants, **kw) -> Evaluator:
    want = naive_evaluate(model, variants, lambda: batches)
    ev = Evaluator(model, variants, device="cpu", precision="fp32", **kw)
    got = ev.run(batches).counts
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]]), (got - want)[:, [0, 1, 3]]
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-5, atol=1e-5)
    return ev


def _oom_once(monkeypatch, when) -> dict:
    """Program.run raises a simulated out-of-memory error once, on the first call `when`
    accepts (start, rows, keep)."""
    real, fired = Program.run, {"n": 0}

    def flaky(self, x, start=0, keep=None, *a, **k):
        if not fired["n"] and when(start, x.shape[0], keep):
            fired["n"] += 1
            raise torch.OutOfMemoryError("simulated")
        return real(self, x, start, keep, *a, **k)

    monkeypatch.setattr(Program, "run", flaky)
    return fired


@pytest.mark.parametrize("fanout", [False, True])
def test_a_one_sample_first_batch_still_finds_the_unsqueezed_cut(fanout: bool) -> None:
    """Got: RuntimeError 'layerfast::score_: labels must have shape [B] = [16] to match
    logits [1, 16, 10], got [1]' on the second batch (the 1-sample check could not tell)."""
    torch.manual_seed(0)
    model = Unsqueezed().eval()
    x, y = torch.randn(17, 12), torch.randint(0, 10, (17,))
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    ev = _expect_naive(model, batches, _variants(model), fanout=fanout)
    assert ev._unbatched


@pytest.mark.parametrize("fanout", [False, True])
def test_a_swap_back_off_on_a_cut_with_permuted_rows(monkeypatch, fanout: bool) -> None:
    """The swap path's halves of the cut after `cat([q, p])` are the other half's samples:
    got other counts than the naive loop (no error)."""
    torch.manual_seed(0)
    model = SwappedHalves().eval()
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    fired = _oom_once(monkeypatch, lambda start, rows, keep: start > 0 and keep is None
                      and rows == 16)
    _expect_naive(model, batches, _variants(model), fanout=fanout)
    assert fired["n"] == 1


@pytest.mark.parametrize("where", ["suffix", "baseline"])
def test_a_back_off_on_a_model_with_batch_statistics(monkeypatch, where: str) -> None:
    """A back-off that cuts the batch changes a batch-statistics model's answer: the engine must
    either keep the caller's batches whole or say it cannot, never return other counts."""
    torch.manual_seed(0)
    model = BatchStats().eval()
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    if where == "suffix":
        fired = _oom_once(monkeypatch, lambda start, rows, keep: start > 0 and keep is None
                          and rows == 16)
    else:
        fired = _oom_once(monkeypatch, lambda start, rows, keep: keep is not None and rows == 16)
    with pytest.raises(LayerfastError, match="depend on which samples share a batch"):
        _expect_naive(model, batches, _variants(model), fanout=False)
    assert fired["n"] == 1


def test_a_model_with_batch_statistics_is_exact_without_a_back_off() -> None:
    """Found mixing, the model is still evaluated on the caller's batches, exactly; a model
    whose rows are its samples' own is not taken for one that mixes."""
    from layerfast.engine import Evaluator

    torch.manual_seed(0)
    model = BatchStats().eval()
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    _expect_naive(model, batches, _variants(model), fanout=False)
    ev = Evaluator(model, _variants(model), device="cpu", precision="fp32")
    ev.run(batches)
    assert ev._mixes_samples
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 10))
    ev = Evaluator(mlp.eval(), _variants(mlp), device="cpu", precision="fp32")
    ev.run(batches)
    assert not ev._mixes_samples and not ev._unbatched


def test_a_resumed_multi_pass_run_whose_first_batch_is_one_sample() -> None:
    """The realistic way to a one-sample first batch: a run over several passes (staging limit)
    resumed with one sample of its first pass left. The check ran on that one sample, and the
    next pass's 16-sample batches failed with the same internal `score_` error."""
    from layerfast.data.source import DataSource

    torch.manual_seed(0)
    model = Unsqueezed().eval()
    x, y = torch.randn(33, 1, 3, 4), torch.randint(0, 10, (33,))
    ds = DataSource.from_arrays("t", x, y, num_classes=10)
    flat = _Flat(model)
    variants = [{f"m.{k}": t for k, t in v.items()} for v in _variants(model)]
    full = Evaluator(flat, variants, device="cpu", precision="fp32", batch_size=16,
                     stage_bytes=1)
    want = full.run(ds).counts
    ev = Evaluator(flat, variants, device="cpu", precision="fp32", batch_size=16, stage_bytes=1)
    got = ev.run(ds, start=ds.n - 1).counts
    later = [i for p in ev.passes()[1:] for i in p]
    assert len(ev.passes()) > 1 and later
    assert torch.equal(got[later], want[later])


class _Flat(nn.Module):
    """A DataSource's [B, 1, 3, 4] images into the [B, 12] the model takes."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x.flatten(1))


class UntracedBatchStats(BatchStats):
    """The same, with a branch on a value: fx cannot trace it, so it runs as one opaque step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().sum()) < 0:
            x = -x
        return super().forward(x)


def test_an_untraced_model_that_mixes_samples_is_found_too(monkeypatch) -> None:
    """The untraced program has no cuts but still has batches an out-of-memory back-off would
    cut: the check runs for it too."""
    from layerfast.engine import Evaluator

    torch.manual_seed(0)
    model = UntracedBatchStats().eval()
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    ev = _expect_naive(model, batches, _variants(model), fanout=False)
    assert ev.last_plan.summary()["untraced"] and ev._mixes_samples
    fired = _oom_once(monkeypatch, lambda start, rows, keep: rows == 16)
    with pytest.raises(LayerfastError, match="depend on which samples share a batch"):
        Evaluator(model, _variants(model), device="cpu", precision="fp32").run(batches)
    assert fired["n"] == 1

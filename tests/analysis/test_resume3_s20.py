"""The engine state a resume store saves (`Evaluator.resume_state`), taken back by a rerun
(session 20, third look): a damaged or edited state is refused in one line, never run; and a
pass resumed at its very end (killed between its last progress save and the finished mark)
reports the plan its interrupted run's first batch decided, as an uninterrupted run does.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from layerfast.data.source import DataSource
from layerfast.engine.evaluator import Evaluator
from layerfast.errors import LayerfastError
from tests.fanout.test_fan_s19 import _variants


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


class _Mlp(nn.Module):
    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.branch = branch
        self.a, self.b, self.c = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.flatten(1))
        # fx sees a Proxy here, the forward a tensor: the traced program skips the relu, the
        # first batch's trace check finds it and the model runs untraced
        if not self.branch or isinstance(h, torch.Tensor):
            h = h.relu()
        return self.c(self.b(h).relu())


def _setup(branch: bool = False) -> tuple[nn.Module, DataSource, list[dict]]:
    torch.manual_seed(0)
    model = _Mlp(branch).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    return model, DataSource.from_arrays("t", x, y, num_classes=10), _variants(model, ["a", "b", "c"])


def _saves(model: nn.Module, src: DataSource, variants: list[dict],
           **kw: object) -> tuple[object, list]:
    """An uninterrupted run, and (counts, n_done, state as JSON) at each of its progress saves."""
    ev = Evaluator(model, variants, device="cpu", batch_size=16, fanout="on", **kw)
    saves: list = []

    def save(counts: torch.Tensor, n: int) -> None:
        saves.append((counts.clone(), n, json.loads(json.dumps(ev.resume_state()))))

    res = ev.run(src, on_checkpoint=save, checkpoint_every=0)
    return res, saves


@pytest.mark.parametrize("stage", [None, 12000])  # one pass; several
def test_a_pass_resumed_at_its_end_reports_the_plan_its_first_batch_decided(stage):
    """Killed after its last progress save (every sample counted) and before the run was marked
    finished, the rerun resumes at the pass's end: no batch runs, so no first-batch check ran,
    and its plan was the unchecked one. run.json said the model was traced and its variants
    fanned where the whole run had found the trace wrong and run untraced, on the swap path;
    and that plan was saved again as the state a later rerun would take back."""
    model, src, variants = _setup(branch=True)
    whole, saves = _saves(model, src, variants, stage_bytes=stage)
    assert whole.plan["untraced"] and not whole.plan["fanned_variants"]
    assert (whole.plan["passes"] > 1) == (stage is not None)
    counts, n, state = saves[-1]
    assert n == src.n * whole.plan["passes"]
    ev = Evaluator(model, variants, device="cpu", batch_size=16, fanout="on", stage_bytes=stage)
    again: list = []
    res = ev.run(src, start=n, counts=counts, state=state,
                 on_checkpoint=lambda c, k: again.append(ev.resume_state()))
    assert torch.equal(res.counts, whole.counts)
    assert res.plan == whole.plan
    assert json.loads(json.dumps(again[-1])) == state


BAD = [
    ("kmax", 0),  # a chunk of no variant: torch.stack refused it (a traceback, exit 1)
    ("kmax", -1),  # a slice backwards: a "fallback" run.json reported as the engine's
    ("kmax", True),
    ("kmax", 2.5),
    ("kmax", 33),  # above max_fanout: no run of these options saves it
    ("fan", "yes"),
    ("fallback", 7),
    ("refused", ["x"]),
    ("members", [99]),  # not a variant of this run
    ("members", []),
    ("start", -1),
]


@pytest.mark.parametrize("key, value", BAD)
def test_a_damaged_group_record_is_refused_in_one_line(key, value):
    """A group record of the resumed pass was checked only for whether `int()` took its
    numbers: K 0 crashed the pass with a RuntimeError from torch.stack, a negative K ran as a
    fanout fallback run.json reported, other types went into run.json as they were."""
    model, src, variants = _setup()
    _, saves = _saves(model, src, variants)
    counts, n, state = saves[0]
    assert 0 < n < src.n
    fanned = next(g for g in state["plans"][0]["groups"] if g["fan"])
    fanned[key] = value
    ev = Evaluator(model, variants, device="cpu", batch_size=16, fanout="on")
    with pytest.raises(LayerfastError, match="saved engine state does not describe this run"):
        ev.run(src, start=n, counts=counts, state=state)


@pytest.mark.parametrize("edit", [
    lambda s: s.update(k=33),  # above max_fanout
    lambda s: s["plans"][0].update(cuts=["1"]),
    lambda s: s["plans"][0].update(same_as_baseline=[-1]),
    lambda s: s["plans"][0].update(untraced=5),
    lambda s: s["plans"][0].pop("cuts"),
    lambda s: s.update(plans={"0": {}}),
])
def test_a_damaged_state_is_refused_in_one_line(edit):
    """The rest of the state: K, and the plan record's other fields."""
    model, src, variants = _setup()
    _, saves = _saves(model, src, variants)
    counts, n, state = saves[0]
    edit(state)
    ev = Evaluator(model, variants, device="cpu", batch_size=16, fanout="on")
    with pytest.raises(LayerfastError, match="saved engine state does not describe this run"):
        ev.run(src, start=n, counts=counts, state=state)

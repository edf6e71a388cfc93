"""The first-batch effects check (`Program.unseen_effects`): where its dispatch-mode run cannot
run what a plain forward runs (a higher-order operator such as `torch.cond`, which a
`TorchDispatchMode` without a rule for it refuses), the check must not answer "nothing found":
a step whose reads it could not see is made opaque, so no variant starts after a step that read
its tensor. The engine's counts must equal the naive loop's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.evaluator import Evaluator
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate
from tests.engine.test_traceatk_s19 import _batches, _matches_naive, _variants


class _CondGate(nn.Module):
    """Reads `other`'s weight, held in a list (not a submodule), and picks a branch with
    `torch.cond` (a higher-order operator): fx cannot trace it, so a Sequential of it runs
    untraced, cut between its children; the check's dispatch mode has no rule for `cond`."""

    def __init__(self, other: nn.Linear) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.refs = [other]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cond(x.sum() > -1e9, lambda t: t + 0.0, lambda t: t - 1.0, (x,))
        return self.lin(h) + F.linear(h, self.refs[0].weight)


def _cond_sequential() -> nn.Sequential:
    b = nn.Linear(64, 64)
    return nn.Sequential(_CondGate(b), nn.ReLU(), b, nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_step_the_check_cannot_run_is_opaque_not_unchecked() -> None:
    """The run under the check's dispatch mode raised on `torch.cond` and the check answered
    None, taken as "nothing found": b's variants started from the cut after the gate, whose
    value the final b's weight had made. The gate is now opaque."""
    torch.manual_seed(0)
    model = _cond_sequential().eval()
    prog = Program(model)
    found = prog.unseen_effects(torch.randn(4, 64))
    assert found is not None and 1 in set().union(*found), found
    _matches_naive(model, ["0.lin", "2", "4"])


class _Fails(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("the model's own failure")


def test_a_model_that_fails_on_its_own_still_answers_none() -> None:
    """None stays the answer where the forward fails without the mode too (the pass reports
    the model's own failure), so a failing first run leaves no steps opaque behind."""
    model = nn.Sequential(nn.Linear(64, 64), _Fails(), nn.Linear(64, 10)).eval()
    assert Program(model).unseen_effects(torch.randn(4, 64)) is None


class _ModeShy(_CondGate):
    """Refuses to run under a dispatch mode (as code that checks for one may), and reads
    `other`'s weight past the program's keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode

        if is_in_torch_dispatch_mode():
            raise RuntimeError("not under a dispatch mode")
        if x.sum() > -1e9:  # a branch on a value: fx fails, the Sequential runs untraced
            x = x + 0.0
        return self.lin(x) + F.linear(x, self.refs[0].weight)


def test_a_run_the_mode_breaks_leaves_the_unfinished_steps_opaque() -> None:
    """The run under the check's mode raises where a plain run does not: the steps it had not
    finished are unknown, so opaque, and the counts stay the naive loop's."""
    torch.manual_seed(0)
    b = nn.Linear(64, 64)
    model = nn.Sequential(nn.Linear(64, 64), _ModeShy(b), nn.ReLU(), b, nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    prog = Program(model)
    found = prog.unseen_effects(torch.randn(4, 64))
    assert found is not None and found[0] >= {2, 3, 4, 5, 6}, found
    assert 1 not in found[0] | found[1]  # the first Linear ran under the mode: seen, kept
    _matches_naive(model, ["0", "1.lin", "3", "5"])


class _Chunked(nn.Module):
    """a's and b's weights are disjoint halves of one storage (`nn.Parameter(w[:64])`, as
    parameters made from chunks of one tensor, or a flat-parameter wrapper's views, are)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        w = torch.randn(128, 64) * 0.1
        self.a.weight, self.b.weight = nn.Parameter(w[:64]), nn.Parameter(w[64:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_parameters_sharing_a_storage_disjointly_are_not_read_together() -> None:
    """a reads its own half of the storage only: the check took the read of that storage for
    a read of b's weight too, made a opaque, and every variant lost its prefix."""
    torch.manual_seed(0)
    model = _Chunked().eval()
    assert Program(model).unseen_effects(torch.randn(4, 64)) == (set(), set())
    plan = _matches_naive(model, ["a", "b", "c"])
    assert plan["cuts_kept"] >= 2, plan


class _ReadsOverlap(nn.Module):
    """A plain attribute over the rows of b's weight (a view, not a parameter), read by a
    step before b: still found, by the bytes it overlaps."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.rows = self.b.weight.detach()[8:16]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + 0.1 * (x @ self.rows.t()).sum(1, keepdim=True)
        return self.c(torch.relu(self.b(h)))


def test_a_read_of_part_of_a_parameter_is_still_found() -> None:
    torch.manual_seed(0)
    model = _ReadsOverlap().eval()
    found = Program(model).unseen_effects(torch.randn(4, 64))
    assert found is not None and found[0], found
    _matches_naive(model, ["a", "b", "c"])


def _kept_whole(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


torch.fx.wrap("_kept_whole")


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _kept_whole(torch.relu(self.a(x)))
        return self.c(torch.relu(self.b(h)))


def test_a_refused_fan_out_names_an_opaque_function_step() -> None:
    """An opaque step that is a function (`torch.fx.wrap`, or one the effects check made
    opaque) is among the steps a group's variants change; naming them for the refused
    fan-out sorted a function with module names: TypeError."""
    torch.manual_seed(0)
    model = _Wrapped().eval()
    variants = _variants(model, ["a", "b"], n=2)
    batches = _batches()
    res = Evaluator(model, variants, device="cpu", fanout=True).run(batches)
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])
    assert "_kept_whole" in str(res.plan["fanout_refused"]), res.plan

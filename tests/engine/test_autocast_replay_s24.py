"""A forward that sets `torch.autocast` itself for some of its ops keeps its traced program (s24).

fx records the ops, not the `with torch.autocast(...)` around them. Until s24 such a forward
(a float32 head under `autocast("cpu", enabled=False)`, a bf16 region of its own) ran untraced
wherever the region's state differed from the pass's: exact, but every variant was a full
forward. Now each step carries its region's state and runs under it where that differs from
the state in force (`Program.regions_here`), so the program is the eager forward bit for bit
in fp32 and bf16, with prefix sharing (and fan-out where it applies). A region whose state the
two traces cannot pin down is still refused (untraced, exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate
from tests.engine.test_autocast_regions_s23 import (
    Bf16Middle,  # a bf16 middle layer
    Float32Head,  # a region around a leaf Linear
)
from tests.engine.test_bf16_s18 import _plain_loop  # reset, own forward (autocast per variant)


class FunctionalHead(nn.Module):
    """A region around functional ops only (a matmul, an activation, arithmetic)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.w = nn.Parameter(torch.randn(10, 64) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        with torch.autocast("cpu", enabled=False):
            h = torch.tanh(h.float()) * 0.5 + h.float()
            return F.linear(h, self.w) @ torch.eye(10)


class Nested(nn.Module):
    """A bf16 region holding a float32 one, then bf16 again, then the ambient state."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.d, self.fc = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = F.relu(self.b(h))
            with torch.autocast("cpu", enabled=False):
                h = F.relu(self.c(h.float()))
            h = F.relu(self.d(h))
        return self.fc(h.float())


class SpanCut(nn.Module):
    """A float32 region spanning cut points: variants of `c` and `d` start inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.d, self.fc = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        with torch.autocast("cpu", enabled=False):
            h = F.relu(self.b(h.float()))
            h = F.relu(self.c(h))
            h = F.relu(self.d(h))
        return self.fc(h)


class ConvRegion(nn.Module):
    """A residual conv block in a float32 region: fan-out's fold form and its fused
    BatchNorm -> add -> ReLU run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        for n in (self.n1, self.n2):
            n.running_mean.uniform_(-1, 1)
            n.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(self.c1(x)))
        with torch.autocast("cpu", enabled=False):
            h = h.float()
            h = F.relu(self.n2(self.c2(h)) + h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class FollowsPass(nn.Module):
    """A region whose state follows the pass's: off under bf16, bf16 with autocast off."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        with torch.autocast("cpu", enabled=not torch.is_autocast_enabled("cpu")):
            h = F.relu(self.b(h.float()))
        return self.fc(h.float())


class Leaks(nn.Module):
    """A forward that switches autocast off without a `with` and leaves it so."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        torch.set_autocast_enabled("cpu", False)
        return self.fc(h.float())


TRACED = [Float32Head, FunctionalHead, Bf16Middle, Nested, SpanCut, ConvRegion]


def _variants(model: nn.Module, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Two variants per weight matrix or conv kernel (a group fan-out may run as one)."""
    return [{k: torch.randn(v.shape, generator=g) * 0.1}
            for k, v in model.state_dict().items() if v.dim() in (2, 4) for _ in range(2)]


def _case(cls: type[nn.Module]):
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 10, (300,), generator=g)
    return model, _variants(model, g), [(x[:150], y[:150]), (x[150:], y[150:])]


def _engine(model, variants, batches, precision: str, fanout: bool):
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg)

    ev = Evaluator(model, variants, device="cpu", precision=precision, fanout=fanout)
    res = ev.run(batches, on_logits=hook)
    return ev, res, torch.stack([torch.cat(got[i]) for i in range(len(variants))]).float()


def _naive(model, variants, batches, precision: str) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return naive_evaluate(model, variants, lambda: batches)


@pytest.mark.parametrize("fanout", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cls", TRACED, ids=lambda c: c.__name__)
def test_a_forward_with_autocast_regions_is_traced_and_exact(cls, precision, fanout):
    model, variants, batches = _case(cls)
    state = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    ev, res, got = _engine(model, variants, batches, precision, fanout)
    assert res.precision == precision
    assert res.plan["untraced"] is None, res.plan["untraced"]
    assert res.plan["fanout_fallbacks"] == {}
    ref = _plain_loop(model, variants, batches, autocast=precision == "bf16")
    if fanout:  # a fanned matmul sums in another order: float32's last bits (docs/engine.md);
        # a region run in the pass's state instead of its own is off by ~1e-3
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, ref), f"max |Δlogit| {(got - ref).abs().max():.3g}"
    want = _naive(model, variants, batches, precision)  # the scorer sums cross-entropy apart
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])
    torch.testing.assert_close(res.counts[:, 2], want[:, 2], rtol=1e-6, atol=1e-5)
    # prefix sharing: each layer's variants start from its own cut (one per layer)
    starts = {m: g.start for g in ev.last_plan.groups for m in g.members}
    assert len(set(starts.values())) == len(variants) // 2, starts
    if fanout and cls is not FunctionalHead:  # its layers feed F.linear: not fanned
        assert res.plan["fanned_variants"] == len(variants), res.plan
    after = model.state_dict(keep_vars=True)
    assert after.keys() == state.keys()
    for k, (obj, val) in state.items():
        assert after[k] is obj and torch.equal(after[k], val), k


def spy_fanned(monkeypatch) -> list[list[str]]:
    """Record what each fanned run did, step by step (`fanrun.run_fanned`'s `trace`): one list
    per call, filled as the Evaluator runs."""
    import layerfast.engine.evaluator as evaluator
    from layerfast.engine import fanrun

    runs: list[list[str]] = []

    def spy(*args, **kwargs):
        runs.append([])
        return fanrun.run_fanned(*args, **kwargs, trace=runs[-1])

    monkeypatch.setattr(evaluator, "run_fanned", spy)
    return runs


def test_a_fused_chain_inside_a_region_runs_in_its_state(monkeypatch):
    """ConvRegion's BatchNorm -> add -> ReLU, all in its float32 region, fuses under a bf16
    pass (one state for the chain: `fanrun._one_state`), run in that region's state."""
    runs = spy_fanned(monkeypatch)
    model, variants, batches = _case(ConvRegion)
    _, res, got = _engine(model, variants, batches, "bf16", True)
    assert any(r[:4] == ["module", "fused", "fused", "fused"] for r in runs), runs  # c2's
    assert res.plan["fanned_variants"] == len(variants), res.plan
    torch.testing.assert_close(got, _plain_loop(model, variants, batches, autocast=True),
                               rtol=0, atol=1e-6)


def test_each_step_carries_its_regions_state_relative_to_the_pass():
    """Under bf16 the float32 region is a context and the rest inherits; in the fp32 check
    (autocast off) nothing needs one. A bf16 region the other way round."""
    off, bf16 = (False, None), (True, torch.bfloat16)
    cpu = torch.device("cpu")
    for cls, region, under_bf16, under_off in ((Float32Head, off, True, False),
                                               (Bf16Middle, bf16, False, True)):
        model, _, _ = _case(cls)
        prog = Program(model, precision=("bf16", cpu))
        assert prog.traced, prog.trace_error
        marked = {s.index for s in prog.steps if s.autocast is not None}
        assert marked and {prog.steps[i].autocast for i in marked} == {region}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert bool(prog.regions_here()) is under_bf16
        with torch.autocast("cpu", enabled=False):
            assert bool(prog.regions_here()) is under_off


def test_a_variant_starts_at_a_cut_inside_a_region():
    """SpanCut's `c` and `d` start from cuts inside its float32 region: the cached carrier is
    float32 and the suffix runs in the region's state from there (the test above: exact)."""
    model, _, _ = _case(SpanCut)
    prog = Program(model, precision=("bf16", torch.device("cpu")))
    for key in ("c.weight", "d.weight"):
        c = prog.start_cut({key})
        assert c and prog.steps[c].autocast == (False, None), (key, c)


def test_a_model_without_regions_enters_no_context():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    prog = Program(model, precision=("bf16", torch.device("cpu")))
    assert prog.traced and all(s.autocast is None for s in prog.steps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not prog.regions_here()


@pytest.mark.parametrize("fanout", [False, True])
def test_a_region_that_follows_the_pass_runs_untraced_and_exact(fanout):
    model, variants, batches = _case(FollowsPass)
    _, res, got = _engine(model, variants, batches, "bf16", fanout)
    why = res.plan["untraced"] or ""
    assert "autocast" in why and "pin down" in why, why
    assert torch.equal(got, _plain_loop(model, variants, batches, autocast=True))
    # with autocast off its state is bf16 in the trace and in the forward: a region, traced
    _, res, got = _engine(model, variants, batches, "fp32", fanout)
    assert res.plan["untraced"] is None
    ref = _plain_loop(model, variants, batches, autocast=False)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 if fanout else 0)


def test_a_forward_that_leaves_autocast_switched_is_not_traced():
    model, _, _ = _case(Leaks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prog = Program(model, precision=("bf16", torch.device("cpu")))
        assert torch.is_autocast_enabled("cpu")  # the pass's state is back after the traces
    assert not prog.traced and "switched" in (prog.trace_error or ""), prog.trace_error

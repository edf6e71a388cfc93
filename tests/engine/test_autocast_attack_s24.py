"""Attacks on session 24's autocast-region replay (d0babbd): one test per defect found, and the
tests that kill the mutants of the replay the other tests let through.

1. A constant the forward computes for real while tracing (a fixed matrix `q @ q.T` built from
   tensors it holds) was recorded from the trace with autocast off: float32. Under a bf16 pass
   the eager forward computes it in bfloat16, so the traced program's logits were off by bf16's
   rounding (max |Δlogit| 0.004 here, counts changed) while the first-batch check, in fp32,
   saw nothing. The program now reads the pass's own value of such a constant where the
   pass's state is in force (`tracing.trace_for_pass`'s third item, `Program.fetch`).

2. A step writing into such a constant (`m = q @ q.T; m += h.mean()`, outside or inside a
   region) wrote into the one tensor the program holds, where the forward builds it afresh on
   each call: each run (baseline, every variant, every batch) started from the writes of all
   runs before it, logits off by up to 55 here, counts wrong, and the first-batch check, on
   the program's first run, saw nothing. Such a program now runs untraced (exact), its reason
   in the plan (`Program._check_constant_writes`).

Mutants of the replay (trace_for_pass's classes, regions_here's cache, Program.run's and
run_fanned's contexts, _one_state, the tracer's leak check) that the other tests let through
are killed below, each named in its test's docstring.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.graph import Program
from tests.engine.test_autocast_replay_s24 import _case, _engine, _naive
from tests.engine.test_bf16_s18 import _plain_loop

CPU = torch.device("cpu")


class _Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.q = torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) * 0.1


class ConstantOutside(_Three):
    """A fixed transform built each call from a tensor the model holds, outside every region:
    a constant of the graph, bfloat16 in the eager forward under a bf16 pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        return self.fc(h @ (self.q @ self.q.T))


class ConstantIntoRegion(_Three):
    """The same constant, computed outside and read inside a float32 region (its get_attr is
    recorded there): the region casts it up from the pass's bfloat16 value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        m = self.q @ self.q.T
        with torch.autocast("cpu", enabled=False):
            return self.fc(h.float() @ m.float())


class ConstantInRegion(_Three):
    """Computed inside a bf16 region: the same value in both traces and in the forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m = self.q @ self.q.T
        return self.fc(h @ m.float())


def _exact(cls: type[nn.Module], precision: str, fanout: bool) -> None:
    """The engine's logits are the plain loop's (bit for bit with fan-out off), its counts the
    naive loop's, and the model's state is its own afterwards."""
    model, variants, batches = _case(cls)
    state = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    _, res, got = _engine(model, variants, batches, precision, fanout)
    assert res.plan["untraced"] is None, res.plan["untraced"]
    ref = _plain_loop(model, variants, batches, autocast=precision == "bf16")
    if fanout:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, ref), f"max |Δlogit| {(got - ref).abs().max():.3g}"
    want = _naive(model, variants, batches, precision)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])
    after = model.state_dict(keep_vars=True)
    for k, (obj, val) in state.items():
        assert after[k] is obj and torch.equal(after[k], val), k


@pytest.mark.parametrize("fanout", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cls", [ConstantOutside, ConstantIntoRegion, ConstantInRegion],
                         ids=lambda c: c.__name__)
def test_a_constant_the_trace_computes_is_the_passs_own(cls, precision, fanout):
    _exact(cls, precision, fanout)


def test_the_program_reads_each_states_own_constant():
    """1. Where the pass's state is in force the program reads the bf16 constant, in the fp32
    check (autocast off) the float32 one, as the eager forward computes them there."""
    model, _, _ = _case(ConstantOutside)
    prog = Program(model, precision=("bf16", CPU))
    assert prog.traced and list(prog.constants) == ["_tensor_constant0"], prog.trace_error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prog.fetch("_tensor_constant0").dtype == torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        assert prog.fetch("_tensor_constant0").dtype == torch.float32


class WritesConstant(_Three):
    """A constant of the trace the forward then adds a value of the batch to, in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        m = self.q @ self.q.T
        m += h.mean()
        return self.fc(h @ m)


class WritesConstantInRegion(_Three):
    """The same, through a view of the constant, inside a float32 region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        m = self.q @ self.q.T
        with torch.autocast("cpu", enabled=False):
            m.view(-1)[:64].add_(h.float().mean())
            return self.fc(h.float() @ m.float())


class WritesAViewOfAConstant(_Three):
    """A view the program takes of a constant (its length read from the batch, so a step),
    then written in place: the write reaches the constant through the view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        m = self.q @ self.q.T
        torch.narrow(m, 0, 0, h.shape[1] // 2).add_(h.mean())
        return self.fc(h @ m)


class ActInPlaceOnAConstant(_Three):
    """An `inplace=True` LeakyReLU (its flag off while the engine runs, `no_inplace_modules`,
    and on again for this call: its input is read after it) on a view of a constant: applied
    once per call in the forward, once more per run in a program holding the constant."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.LeakyReLU(0.5, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        m = self.q @ self.q.T - 0.01
        self.act(torch.narrow(m, 0, 0, h.shape[1]))
        return self.fc(h @ m)


def _bump(m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Code the trace does not see (wrapped below): it writes into its first argument."""
    return m.add_(h.mean())


torch.fx.wrap("_bump")


class WrappedWritesAConstant(_Three):
    """A constant handed to a function the user wrapped: the program cannot see what it
    writes, so it may write into the constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        return self.fc(h @ _bump(self.q @ self.q.T, h))


class OutIntoAConstantReadBefore(_Three):
    """`out=` into a constant another step reads before the write: that read saw the last
    run's write in the program, a fresh zero tensor in the forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        buf = torch.zeros(64)
        y = h + buf
        torch.mul(h.mean(0), 2.0, out=buf)
        return self.fc(y + buf)


@pytest.mark.parametrize("fanout", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cls", [WritesConstant, WritesConstantInRegion, WritesAViewOfAConstant,
                                 ActInPlaceOnAConstant, WrappedWritesAConstant,
                                 OutIntoAConstantReadBefore],
                         ids=lambda c: c.__name__)
def test_a_write_into_a_constant_of_the_trace_runs_untraced_and_exact(cls, precision, fanout):
    """2."""
    model, variants, batches = _case(cls)
    state = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    _, res, got = _engine(model, variants, batches, precision, fanout)
    why = res.plan["untraced"] or ""
    assert "constant of the trace" in why, why
    assert torch.equal(got, _plain_loop(model, variants, batches, autocast=precision == "bf16"))
    want = _naive(model, variants, batches, precision)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])
    after = model.state_dict(keep_vars=True)
    for k, (obj, val) in state.items():
        assert after[k] is obj and torch.equal(after[k], val), k


def test_a_constant_only_read_keeps_the_trace():
    """2. Reading a constant into a new value that is then written in place (`(h @ m)`'s
    product, ReLU'd in place) writes nothing the forward builds once: traced."""

    class ReadsConstant(_Three):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
            return self.fc((h @ (self.q @ self.q.T)).relu_())

    model, _, _ = _case(ReadsConstant)
    prog = Program(model, precision=("fp32", CPU))
    assert prog.traced and prog.constants, prog.trace_error


# ---- mutants of the replay that every other test let through ---------------------------------


class ParamOnlyInRegion(nn.Module):
    """A float32 region after `b`'s cut holding a product of parameters alone (a bias added to
    b's fanned output): no fanned value flows into it, so a fanned run computes it once, not
    fanned, and must still run it in the region's state (in bf16 it was off by bf16's
    rounding, then cast back up)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.u = nn.Parameter(torch.randn(64, 64) * 0.1)
        self.v = nn.Parameter(torch.randn(64, 64) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        with torch.autocast("cpu", enabled=False):
            h = h.float() + (self.u @ self.v).float().mean(0)
        return self.fc(h)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_region_step_no_variant_reaches_runs_in_its_state_fanned(precision):
    """Mutant: `run_fanned` entered a region's state only for the fanned steps."""
    model, variants, batches = _case(ParamOnlyInRegion)
    _exact(ParamOnlyInRegion, precision, True)
    _, res, _ = _engine(model, variants, batches, precision, True)
    assert res.plan["fanout_fallbacks"] == {} and res.plan["fanned_variants"] > 0, res.plan


class LeaksDtype(nn.Module):
    """A forward that switches autocast's dtype (not whether it is on) and leaves it so."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(F.relu(self.a(x.flatten(1))))
        torch.set_autocast_dtype("cpu", torch.float16)
        return out


def test_a_forward_that_leaves_autocasts_dtype_switched_is_not_traced():
    """Mutant: the tracer's leak check compared only whether autocast is on."""
    model = LeaksDtype().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prog = Program(model, precision=("bf16", CPU))
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # the pass's, back
    assert not prog.traced and "switched" in (prog.trace_error or ""), prog.trace_error


def test_a_region_that_follows_the_pass_is_refused_naming_both_states():
    """Mutant: `_name` said "off" for every state: the reason names what the region was in
    each trace (bf16 with autocast off, off under the pass's bf16)."""
    from tests.engine.test_autocast_replay_s24 import FollowsPass

    model, _, _ = _case(FollowsPass)
    prog = Program(model, precision=("bf16", CPU))
    assert not prog.traced
    assert "(bfloat16 with autocast off, off under the pass's)" in (prog.trace_error or ""), \
        prog.trace_error


def test_the_unfolded_glue_unfolds_inside_a_region(monkeypatch):
    """Mutant: `_fanned_step` left an overridden conv's fold form as it was with
    glue="unfolded" (the K·B batch after every conv, the glue kept to measure what folding
    buys): ConvRegion's `c2`, in its float32 region, is followed by batch-form steps."""
    from tests.engine.test_autocast_replay_s24 import ConvRegion, spy_fanned

    runs = spy_fanned(monkeypatch)
    model, variants, batches = _case(ConvRegion)
    ev = Evaluator(model, variants, device="cpu", precision="bf16", fanout=True, glue="unfolded")
    res = ev.run(batches)
    assert res.plan["fanned_variants"] == len(variants), res.plan
    assert runs and all("fold" not in r for r in runs), runs
    assert any(r[:2] == ["module", "batch"] for r in runs), runs

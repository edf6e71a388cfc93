"""The compute floor's FLOP accounting (engine.flops) against hand counts and against running
each suffix under torch's own FLOP counter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from layerfast.engine import Evaluator
from layerfast.engine.flops import cumulative_flops, datasheet_rate, measure_rate, pass_flops
from layerfast.engine.graph import Program
from layerfast.engine.plan import make_plan
from layerfast.models import build_model
from layerfast.units import make_units


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval()


def test_mlp_counts_equal_the_hand_count() -> None:
    model = _mlp()
    macs = {"1": 64 * 256, "3": 256 * 256, "5": 256 * 10}
    keysets = [{"1.weight"}, {"1.weight"}, {"3.weight", "3.bias"}, {"5.bias"}, set()]
    plan = make_plan(Program(model), keysets, fanout=False, max_fanout=32)
    f = pass_flops(model, plan, (1, 8, 8), keysets)
    forward = 2 * sum(macs.values())
    assert f.forward == forward
    # two variants from the input, one from after layer 1, one only the head; the empty one is
    # the baseline itself and costs nothing
    assert f.suffixes == 2 * forward + 2 * (macs["3"] + macs["5"]) + 2 * macs["5"]
    assert f.naive == 5 * forward and f.needed == f.forward + f.suffixes


def test_every_cut_suffix_equals_torchs_count_of_running_it() -> None:
    """For a real residual net, `forward - cum[c]` is what running the suffix from cut c costs."""
    model, _ = build_model("resnet20", 10, (3, 32, 32))
    model.eval()
    prog = Program(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        cum = cumulative_flops(prog, x)
        with FlopCounterMode(display=False) as fc:
            model(x)
        assert cum[-1] == fc.get_total_flops() > 0
        assert all(a <= b for a, b in zip(cum, cum[1:], strict=False))
        cache: dict[int, torch.Tensor] = {}
        prog.run(x, 0, keep=set(prog.cuts), saved=cache)
        assert len(prog.cuts) > 5
        for c in prog.cuts[1:]:
            with FlopCounterMode(display=False) as fc:
                prog.run(cache[c], c)
            assert fc.get_total_flops() == cum[-1] - cum[c], c


def test_untraceable_model_counts_full_forwards() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace this
                x = x * 2
            return self.b(self.a(x.flatten(1)).relu())

    model = Untraceable()
    prog = Program(model)
    assert not prog.traced
    plan = make_plan(prog, [{"b.weight"}, {"a.bias"}], fanout=False, max_fanout=32)
    f = pass_flops(model, plan, (16,), [{"b.weight"}, {"a.bias"}])
    assert f.forward == 2 * (16 * 32 + 32 * 4)
    assert f.suffixes == 2 * f.forward  # no cut can be proven: each variant runs it all


def test_floor_counts_the_untraced_program_when_the_engine_ran_it_untraced() -> None:
    """fx follows one path through Python: here the trace takes the `c` branch (h is a Proxy
    while tracing), so the engine checks the trace on the first batch, finds it is not the
    forward and runs the model untraced. The floor re-traced the model and counted `c`."""

    class Tricky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x.flatten(1))
            if isinstance(h, torch.Tensor):
                return self.b(h.relu())
            return self.c(x.flatten(1))

    torch.manual_seed(0)
    model = Tricky().eval()
    variants = [{"b.weight": torch.zeros(4, 32)}, {"a.bias": torch.ones(32)}]
    ev = Evaluator(model, variants, device="cpu", precision="fp32", batch_size=8)
    ev.run([(torch.randn(8, 16), torch.randint(0, 4, (8,)))])
    assert ev.last_plan.untraced
    f = pass_flops(model, ev.last_plan, (16,), [set(v) for v in variants])
    forward = 2 * (16 * 32 + 32 * 4)
    assert f.forward == forward
    assert f.suffixes == f.suffixes_from_cut == 2 * forward  # one opaque step: all of it each


def test_evaluator_keeps_its_plan_and_the_floor_follows_it() -> None:
    model = _mlp()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    variants = [{"5.weight": torch.zeros(10, 256)}, {"1.weight": torch.zeros(256, 64)},
                {"3.weight": final["3.weight"]}]  # equal to the live weights: the baseline
    ev = Evaluator(model, variants, device="cpu", precision="fp32", batch_size=8)
    ev.run([(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))])
    assert ev.last_plan.same_as_baseline == [2]
    f = pass_flops(model, ev.last_plan, (1, 8, 8), [set(v) for v in variants])
    assert f.suffixes == f.forward + 2 * 256 * 10


class _Block(nn.Module):
    """stem -> (a -> relu -> b) + down -> relu -> head: a residual unit with its own skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 24)
        self.down, self.head = nn.Linear(16, 24), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).relu()
        return self.head((self.b(self.a(h).relu()) + self.down(h)).relu())


def test_floor_counts_only_the_steps_that_depend_on_the_change() -> None:
    """A variant of `b` starts at the block's input, but `a` and `down` compute the baseline's
    own values for it: the floor (a lower bound) counts b and head, `suffixes_from_cut` all."""
    torch.manual_seed(0)
    model = _Block().eval()
    m = {"stem": 8 * 16, "a": 16 * 32, "b": 32 * 24, "down": 16 * 24, "head": 24 * 4}
    keysets = [{"b.weight"}, {"a.weight", "a.bias"}, {"down.bias"}, {"head.weight"}]
    plan = make_plan(Program(model), keysets, fanout=False, max_fanout=32)
    assert sorted(len(g.members) for g in plan.groups) == [1, 1, 1, 1]
    f = pass_flops(model, plan, (8,), keysets)
    assert f.forward == 2 * sum(m.values())
    cones = (m["b"] + m["head"]) + (m["a"] + m["b"] + m["head"]) + (m["down"] + m["head"]) + m["head"]
    assert f.suffixes == 2 * cones
    assert f.suffixes_from_cut == 2 * (3 * (m["a"] + m["b"] + m["down"] + m["head"]) + m["head"])


class _Flops(TorchDispatchMode):
    """torch's FLOP formulas without FlopCounterMode's global module hooks: with those
    registered the engine refuses to fan out (it cannot see what a hook would do)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.total += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def test_floor_is_never_above_what_the_engine_runs() -> None:
    """Counted under torch's FLOP formulas, the engine's pass (baseline + suffixes) computes
    exactly forward + suffixes_from_cut on the swap path, and with fan-out, which runs the steps
    a group shares once, no less than the floor. (The floor used to be the swap path's count,
    above what the fan-out runs at layer granularity: not a floor.)"""
    torch.manual_seed(0)
    model, spec = build_model("resnet20", 10, (3, 16, 16))
    model.eval()
    sd = model.state_dict()
    units = [u for u in make_units(model, granularity="layer", arch=spec)
             if u.name.startswith(("layer2.", "fc"))]
    variants = [{k: sd[k] * (1 + 0.01 * j) for k in u.keys if sd[k].is_floating_point()}
                for u in units for j in (1, 2, 3)]
    keysets = [set(v) for v in variants]
    n = 4
    batch = [(torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,)))]
    for fan in (False, True):
        ev = Evaluator(model, variants, device="cpu", precision="fp32", batch_size=n, fanout=fan)
        ev.run(batch)  # once uncounted: the first pass also checks the trace against the forward
        # Every `run` checks the model again (session 21: the caller may have changed it); the
        # checks' forwards are not the pass this test counts, so this run keeps the verdicts.
        ev._forget_checks = lambda: None
        with _Flops() as counter:
            res = ev.run(batch)
        f = pass_flops(model, ev.last_plan, (3, 16, 16), keysets)
        assert f.suffixes < f.suffixes_from_cut  # layer units inside blocks: cones are smaller
        if fan:
            assert res.plan["fanned_variants"] > 0 and not res.plan["fanout_fallbacks"]
            assert f.needed * n <= counter.total < (f.forward + f.suffixes_from_cut) * n
        else:
            assert counter.total == (f.forward + f.suffixes_from_cut) * n


def test_rates() -> None:
    rate = measure_rate(torch.device("cpu"), "fp32", seconds=0.05)
    assert math.isfinite(rate) and 1e8 < rate < 1e14
    assert datasheet_rate(torch.device("cpu"), "bf16") is None


def test_measured_rate_is_the_best_chunk_not_the_mean() -> None:
    """On a shared machine a chunk slowed by another process says nothing about the matrix
    unit; the mean over all chunks made the rate too low and the floor too high (layerfast
    looked closer to it). A fake clock: chunks of 5 GEMMs take 1.0 s, 0.1 s, 1.0 s."""
    ticks = iter([0.0, 0.0, 1.0, 1.0, 1.1, 1.1, 2.1])
    rate = measure_rate(torch.device("cpu"), "fp32", seconds=2.0, clock=lambda: next(ticks))
    assert rate == pytest.approx(2 * 1024**3 * 5 / 0.1)
    assert next(ticks, None) is None  # it stopped once `seconds` had passed


@pytest.mark.cuda
def test_rates_cuda() -> None:
    dev = torch.device("cuda")
    rate = measure_rate(dev, "bf16", seconds=0.2)
    sheet = datasheet_rate(dev, "bf16")
    assert rate > 1e13
    if sheet is not None:
        assert rate < 1.05 * sheet

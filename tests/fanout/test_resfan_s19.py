"""Resume and multi-pass with fan-out on (the GPU default), checked on the CPU (session 19).

Verified without a defect (scratch experiments, not kept as tests: the existing resume tests
cover the mechanics): with `fanout="on"`, a KeyboardInterrupt after a progress save, a SIGKILLed
`layerfast analyze --fanout on` subprocess, a kill inside pass 2 of a multi-pass study, a resume
after a simulated out-of-memory in a fanned chunk, interp and joint variants, all end with
results.csv (or the Evaluator's sums) bit for bit those of an uninterrupted fanned run; resuming
under another --fanout / --batch-size / --layout is refused. What is kept here are the plan
defects found on the way, which fan-out on makes visible.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerfast.engine.evaluator as evm
from layerfast.engine import Evaluator


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def _mlp() -> nn.Module:
    """A registry-like FCN: a parameterless first step (Flatten), so no variant starts at 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32),
                         nn.ReLU(), nn.Linear(32, 5)).eval()


def _data(n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def _shifted(model: nn.Module, names: list[str], eps: float) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: sd[k] + eps for k in sd if k.rsplit(".", 1)[0] in names}


def test_every_fanned_groups_fallback_is_reported_when_two_share_a_start(monkeypatch) -> None:
    """A unit's variants and a joint reset starting at the same unit are two groups at one start
    step. run.json's `fanout_fallbacks` was a dict comprehension keyed by start, so the second
    group's reason overwrote the first's: a group that lost its fan-out went unreported (its
    `fanout_refused` sibling already joined such reasons)."""
    model = _mlp()
    variants = [{}, _shifted(model, ["1"], 0.01), _shifted(model, ["1"], 0.02),
                _shifted(model, ["1", "3"], 0.01), _shifted(model, ["1", "3"], 0.02)]
    seen: list[str] = []

    def broken(prog, plan, inp, stacks, K, **kw):
        mods = ",".join(sorted(plan.modules))
        seen.append(mods)
        raise RuntimeError(f"simulated failure in {mods}")

    monkeypatch.setattr(evm, "run_fanned", broken)
    res = Evaluator(model, variants, device="cpu", fanout=True).run(_data())
    assert set(seen) == {"1", "1,3"} and res.plan["fanned_variants"] == 0
    assert res.plan["fanout_fallbacks"] == {
        "1": "RuntimeError: simulated failure in 1; RuntimeError: simulated failure in 1,3"}


def test_every_fanned_groups_back_off_shows_in_kmax_when_two_share_a_start(monkeypatch) -> None:
    """`kmax` ("each fanned group's K", docs/engine.md Memory) was keyed by start step too: an
    out-of-memory back-off of one of two groups at one start was shown or hidden by which group
    came last. Where groups share a start, the smallest K is the one that says a back-off."""
    model = _mlp()
    variants = [{}, _shifted(model, ["1"], 0.01), _shifted(model, ["1"], 0.02),
                _shifted(model, ["1"], 0.03), _shifted(model, ["1", "3"], 0.01),
                _shifted(model, ["1", "3"], 0.02)]
    real, failed = evm.run_fanned, []

    def oom_once_on_the_unit(prog, plan, inp, stacks, K, **kw):
        if sorted(plan.modules) == ["1"] and K == 3 and not failed:
            failed.append(K)
            raise torch.OutOfMemoryError("simulated")
        return real(prog, plan, inp, stacks, K, **kw)

    monkeypatch.setattr(evm, "run_fanned", oom_once_on_the_unit)
    res = Evaluator(model, variants, device="cpu", fanout=True).run(_data())
    assert failed == [3] and res.plan["fanned_variants"] == 5
    assert res.plan["kmax"] == {"1": 1}, res.plan["kmax"]


def test_whole_model_variants_take_the_swap_path_after_a_parameterless_first_step() -> None:
    """docs/engine.md and plan.py: whole-model variants (fullmodel) share nothing with the
    baseline, so fanning them buys only a bigger batch and costs bit-exactness; they take the
    swap path. The rule asked for start step 0, but a model whose first step holds no
    parameters (fcn3x256's Flatten, an input normalization) starts them after it: fcn3x256's
    fullmodel rows were fanned, with fan-out on (the CUDA default), and lost their bits."""
    model = _mlp()
    whole = [{}, *(_shifted(model, ["1", "3", "5"], eps) for eps in (0.01, 0.02, 0.03))]
    on = Evaluator(model, whole, device="cpu", fanout=True).run(_data())
    off = Evaluator(model, whole, device="cpu", fanout=False).run(_data())
    assert on.plan["fanned_variants"] == 0 and on.plan["swapped_variants"] == 3, on.plan
    assert "whole-model variants take the swap path" in " ".join(on.plan["fanout_refused"].values())
    assert torch.equal(on.counts, off.counts)  # the swap path's bits, loss sums included

"""A forward that sets `torch.autocast` itself for part of it (review s23, the CPU bf16 mode).

torch.fx records the ops, not the `with torch.autocast(...)` around them: the traced program
ran a head the model keeps in float32 (`with torch.autocast("cpu", enabled=False)`) in bf16
under `--precision bf16`, so the engine's logits were not the model's own forward's under the
same autocast (max |Δlogit| 2e-3 here). The first-batch check runs in fp32, where that region
changes nothing, so it passed. Such a model ran untraced (its own forward) wherever a
region set autocast otherwise than the pass; since s24 it keeps its trace, each step run under
its region's state (tests/engine/test_autocast_replay_s24.py has the full matrix).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from tests.engine.test_bf16_s18 import _plain_loop  # reset, own forward (autocast per variant)


class Float32Head(nn.Module):
    """Two layers under the caller's autocast, a head the model keeps in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        with torch.autocast("cpu", enabled=False):
            return self.fc(h.float())


class Bf16Middle(nn.Module):
    """A middle layer the model itself runs in bfloat16, whatever the caller's mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = F.relu(self.b(h))
        return self.fc(h.float())


def _case(cls: type[nn.Module]):
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 10, (300,), generator=g)
    variants = [{"a.weight": torch.randn(64, 64, generator=g) * 0.1},
                {"b.weight": torch.randn(64, 64, generator=g) * 0.1},
                {"fc.weight": torch.randn(10, 64, generator=g) * 0.1}]
    return model, variants, [(x[:150], y[:150]), (x[150:], y[150:])]


def _engine(model, variants, batches, precision: str, fanout: bool):
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg)

    res = Evaluator(model, variants, device="cpu", precision=precision, fanout=fanout).run(
        batches, on_logits=hook)
    return res, torch.stack([torch.cat(got[i]) for i in range(len(variants))]).float()


@pytest.mark.parametrize("fanout", [False, True])
def test_bf16_keeps_a_float32_region_of_the_forward(fanout):
    """Traced since s24 (was: untraced), the head still in float32."""
    model, variants, batches = _case(Float32Head)
    res, got = _engine(model, variants, batches, "bf16", fanout)
    assert res.precision == "bf16"
    ref = _plain_loop(model, variants, batches, autocast=True)
    assert torch.equal(got, ref), f"max |Δlogit| {(got - ref).abs().max():.3g}"
    assert res.plan["untraced"] is None, res.plan["untraced"]


def test_fp32_keeps_the_trace_where_the_region_changes_nothing():
    """Under fp32 autocast is off already: `enabled=False` is a no-op, and prefix sharing stays."""
    model, variants, batches = _case(Float32Head)
    res, got = _engine(model, variants, batches, "fp32", False)
    assert res.plan["untraced"] is None
    assert torch.equal(got, _plain_loop(model, variants, batches, autocast=False))


def test_fp32_runs_a_models_own_bf16_region_traced():
    """Traced since s24 (was: untraced, saying why), the region still in bf16."""
    model, variants, batches = _case(Bf16Middle)
    res, got = _engine(model, variants, batches, "fp32", False)
    assert torch.equal(got, _plain_loop(model, variants, batches, autocast=False))
    assert res.plan["untraced"] is None, res.plan["untraced"]


def test_the_callers_autocast_state_is_back_after_the_trace():
    model, variants, batches = _case(Float32Head)
    with torch.autocast("cpu", dtype=torch.float16):
        _engine(model, variants, batches, "bf16", False)
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.float16
    assert not torch.is_autocast_enabled("cpu")

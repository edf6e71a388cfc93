"""Attacks on session 24's autocast-region replay (d0babbd): one test per defect found, and the
tests that kill the mutants of the replay the other tests let through.

1. A constant the forward computes for real while tracing (a fixed matrix `q @ q.T` built from
   tensors it holds) was recorded from the trace with autocast off: float32. Under a bf16 pass
   the eager forward computes it in bfloat16, so the traced program's logits were off by bf16's
   rounding (max |Δlogit| 0.004 here, counts changed) while the first-batch check, in fp32,
   saw nothing. The program now reads the pass's own value of such a constant where the
   pass's state is in force (`tracing.trace_for_pass`'s third item, `Program.fetch`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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

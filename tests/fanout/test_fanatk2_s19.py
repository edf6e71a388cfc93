"""Adversarial models against the fan-out *execution* (session 19, round 2): cases where the
proof (`fanout.prove_fan`) is right that the graph is per-sample, but the fanned run
(`fanrun.run_fanned` and the Evaluator's chunking around it) computed something else than the
naive loop, or crashed instead of falling back or refusing with a clear message.

1. `Evaluator(max_fanout=0)` (or a negative, bool or non-integer K cap): K = 0 chunks, and
   `torch.stack` of an empty list raised a bare RuntimeError from deep in the pass (a negative
   cap silently sent every group to the swap path as a "fallback"). Refused up front now, as
   `glue` and `fanout` are.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.errors import LayerfastError


def _lin_variants(model: nn.Module, n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{k: torch.randn(t.shape, generator=g) for k, t in model[0].named_parameters(
        prefix="0")} for _ in range(n)]


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "4", None])
def test_a_bad_max_fanout_is_refused_up_front(bad: object) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    with pytest.raises(LayerfastError, match="max_fanout must be a positive integer"):
        Evaluator(model, _lin_variants(model), device="cpu", fanout=True, max_fanout=bad)


def test_max_fanout_one_and_numpy_ints_still_run() -> None:
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    x = torch.randn(6, 8)
    data = [(x, torch.randint(0, 10, (6,)))]
    for cap in (1, np.int64(2)):
        res = Evaluator(model, _lin_variants(model), device="cpu", fanout=True,
                        max_fanout=cap).run(data)
        assert res.plan["fanned_variants"] == 3 and not res.plan["fanout_fallbacks"], res.plan
        assert res.plan["kmax"] == {"0": int(cap)}, res.plan

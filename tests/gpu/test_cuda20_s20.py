"""Defects found while writing the CUDA twins of session 20 (tests/gpu/test_cuda_s20.py); these
run on the CPU.

1. `verify.trace_differs` found a weight-derived cache only in an attribute that was None or
   absent before the first call (`if self.wc is None: self.wc = ...`). The same cache kept in a
   dict or list the module made empty in `__init__` (`self.cache = {}`, filled in place on the
   first call) or in an attribute that starts as an empty tensor was not found: the model stayed
   traced, the program recomputed the weight for every variant while the model's own forward
   (the naive loop) reused its first call's, and the counts differed, silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.evaluator import Evaluator
from layerfast.engine.naive import naive_evaluate
from tests.engine.test_traceatk_s19 import _batches
from tests.fanout.test_fan_s19 import _variants


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


class _HeldCache(nn.Module):
    """`a`'s weight cached on the first call in a container or an attribute that is not None
    before it (`kind`), and reused after."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.cache: dict | list | torch.Tensor = (
            {} if kind == "dict" else [] if kind == "list" else torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dict":
            if "w" not in self.cache:
                self.cache["w"] = self.a.weight * 1.0
            w = self.cache["w"]
        elif self.kind == "list":
            if not self.cache:
                self.cache.append(self.a.weight * 1.0)
            w = self.cache[0]
        else:
            if self.cache.numel() == 0:
                self.cache = self.a.weight * 1.0
            w = self.cache
        h = torch.relu(F.linear(x, w, self.a.bias))
        return self.c(torch.relu(self.b(h)))


class _Shapes(nn.Module):
    """A dict cache of a table keyed by the input's shape: not derived from weights, stays
    traced (the program's recomputation is the same for every variant)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.tables: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "t" not in self.tables:
            self.tables["t"] = torch.arange(64, dtype=x.dtype, device=x.device) / 64
        h = torch.relu(self.a(x) + self.tables["t"])
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("kind", ["dict", "list", "empty-tensor"])
def test_a_weight_cache_held_in_a_container_or_an_empty_tensor_is_the_models_own(
        kind: str, fanout: bool) -> None:
    torch.manual_seed(0)
    m = _HeldCache(kind).eval()
    variants = _variants(m, ["a", "b", "c"], n=2)
    batches = _batches()
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    assert "cache" in str(res.plan.get("untraced")), res.plan
    # the model comes back holding its own (empty) cache
    assert (m.cache.numel() == 0) if kind == "empty-tensor" else (len(m.cache) == 0)
    torch.manual_seed(0)
    ref = _HeldCache(kind).eval()
    want = naive_evaluate(ref, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


def test_a_table_cached_in_a_dict_keeps_the_trace() -> None:
    torch.manual_seed(0)
    m = _Shapes().eval()
    res = Evaluator(m, _variants(m, ["a", "b"], n=1), device="cpu", precision="fp32").run(
        _batches())
    assert res.plan.get("untraced") is None, res.plan
    assert m.tables == {}

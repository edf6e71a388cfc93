"""Review of session 20's later commits (e9f438f..128f871), CUDA-twins pass: defects found on
the CPU while writing tests/gpu/test_cuda_s20b.py.

1. The effects check made a step opaque when it handed a tensor's values to Python through
   `.item()` / `float()` / `.tolist()` / `.numpy()`, but not through a value-dependent op whose
   answer is Python's: `torch.equal` / `torch.allclose` (a bool; torch tags them
   `data_dependent_output`), or an output whose size the values set, read as a Python int
   (`h.nonzero().shape[0]`, `len(h[h > 0.5])`, `torch.unique(h).numel()`: tagged
   `dynamic_output_shape`). Kept in Python state and read by a later step, c's variants (started
   after the step) ran on the number a's last variant had left: other counts than the naive
   loop (the loss sum 4.8 to 44 apart), swapped or fanned.
2. `np.from_dlpack(h)` (`Tensor.__dlpack__`: numpy's view of the storage, as `.numpy()` is,
   and the one that works on a CUDA tensor) was neither an escape nor a write: kept in Python
   state (`np.from_dlpack(h).copy()`) the loss sum was 13 from the naive loop, and a write
   through it into the input or a cut's carrier was doubled again by each variant.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.evaluator import Evaluator
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate
from tests.effects.test_effects3_s20 import _Four
from tests.effects.test_effects4_s20 import _escaping
from tests.engine.test_traceatk_s19 import _batches
from tests.fanout.test_fan_s19 import _variants

# ---- 1. a Python value made by a value-dependent op, kept in Python state --------------------

_VALUE_DEPENDENT: dict[str, Callable[[], nn.Module]] = {
    # a bool: whether most samples' first feature is positive / the mean near 0.3 (each
    # differs between a's last variant and the final model on some batch)
    "equal": _escaping(
        lambda h: torch.equal((h[:, 0] > 0).sum() > h.shape[0] // 2, torch.tensor(True)),
        lambda g, s: g * (3.0 if s else -1.0)),
    "allclose": _escaping(lambda h: torch.allclose(h.mean(), torch.tensor(0.3), atol=0.15),
                          lambda g, s: g * (3.0 if s else -1.0)),
    # a Python int: how many samples have a positive first feature
    "nonzero-shape": _escaping(lambda h: (h[:, 0] > 0.3).nonzero().shape[0],
                               lambda g, s: g * (1 + s)),
    "mask-len": _escaping(lambda h: len(h[h > 0.5]), lambda g, s: g * s / 100),
    "unique-numel": _escaping(lambda h: torch.unique((h * 3).round()).numel(),
                              lambda g, s: g * s / 10),
}


def _found(make: Callable[[], nn.Module]) -> set[int]:
    prog = Program(make().eval())
    found = prog.unseen_effects(torch.randn(8, 64))
    assert found is not None
    b = next(s.index for s in prog.steps if s.target == "b")
    return {b} & found[0]


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("name", list(_VALUE_DEPENDENT))
def test_a_value_dependent_python_value_kept_in_python_state(name: str, fanout: bool) -> None:
    make = _VALUE_DEPENDENT[name]
    assert _found(make), "b hands its values to Python: it must be among the reads"
    m = make().eval()
    variants = _variants(m, ["a", "c"], n=3)
    batches = _batches()
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(
        copy.deepcopy(batches))
    want = naive_evaluate(make().eval(), variants, lambda: copy.deepcopy(batches))
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4), (res.counts, want)


class _Gathers(nn.Module):
    """Integer-index gathers (`h[:, idx]`, `torch.index_select`): their sizes do not depend on
    the values (aten.index.Tensor is tagged `dynamic_output_shape` for a boolean mask's
    sake), so nothing is handed to Python."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 10)
        self.register_buffer("idx", torch.arange(63, -1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))[:, self.idx]
        h = h + torch.index_select(h, 1, self.idx) + h[:, self.idx[:1]]
        return self.b(h)


def test_integer_gathers_hand_nothing_to_python() -> None:
    assert Program(_Gathers().eval()).unseen_effects(torch.randn(8, 64)) == (set(), set())


def test_a_plain_four_layer_model_hands_nothing_to_python() -> None:
    assert Program(_Four().eval()).unseen_effects(torch.randn(8, 64)) == (set(), set())


# ---- 2. numpy through DLPack (`np.from_dlpack(h)`): `.numpy()`'s twin, on any device ------------


_DLPACK_KEPT = _escaping(lambda h: np.from_dlpack(h).copy(),
                         lambda g, s: g + torch.from_numpy(s))


def _dlpack_writes(where: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        """`where`'s forward doubles part of its argument through `np.from_dlpack` (a view of
        its storage, as `.numpy()` is): the input (a) or the carrier of the cut before b."""
        torch.manual_seed(0)
        m = _Four()
        mod = m.get_submodule(where)

        def f(h: torch.Tensor) -> torch.Tensor:
            np.from_dlpack(h)[:, :8] *= 2
            return F.linear(h, mod.weight, mod.bias)

        mod.forward = f
        return m

    return build


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
def test_values_handed_to_numpy_through_dlpack_and_kept(fanout: bool) -> None:
    """b keeps `np.from_dlpack(h).copy()`, d adds it: c's variants ran d on a's last
    variant's array (the loss sum 13 from the naive loop) as they did with `.numpy()`."""
    assert _found(_DLPACK_KEPT)
    _matches_naive(_DLPACK_KEPT, ["a", "c"], fanout)


@pytest.mark.parametrize("where", ["a", "b"])
def test_a_write_through_dlpack_into_a_cached_value(where: str) -> None:
    """The write is past the dispatcher, as `.numpy()`'s: each variant started from the
    cached input (or cut carrier) doubled it again."""
    _matches_naive(_dlpack_writes(where), [where, "c"], fanout=False)


def _matches_naive(make: Callable[[], nn.Module], mods: list[str], fanout: bool) -> None:
    m = make().eval()
    variants = _variants(m, mods, n=3)
    batches = _batches()
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(
        copy.deepcopy(batches))
    want = naive_evaluate(make().eval(), variants, lambda: copy.deepcopy(batches))
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4), (res.counts, want)

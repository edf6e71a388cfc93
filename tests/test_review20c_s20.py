"""The first-batch effects check (`engine.effects.unseen_effects`) after the session-20 merge:
channels by which a step hands a tensor's values to Python that the merged check missed, and
combinations of two channels in one step. The engine's counts must equal the naive loop's."""

from __future__ import annotations

import pytest
import torch

from layerfast.engine.graph import Program
from tests.test_effects4_s20 import _escaping, _matches_naive


def _sign(g: torch.Tensor, s: object) -> torch.Tensor:
    """g's features negated where b's flag for them was unset (8 flags, tiled)."""
    return g * torch.tensor([1.0 if f else -1.0 for f in s] * 8)  # type: ignore[attr-defined]


def _flags(test: object) -> object:
    """b's flags: whether each of h's first sample's first 8 features is positive, each told
    by `test` (an op returning a Python bool, not `.item()`): a's variants change them."""
    return lambda h: [test(h[:1, j:j + 1]) for j in range(8)]  # type: ignore[operator]


_ONE = torch.ones(1, 1, dtype=torch.bool)
_EQUAL = _escaping(_flags(lambda v: torch.equal(v > 0, _ONE)), _sign)  # type: ignore[arg-type]
_ALLCLOSE = _escaping(_flags(lambda v: not torch.allclose(  # type: ignore[arg-type]
    v, torch.zeros(1, 1), rtol=0, atol=0)), _sign)
_INFER_BOOL = _escaping(_flags(lambda v: _bool_in_inference(v)), _sign)  # type: ignore[arg-type]


def _bool_in_inference(h: torch.Tensor) -> bool:
    """`bool(t)` inside `inference_mode` dispatches `aten.is_nonzero` whole."""
    with torch.inference_mode():
        return bool(h[0, 0] > 0)


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("make", [_EQUAL, _ALLCLOSE, _INFER_BOOL],
                         ids=["equal", "allclose", "inference_bool"])
def test_a_python_value_made_past_item_is_an_escape(make, fanout: bool) -> None:  # noqa: ANN001
    """`torch.equal` / `torch.allclose` (ops returning a bool) and `bool(t)` under
    `inference_mode` (`aten.is_nonzero`) hand b's values to Python as `.item()` does: c's
    variants started after b and ran d with the flags a's last variant had left."""
    _matches_naive(make, ["a", "c"], fanout)


def test_escape_flags_are_found_per_step() -> None:
    """Only the steps that hand values to Python are found."""
    m = _EQUAL().eval()
    prog = Program(m)
    found = prog.unseen_effects(torch.randn(4, 64))
    assert found is not None
    b = next(s.index for s in prog.steps if s.op == "call_module" and s.target == "b")
    assert found[0] == {b}, found

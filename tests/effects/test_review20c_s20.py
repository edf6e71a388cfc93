"""The first-batch effects check (`engine.effects.unseen_effects`) after the session-20 merge:
channels by which a step hands a tensor's values to Python that the merged check missed, and
combinations of two channels in one step. The engine's counts must equal the naive loop's."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.graph import Program
from tests.effects.test_effects3_s20 import _Four
from tests.effects.test_effects4_s20 import _escaping, _matches_naive


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
_DLPACK = _escaping(lambda h: np.from_dlpack(h).copy(), lambda g, s: g + torch.from_numpy(s))


def _bool_in_inference(h: torch.Tensor) -> bool:
    """`bool(t)` inside `inference_mode` dispatches `aten.is_nonzero` whole."""
    with torch.inference_mode():
        return bool(h[0, 0] > 0)


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("make", [_EQUAL, _ALLCLOSE, _INFER_BOOL, _DLPACK],
                         ids=["equal", "allclose", "inference_bool", "dlpack"])
def test_a_python_value_made_past_item_is_an_escape(make, fanout: bool) -> None:  # noqa: ANN001
    """`torch.equal` / `torch.allclose` (ops returning a bool), `bool(t)` under
    `inference_mode` (`aten.is_nonzero`) and `np.from_dlpack(t)` (numpy's view past
    `.numpy()`) hand b's values to Python as `.item()` does: c's variants started after b
    and ran d with the flag (or array) a's last variant had left."""
    _matches_naive(make, ["a", "c"], fanout)


def test_escape_flags_are_found_per_step() -> None:
    """Only the steps that hand values to Python are found."""
    m = _EQUAL().eval()
    prog = Program(m)
    found = prog.unseen_effects(torch.randn(4, 64))
    assert found is not None
    b = next(s.index for s in prog.steps if s.op == "call_module" and s.target == "b")
    assert found[0] == {b}, found


def _dlpack_writes(where: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        """`where`'s forward doubles part of its argument through `np.from_dlpack`: the
        input (a) or the carrier of the cut before b."""
        torch.manual_seed(0)
        m = _Four()
        mod = m.get_submodule(where)

        def f(h: torch.Tensor) -> torch.Tensor:
            np.from_dlpack(h)[:, :8] *= 2
            return F.linear(h, mod.weight, mod.bias)

        mod.forward = f
        return m

    return build


@pytest.mark.parametrize("where", ["a", "b"])
def test_a_write_through_numpy_from_dlpack_into_a_cached_value(where: str) -> None:
    """numpy's dlpack view writes past the dispatcher as `.numpy()`'s does: each variant
    started from the cached value doubled it again."""
    _matches_naive(_dlpack_writes(where), [where, "c"], fanout=False)


# Two channels in one model: a side tensor and an escape, a side tensor written through
# numpy, an escape inside a hook, a plain attribute written through numpy.


def _side_and_item() -> nn.Module:
    """b keeps h * 2 on the side and the float h.max(); d uses both."""
    torch.manual_seed(0)
    m = _Four()
    box: dict[str, object] = {}
    b, d = m.b, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        box["t"], box["s"] = h * 2, float(h.max())
        return F.linear(h, b.weight, b.bias)

    m.b.forward = fb
    m.d.forward = lambda g: F.linear(g * box["s"] + box["t"], d.weight, d.bias)  # type: ignore[operator]
    return m


def _side_numpy_write() -> nn.Module:
    """b makes a zero accumulator on the side, c adds its input into it through `.numpy()`,
    d adds it to its input."""
    torch.manual_seed(0)
    m = _Four()
    box: dict[str, torch.Tensor] = {}
    b, c, d = m.b, m.c, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        box["acc"] = torch.zeros(h.shape[0], 64)
        return F.linear(h, b.weight, b.bias)

    def fc(g: torch.Tensor) -> torch.Tensor:
        box["acc"].numpy()[:] += g.numpy()
        return F.linear(g, c.weight, c.bias)

    m.b.forward, m.c.forward = fb, fc
    m.d.forward = lambda g: F.linear(g + box["acc"], d.weight, d.bias)
    return m


def _hook_item() -> nn.Module:
    """A forward hook on b keeps the float out.max(); d scales its input by it."""
    torch.manual_seed(0)
    m = _Four()
    box: dict[str, float] = {}
    d = m.d
    m.b.register_forward_hook(lambda mod, i, o: box.__setitem__("s", o.max().item()))
    m.d.forward = lambda g: F.linear(g * box["s"], d.weight, d.bias)
    return m


def _attr_numpy_write() -> nn.Module:
    """b writes h's first row into a plain tensor attribute through `.numpy()` (no step made
    the attribute); d adds it to its input."""
    torch.manual_seed(0)
    m = _Four()
    keep = torch.zeros(1, 64)
    b, d = m.b, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        keep.numpy()[:] = h[:1].numpy()
        return F.linear(h, b.weight, b.bias)

    m.b.forward = fb
    m.d.forward = lambda g: F.linear(g + keep, d.weight, d.bias)
    return m


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("make", [_side_and_item, _side_numpy_write, _hook_item,
                                  _attr_numpy_write],
                         ids=["side_and_item", "side_numpy_write", "hook_item", "attr_numpy"])
def test_two_channels_in_one_model(make: Callable[[], nn.Module], fanout: bool) -> None:
    _matches_naive(make, ["a", "c"], fanout)


# `Tensor.apply_` / `map_` / `map2_`: CPU methods past the dispatcher that write into their
# tensor in place and hand its elements (and the others') to a Python callable.


def _python_writes(where: str, how: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        """`where`'s forward doubles its argument in place by a Python callable (`how`):
        the input (a) or the carrier of the cut before b."""
        torch.manual_seed(0)
        m = _Four()
        mod = m.get_submodule(where)

        def f(h: torch.Tensor) -> torch.Tensor:
            if how == "apply_":
                h.apply_(lambda v: v * 2)
            elif how == "map_":
                h.map_(h, lambda u, v: u + v)
            else:
                h.map2_(h, h, lambda u, v, w: u + v)
            return F.linear(h, mod.weight, mod.bias)

        mod.forward = f
        return m

    return build


@pytest.mark.parametrize("how", ["apply_", "map_", "map2_"])
@pytest.mark.parametrize("where", ["a", "b"])
def test_a_write_by_a_python_callable_into_a_cached_value(where: str, how: str) -> None:
    """The write is past the dispatcher, as `.numpy()`'s is: each variant started from the
    cached value (the input, the cut's carrier) doubled it again."""
    _matches_naive(_python_writes(where, how), [where, "c"], fanout=False)


_APPLY = _escaping(lambda h: _kept_by_apply(h), lambda g, s: g * torch.tensor(s)[:, None])


def _kept_by_apply(h: torch.Tensor) -> list[float]:
    """The first column's values, as the callable `apply_` runs on a copy saw them."""
    seen: list[float] = []
    h[:, 0].clone().apply_(lambda v: seen.append(v) or v)
    return seen


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
def test_values_a_python_callable_saw_kept_in_python_state(fanout: bool) -> None:
    _matches_naive(_APPLY, ["a", "c"], fanout)


def _map_reads(how: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        """b keeps its input h (a's value) in a dict; d adds it to a copy of its input by
        `map_` / `map2_`, past the dispatcher: a read of h past d's arguments."""
        torch.manual_seed(0)
        m = _Four()
        box: dict[str, torch.Tensor] = {}
        b, d = m.b, m.d

        def fb(h: torch.Tensor) -> torch.Tensor:
            box["h"] = h
            return F.linear(h, b.weight, b.bias)

        def fd(g: torch.Tensor) -> torch.Tensor:
            g2 = g.clone()
            if how == "map_":
                g2.map_(box["h"], lambda u, v: u + v)
            else:
                g2.map2_(g, box["h"], lambda u, v, w: v + w)
            return F.linear(g2, d.weight, d.bias)

        m.b.forward, m.d.forward = fb, fd
        return m

    return build


@pytest.mark.parametrize("how", ["map_", "map2_"])
def test_a_read_by_map_past_the_arguments(how: str) -> None:
    """The tensors `map_` / `map2_` read besides their own are reads past the dispatcher: a
    value reached through Python state that way makes its producer opaque, as a dispatched
    read does (c's variants started after b and added a's last variant's h)."""
    _matches_naive(_map_reads(how), ["a", "c"], fanout=False)


def _returns_kept(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        """b keeps a tensor in a dict (`value`: its input h, a's value; `side`: one it makes,
        relu(h) * 2); c returns it as its own value, running no op on it (a memo)."""
        torch.manual_seed(0)
        m = _Four()
        box: dict[str, torch.Tensor] = {}
        b = m.b

        def fb(h: torch.Tensor) -> torch.Tensor:
            box["h"] = h if kind == "value" else torch.relu(h) * 2
            return F.linear(h, b.weight, b.bias)

        m.b.forward = fb
        m.c.forward = lambda g: box["h"]
        return m

    return build


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("kind", ["value", "side"])
def test_a_step_returning_a_tensor_kept_in_python_state(kind: str, fanout: bool) -> None:
    """No op of c's touches the kept tensor, so the mode saw no read past its arguments; its
    value is one: c's variants started after b and returned what a's last variant had left."""
    _matches_naive(_returns_kept(kind), ["a", "c"], fanout)

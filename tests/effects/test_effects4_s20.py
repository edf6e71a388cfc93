"""The first-batch effects check (`engine.effects.unseen_effects`), session 20, fourth pass:
hidden channels between steps other than a step's value kept in Python state — a tensor a
step makes on the side (`box.append(h.mean(1))`, a module-level global, a forward hook's
closure) and a later step reads or writes. The engine's counts must equal the naive loop's,
swapped or fanned."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.evaluator import Evaluator
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate
from tests.effects.test_effects3_s20 import _Four
from tests.engine.test_traceatk_s19 import _batches
from tests.fanout.test_fan_s19 import _variants


def _matches_naive(make: Callable[[], nn.Module], mods: list[str], fanout: bool) -> None:
    """Counts equal the naive loop's in fp32, on a fresh model and fresh batches."""
    m = make().eval()
    variants = _variants(m, mods, n=3)
    batches = _batches()
    before = copy.deepcopy(batches)
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    want = naive_evaluate(make().eval(), variants, lambda: copy.deepcopy(before))
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


# A tensor made on the side by one step (not its value), kept in Python state, read later.

_SIDE: dict[str, torch.Tensor] = {}


def _side_list() -> nn.Module:
    """b keeps h.mean(1) in a closure's list; d adds the last one to its input."""
    torch.manual_seed(0)
    m = _Four()
    box: list[torch.Tensor] = []
    b, d = m.b, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        box.append(h.mean(1, keepdim=True))
        return F.linear(h, b.weight, b.bias)

    m.b.forward = fb
    m.d.forward = lambda g: F.linear(g + box[-1], d.weight, d.bias)
    return m


def _side_global() -> nn.Module:
    """b keeps h * 2 in a module-level dict; d adds it to its input."""
    torch.manual_seed(0)
    m = _Four()
    b, d = m.b, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        _SIDE["s"] = h * 2
        return F.linear(h, b.weight, b.bias)

    m.b.forward = fb
    m.d.forward = lambda g: F.linear(g + _SIDE["s"], d.weight, d.bias)
    return m


def _side_accumulator() -> nn.Module:
    """b makes a zero accumulator on the side; c adds its input into it in place, d adds
    it to its input: a variant started after b added into the previous run's."""
    torch.manual_seed(0)
    m = _Four()
    box: dict[str, torch.Tensor] = {}
    b, c, d = m.b, m.c, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        box["acc"] = torch.zeros(h.shape[0], 64)
        return F.linear(h, b.weight, b.bias)

    def fc(g: torch.Tensor) -> torch.Tensor:
        box["acc"].add_(g)
        return F.linear(g, c.weight, c.bias)

    m.b.forward, m.c.forward = fb, fc
    m.d.forward = lambda g: F.linear(g + box["acc"], d.weight, d.bias)
    return m


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("make", [_side_list, _side_global, _side_accumulator],
                         ids=["list", "global", "accumulator"])
def test_a_side_tensor_read_through_python_state(
        make: Callable[[], nn.Module], fanout: bool) -> None:
    """c's variants start after b and ran d on the side tensor a's last variant had left
    (or, for the accumulator, added into it again): every c row was wrong. The side
    tensor's maker is made opaque, as the maker of a value read that way is."""
    _matches_naive(make, ["a", "c"], fanout)


class _Temps(nn.Linear):
    """A leaf making and writing into its own temporaries: nothing past its arguments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        y.relu_()
        return y + y.mean(1, keepdim=True)


def test_a_step_using_its_own_temporaries_is_not_a_side_read() -> None:
    torch.manual_seed(0)
    m = _Four()
    m.b, m.c = _Temps(64, 64), _Temps(64, 64)
    prog = Program(m)
    assert prog.unseen_effects(torch.randn(4, 64)) == (set(), set())


# A Python value made of a tensor (a float, a list, a numpy array) kept in Python state.


def _escaping(make: Callable[[torch.Tensor], object],
              use: Callable[[torch.Tensor, object], torch.Tensor]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        """b keeps make(h) in a closure's dict; d feeds use(g, it) to its linear."""
        torch.manual_seed(0)
        m = _Four()
        box: dict[str, object] = {}
        b, d = m.b, m.d

        def fb(h: torch.Tensor) -> torch.Tensor:
            box["s"] = make(h)
            return F.linear(h, b.weight, b.bias)

        m.b.forward = fb
        m.d.forward = lambda g: F.linear(use(g, box["s"]), d.weight, d.bias)
        return m

    return build


_ITEMS = _escaping(lambda h: [float(v) for v in h[:, 0]],
                   lambda g, s: g * torch.tensor(s)[:, None])
_TOLIST = _escaping(lambda h: h[:, 0].tolist(), lambda g, s: g * torch.tensor(s)[:, None])
_NUMPY = _escaping(lambda h: h.numpy().copy(), lambda g, s: g + torch.from_numpy(s))


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("make", [_ITEMS, _TOLIST, _NUMPY], ids=["float", "tolist", "numpy"])
def test_a_python_value_of_a_tensor_kept_in_python_state(
        make: Callable[[], nn.Module], fanout: bool) -> None:
    """c's variants started after b and ran d on the numbers a's last variant had left: the
    step making them is opaque now (no storage tells where they go)."""
    _matches_naive(make, ["a", "c"], fanout)


def _numpy_writes(where: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        """`where`'s forward doubles part of its argument through `.numpy()`: the input (a)
        or the carrier of the cut before b."""
        torch.manual_seed(0)
        m = _Four()
        mod = m.get_submodule(where)

        def f(h: torch.Tensor) -> torch.Tensor:
            h.numpy()[:, :8] *= 2
            return F.linear(h, mod.weight, mod.bias)

        mod.forward = f
        return m

    return build


@pytest.mark.parametrize("where", ["a", "b"])
def test_a_write_through_numpy_into_a_cached_value(where: str) -> None:
    """The write is past the dispatcher: the cached value (the input, the cut's carrier)
    was doubled again by each variant started from it (docs/engine.md named it a limit)."""
    _matches_naive(_numpy_writes(where), [where, "c"], fanout=False)


def test_registry_models_hand_nothing_to_python() -> None:
    """No found step in a plain ResNet: no `.item()` on its path."""
    from layerfast.models import build_model

    m = build_model("resnet20", num_classes=10, in_shape=(3, 32, 32))[0].eval()
    with torch.inference_mode():
        assert Program(m).unseen_effects(torch.randn(2, 3, 32, 32)) == (set(), set())


# Fan-out and a forward replaced on the instance (`m.forward = f`): not torch's own code.


def _replaced_unit() -> nn.Module:
    """c, the fanned unit, computes 3·W·g + b − 1, not a Linear's W·g + b."""
    torch.manual_seed(0)
    m = _Four()
    c = m.c
    m.c.forward = lambda g: F.linear(g, c.weight * 3, c.bias) - 1
    return m


def _replaced_suffix() -> nn.Module:
    """d, downstream of the fanned unit, centres its input over the batch: it mixes samples
    (the K variants' rows, fanned)."""
    torch.manual_seed(0)
    m = _Four()
    d = m.d
    m.d.forward = lambda g: F.linear(g - g.mean(0), d.weight, d.bias)
    return m


@pytest.mark.parametrize("make", [_replaced_unit, _replaced_suffix], ids=["unit", "suffix"])
def test_a_replaced_forward_is_not_fanned_as_torchs(make: Callable[[], nn.Module]) -> None:
    """The fanned run reimplemented nn.Linear for c (ignoring its forward) and took d for a
    per-sample Linear: every fanned row was wrong."""
    _matches_naive(make, ["c"], fanout=True)


# A buffer written by one step in its forward and read by a later one.


class _Stat(nn.Linear):
    """A Linear keeping its input's batch mean in a buffer, in eval mode too."""

    def __init__(self, *a: int) -> None:
        super().__init__(*a)
        self.register_buffer("stat", torch.zeros(64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.stat.copy_(h.mean(0))
        return super().forward(h)


class _PlusStat(nn.Linear):
    """A Linear adding another module's `stat` buffer to its input."""

    def __init__(self, other: nn.Module, *a: int) -> None:
        super().__init__(*a)
        self.__dict__["other"] = other  # not a child: the buffer stays b's

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return super().forward(g + self.other.stat)


def _buffer_channel() -> nn.Module:
    torch.manual_seed(0)
    m = _Four()
    b = _Stat(64, 64)
    b.load_state_dict(m.b.state_dict(), strict=False)
    d = _PlusStat(b, 64, 10)
    d.load_state_dict(m.d.state_dict())
    m.b, m.d = b, d
    return m


def _buffer_channel_replaced() -> nn.Module:
    """The same, in replaced forwards (leaf steps, code behind a call)."""
    torch.manual_seed(0)
    m = _Four()
    m.b.register_buffer("stat", torch.zeros(64))
    b, d = m.b, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        b.stat.copy_(h.mean(0))
        return F.linear(h, b.weight, b.bias)

    m.b.forward = fb
    m.d.forward = lambda g: F.linear(g + b.stat, d.weight, d.bias)
    return m


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("make", [_buffer_channel, _buffer_channel_replaced],
                         ids=["traced", "replaced"])
def test_a_buffer_written_by_one_step_and_read_by_a_later_one(
        make: Callable[[], nn.Module], fanout: bool) -> None:
    """c's variants started after the write and ran d on the `stat` a's last variant had
    written (traced, the write is a known in-place step into a `get_attr`; replaced, reading
    it unseen made only d opaque, too late): the writer is made opaque."""
    _matches_naive(make, ["a", "c"], fanout)

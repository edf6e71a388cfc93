"""The first-batch effects check (`engine.effects.unseen_effects`), session 20, third pass:
writes into a cached value (the network input, or a cut's carrier) by a step that does not
take it as an argument but reaches it through Python state (`self.inp = x` in one step,
`self.inp.mul_(2)` in a later one: a replaced `forward`, a hook), writes by an in-place step
outside its own target, the ways of writing past a schema-less op (`out=`, `set_`, `resize_`,
`.data`, storages, dlpack, `no_grad` / `inference_mode`, an `autograd.Function`, a
`torch.library.custom_op`), and which step a hidden read is credited to. The engine's counts
must equal the naive loop's (which copies each batch), and the caller's batches stay as they
were."""

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
from tests.engine.test_traceatk_s19 import _batches
from tests.fanout.test_fan_s19 import _variants


class _Four(nn.Module):
    """a -> b -> c -> d, Linear(64) each, ReLU between."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.d = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def _keeping(m: _Four) -> dict[str, torch.Tensor]:
    """Replace a's and b's forwards so that they keep their inputs in a dict (`inp`: the
    network input; `h`: relu(a(x)), the carrier of the cut b's variants start from)."""
    box: dict[str, torch.Tensor] = {}
    a, b = m.a, m.b

    def fa(x: torch.Tensor) -> torch.Tensor:
        box["inp"] = x
        return F.linear(x, a.weight, a.bias)

    def fb(h: torch.Tensor) -> torch.Tensor:
        box["h"] = h
        return F.linear(h, b.weight, b.bias)

    m.a.forward, m.b.forward = fa, fb
    return box


def _matches_naive(make: Callable[[], nn.Module], mods: list[str]) -> None:
    """Counts equal the naive loop's in fp32 (on a fresh model and fresh batches: a model
    whose forward writes into its input would otherwise see the other's writes); the
    caller's batches are not written into."""
    m = make().eval()
    variants = _variants(m, mods, n=2)
    batches = _batches()
    before = copy.deepcopy(batches)
    res = Evaluator(m, variants, device="cpu", precision="fp32").run(batches)
    assert all(torch.equal(u[0], v[0]) for u, v in zip(batches, before, strict=True))
    want = naive_evaluate(make().eval(), variants, lambda: copy.deepcopy(before))
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


# E9: a write into the cached input after its last traced user, nothing reading it after.


def _write_after_last_user() -> nn.Module:
    torch.manual_seed(0)
    m = _Four()
    box = _keeping(m)
    c = m.c

    def fc(h: torch.Tensor) -> torch.Tensor:
        box["inp"].mul_(2)
        return F.linear(h, c.weight, c.bias)

    m.c.forward = fc
    return m


def test_a_write_into_the_input_after_its_last_user_is_found() -> None:
    """c writes into the input a had kept: a variant of a (started from the cached input)
    must not read 2x. The input is a value the run no longer holds after a, so the check
    keeps it (`kept`): with `kept = set()` the write is not seen and a's second variant
    (and every one after it) reads a doubled input."""
    prog = Program(_write_after_last_user())
    found = prog.unseen_effects(_batches()[0][0][:8])
    assert found is not None and 5 in found[1]  # step 5 is c
    _matches_naive(_write_after_last_user, ["a", "d"])


# E9: the written value is read again after the write, by a step a variant starting
# between its producer and the writer runs again (the Python state holds the old tensor).


def _inp_mul(t: torch.Tensor) -> None:
    t.mul_(2)


def _inp_out_kw(t: torch.Tensor) -> None:
    torch.add(t, t, out=t)


def _inp_set(t: torch.Tensor) -> None:
    t.set_(t * 2)


def _inp_data_copy(t: torch.Tensor) -> None:
    t.data.copy_(t * 2)


def _inp_storage(t: torch.Tensor) -> None:
    t.untyped_storage().copy_((t * 2).untyped_storage())


def _inp_dlpack(t: torch.Tensor) -> None:
    torch.utils.dlpack.from_dlpack(t).mul_(2)


def _inp_no_grad(t: torch.Tensor) -> None:
    with torch.no_grad():
        t.mul_(2)


def _inp_inference(t: torch.Tensor) -> None:
    with torch.inference_mode():
        t.mul_(2)


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        t.mul_(2)
        return t.new_zeros(())

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return g


def _inp_autograd_fn(t: torch.Tensor) -> None:
    _Double.apply(t)


@torch.library.custom_op("layerfast_test_e3::double_", mutates_args=("t",))
def _double_(t: torch.Tensor) -> None:
    t.mul_(2)


def _inp_custom_op(t: torch.Tensor) -> None:
    _double_(t)


_WRITES = [_inp_mul, _inp_out_kw, _inp_set, _inp_data_copy, _inp_storage, _inp_dlpack,
           _inp_no_grad, _inp_inference, _inp_autograd_fn, _inp_custom_op]


def _reads_back(write: Callable[[torch.Tensor], None], where: str, how: str) -> nn.Module:
    """c writes into the kept value (`where`) and adds it to its input: in `how` = replaced
    (c's forward replaced), pre_hook / hook (a forward pre-hook / forward hook on c, a
    module no variant resets)."""
    torch.manual_seed(0)
    m = _Four()
    box = _keeping(m)
    c = m.c
    if how == "replaced":

        def fc(h: torch.Tensor) -> torch.Tensor:
            write(box[where])
            return F.linear(h + box[where], c.weight, c.bias)

        m.c.forward = fc
    elif how == "pre_hook":

        def pre(mod: nn.Module, args: tuple) -> tuple:  # noqa: ARG001
            write(box[where])
            return (args[0] + box[where],)

        m.c.register_forward_pre_hook(pre)
    else:

        def post(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
            write(box[where])
            return out + box[where]

        m.c.register_forward_hook(post)
    return m


@pytest.mark.parametrize("how", ["replaced", "pre_hook", "hook"])
@pytest.mark.parametrize("where", ["inp", "h"])
def test_a_write_into_a_kept_value_read_back_by_the_writer(where: str, how: str) -> None:
    """A variant of b (started from the cut after a) or of c's successor runs c again,
    which doubles the tensor the baseline's a (or b) had kept, already doubled: the
    naive loop's c sees 2x on every run, the pass saw 4x, 8x, ... Variants must start
    before the value's producer. Failed before: the check made c opaque (and hooks made it
    opaque from the start, skipping the check), which moves no start before a or b."""
    _matches_naive(lambda: _reads_back(_inp_mul, where, how), ["a", "b", "d"])


@pytest.mark.parametrize("write", _WRITES, ids=lambda f: f.__name__[5:])
def test_every_way_of_writing_into_a_kept_value_is_seen(
        write: Callable[[torch.Tensor], None]) -> None:
    """`out=` (a kwarg-only `Tensor(a!)`), `set_`, a `.data` alias, the storage, a dlpack
    alias, `no_grad` / `inference_mode`, an `autograd.Function`'s forward and a custom op
    declaring `mutates_args` all reach the dispatch mode as a write."""
    _matches_naive(lambda: _reads_back(write, "inp", "replaced"), ["b", "d"])


# E8: an in-place step writing outside its own target, into another argument.


def _inplace_two() -> nn.Module:
    """An `nn.ReLU(inplace=True)` (the program takes it to write into its first argument
    only) whose replaced forward also writes into its second."""
    r = nn.ReLU(inplace=True)

    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y.mul_(2)
        return x.relu_()

    r.forward = forward
    return r


class _Two(nn.Module):
    """h = a(x) is the carrier of the cut b's variants start from; r writes into it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.r = _inplace_two()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        g = self.r(self.b(h), h)
        return self.c(g + h)


def _two() -> nn.Module:
    torch.manual_seed(0)
    return _Two()


def test_an_inplace_module_writing_outside_its_target() -> None:
    """r's target, b(h), is a fresh value only r reads (harmless), so nothing else made the
    cache private: the second variant of b started from 2h. Kills `_writes_past` answering
    False for in-place steps."""
    prog = Program(_two())
    found = prog.unseen_effects(torch.randn(4, 64))
    r = next(s.index for s in prog.steps if s.target == "r")
    assert found is not None and r in found[1]
    _matches_naive(_two, ["a", "b", "c"])


# E10: a hidden read is credited to the step that makes it, not to its neighbours.


class _Reads(nn.Module):
    """a's replaced forward reads c's weight; w = self.e.weight is read by the functional
    step through a `get_attr` (credited through its argument, not hidden)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.e = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return F.linear(torch.relu(self.c(h)), self.e.weight, self.e.bias)


def _reads() -> nn.Module:
    torch.manual_seed(0)
    m = _Reads()
    a, c = m.a, m.c
    m.a.forward = lambda x: F.linear(x, a.weight, a.bias) + c.weight[0].mean()
    return m


def test_a_hidden_read_is_credited_to_its_step_alone() -> None:
    prog = Program(_reads())
    found = prog.unseen_effects(torch.randn(4, 64))
    a = next(s.index for s in prog.steps if s.target == "a")
    assert found == ({a}, set())
    _matches_naive(_reads, ["a", "c", "e"])


# A kept intermediate that is no cut's carrier: the run drops it after its last traced user,
# the Python state keeps its storage alive.


class _Res(nn.Module):
    """t = b(h) lives only inside the block (h is live beside it: no cut after b); the cut
    after relu(t + h) is the one c's and d's variants start from."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.d = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        g = torch.relu(self.b(h) + h)
        return self.d(torch.relu(self.c(g)))


def _res() -> nn.Module:
    torch.manual_seed(0)
    m = _Res()
    box: dict[str, torch.Tensor] = {}
    b, c = m.b, m.c

    def fb(h: torch.Tensor) -> torch.Tensor:
        box["t"] = F.linear(h, b.weight, b.bias)
        return box["t"]

    def fc(g: torch.Tensor) -> torch.Tensor:
        box["t"].mul_(2)
        return F.linear(g + box["t"], c.weight, c.bias)

    m.b.forward, m.c.forward = fb, fc
    return m


def test_a_write_into_a_dropped_value_that_python_state_keeps() -> None:
    """The check forgot t once the run dropped it, so c's write into it was not seen (no
    step found): c's and d's variants reran c on the baseline's t, doubled once more per
    run. A dropped value stays a holder while its storage lives."""
    prog = Program(_res())
    found = prog.unseen_effects(torch.randn(4, 64))
    b = next(s.index for s in prog.steps if s.target == "b")
    assert found is not None and b in found[1]
    _matches_naive(_res, ["a", "b", "c", "d"])


# A read (no write) of a kept value through Python state: the previous VARIANT's value.


def _reads_kept() -> nn.Module:
    """b keeps h = relu(a(x)); d adds it to its input."""
    torch.manual_seed(0)
    m = _Four()
    box = _keeping(m)
    d = m.d
    m.d.forward = lambda g: F.linear(g + box["h"], d.weight, d.bias)
    return m


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
def test_a_read_of_a_kept_value_through_python_state(fanout: bool) -> None:
    """c's variants start after b and run d, which read the h a's last variant had left
    in the state (a's variants run first), not the baseline's: every c row was wrong,
    fanned or not. The value's producer is made opaque (variants start before it)."""
    m = _reads_kept().eval()
    variants = _variants(m, ["a", "c"], n=3)
    batches = _batches()
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    want = naive_evaluate(_reads_kept().eval(), variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


def test_a_plain_model_has_no_stale_reads() -> None:
    """Values passed as arguments (views included) are not reads past the trace."""
    prog = Program(_Res())
    assert prog.unseen_effects(torch.randn(4, 64)) == (set(), set())

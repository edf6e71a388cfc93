"""Adversarial models for the WRITE side of prefix sharing (the plain, swapped CPU path): a step
whose code writes into a value another step computed (a cached cut's carrier, or the cached
network input) where the program's in-place analysis does not know it — a leaf module's
`forward` replaced on the instance, a `torch.nn` class defined elsewhere, a step returning its
input where the program takes its value for a new tensor. The next variant then started from a
value the previous one had written into. The engine's counts must equal the naive loop's."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.graph import Program, no_inplace_modules
from tests.engine.test_traceatk_s19 import _matches_naive


class _Three(nn.Module):
    """a -> b -> c, and the step `w(h)` into a's output h after b has read it: the cut after a
    is the one a variant of b starts from, and its cached h must not be the written one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.w = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        g = self.b(h)
        self.w(h)
        return self.c(torch.relu(h) + g)


def _mul(x: torch.Tensor) -> torch.Tensor:
    return x.mul_(2)


def _setitem(x: torch.Tensor) -> torch.Tensor:
    x[:, 0] = 0.0
    return x


def _copy(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(x * 3)


def _aten(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.mul_(x, 2.0)


@pytest.mark.parametrize("write", [_mul, _setitem, _copy, _aten], ids=lambda f: f.__name__)
def test_a_replaced_leaf_forward_writing_into_a_cached_cut(
        write: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """nn.Identity is a leaf the program takes to write nothing; its replaced `forward` writes
    into h, the cached carrier b's variants start from: the second of them read 2h, 4h, ..."""
    torch.manual_seed(0)
    m = _Three()
    m.w.forward = write
    _matches_naive(m, ["a", "b", "c"])


def test_a_linear_whose_replaced_forward_writes_into_its_input() -> None:
    """The unit's own step writes into the cached value its variants start from."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(self.a(x))))

    torch.manual_seed(0)
    m = Net()
    lin = m.b
    m.b.forward = lambda x: F.linear(x.mul_(2), lin.weight, lin.bias)
    _matches_naive(m, ["a", "b", "c"])


class _InputWriter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Identity()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(self.w(x))))))


@pytest.mark.parametrize("mods", [["a"], ["a", "c"]])
def test_a_first_step_writing_into_the_cached_input(mods: list[str]) -> None:
    """The variants starting at the input read the batch the baseline (and every variant
    before them) had doubled; with variants of `a` alone no cut is kept at all."""
    torch.manual_seed(0)
    m = _InputWriter()
    m.w.forward = _mul
    _matches_naive(m, mods)


def test_a_step_returning_its_input_where_a_new_tensor_is_expected() -> None:
    """A max-pool is taken to return a new tensor, so `r += 1` writes into a value only its
    writer reads: harmless, no copy. Its replaced forward returns its input: r IS the cached h."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
            self.p = nn.MaxPool1d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            g = self.b(h)
            r = self.p(h)
            r += 1.0
            return self.c(torch.relu(r) + g)

    torch.manual_seed(0)
    m = Net()
    m.p.forward = lambda x: x
    _matches_naive(m, ["a", "b", "c"])


def test_a_torch_nn_class_defined_elsewhere_that_writes() -> None:
    """fx keeps any class whose module is under `torch.nn` as a leaf, whatever its forward."""

    class Doubler(nn.Identity):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mul_(2)

    Doubler.__module__ = "torch.nn.modules.linear"
    torch.manual_seed(0)
    m = _Three()
    m.w = Doubler()
    _matches_naive(m, ["a", "b", "c"])


def test_writes_the_program_knows_of_are_not_taken_for_unseen() -> None:
    """A kept in-place ReLU (its input is read again), `+=`, `x[i] = v` and a fresh conv
    net: the check finds nothing, so nothing loses its prefix sharing."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            r = self.act(h)
            g = self.b(h + r)
            g += 1.0
            g[:, 0] = 0.0
            return self.c(g)

    torch.manual_seed(0)
    m = Net().eval()
    with no_inplace_modules(m):
        prog = Program(m)
        assert prog.traced
        assert prog.unseen_effects(torch.randn(4, 64)) == (set(), set())
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 10)).eval()
    with no_inplace_modules(conv):
        prog = Program(conv)
        assert prog.unseen_effects(torch.randn(2, 3, 8, 8)) == (set(), set())
    plan = _matches_naive(m, ["a", "b", "c"])
    assert plan["untraced"] is None and plan["cuts_kept"] >= 1


def test_a_known_write_into_a_buffer_another_step_views_is_not_unseen() -> None:
    """`self.calls.add_(1)` writes into the buffer its own argument is (a `get_attr`), which a
    view taken before (`seen`) shares: the program knows that write, and the check must not
    make the step opaque for it (it would cost every later variant its prefix)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 10)
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen = self.calls.view(1)
            self.calls.add_(1)
            return self.b(torch.relu(self.a(x))) + 0 * seen

    m = Net().eval()
    prog = Program(m)
    assert prog.traced
    assert prog.unseen_effects(torch.randn(2, 64)) == (set(), set())


# ---- torch.jit.script'ed submodules ------------------------------------------------------


class _Scripted(nn.Module):
    """a -> mid (scripted) -> b -> c: the rest of the model traces around the scripted step."""

    def __init__(self, mid: nn.Module) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.mid = torch.jit.script(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.mid(h)
        return self.c(torch.relu(self.b(torch.relu(h))))


class _WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.lin(x)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
def test_a_scripted_submodule_is_one_step_of_a_traced_model() -> None:
    """Tracing stored nothing on a ScriptModule, and restoring `_parameters` called `.update`
    on its OrderedDictWrapper: AttributeError, so the WHOLE model ran untraced (exact, slow)."""
    torch.manual_seed(0)
    m = _Scripted(nn.Sequential(nn.Linear(64, 64), nn.Tanh())).eval()
    prog = Program(m)
    assert prog.traced, prog.trace_error
    assert any(s.op == "call_module" and s.target == "mid" for s in prog.steps)
    plan = _matches_naive(m, ["a", "mid.0", "b", "c"])
    assert plan["untraced"] is None
    assert plan["cuts_kept"] >= 2  # b's and c's variants start after the scripted step


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_scripted_submodule_writing_into_its_input_is_found() -> None:
    """The scripted step writes into a's output, the cut `mid.lin`'s variants start from."""
    torch.manual_seed(0)
    m = _Scripted(_WritesInput()).eval()
    plan = _matches_naive(m, ["a", "mid.lin", "b", "c"])
    assert plan["untraced"] is None


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("mid", ["relu_first", "relu_alone"])
def test_a_scripted_inplace_relu(mid: str) -> None:
    """`no_inplace_modules` set `inplace = False` on every module with the flag: on a scripted
    one that is a compiled constant, and the pass died with "Can't set constant 'inplace'".
    Left on, it writes into a's output, the cached value `mid`'s variants start from: the
    program must know (a scripted ReLU step is in place; one inside a scripted step is found
    by the first batch's check)."""
    torch.manual_seed(0)
    if mid == "relu_first":
        m = _Scripted(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(64, 64))).eval()
        mods = ["a", "mid.1", "b", "c"]
    else:
        m = _Scripted(nn.ReLU(inplace=True)).eval()
        mods = ["a", "b", "c"]
    with no_inplace_modules(m):
        prog = Program(m)
        (step,) = [s for s in prog.steps if s.target == "mid"]
        found = prog.unseen_effects(torch.randn(4, 64))
        assert found is not None
        assert prog.is_inplace(step) or step.index in found[1]
    plan = _matches_naive(m, mods)
    assert plan["untraced"] is None


def test_a_fan_out_refusal_names_the_effects_check_for_a_step_it_found() -> None:
    """A step made opaque by the first-batch effects check was named in a fan-out refusal as
    reading the unit's tensor "by code the trace does not see", though what it did was write
    into a value: the refusal now says the effects check found it."""
    from layerfast.engine import Evaluator

    torch.manual_seed(0)
    m = _Three().eval()
    m.w.forward = _mul
    variants = [{"a.weight": torch.randn(64, 64)}, {"a.weight": torch.randn(64, 64)}]
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    res = Evaluator(m, variants, device="cpu", fanout=True).run([(x, y)])
    (why,) = res.plan["fanout_refused"].values()
    assert "found on the first batch to read or write tensors past the trace" in why, why

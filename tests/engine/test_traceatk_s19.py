"""Adversarial models for the trace and prefix sharing (the plain, swapped CPU path): the
engine's counts must equal the naive loop's (reset the unit, full eager forward, count), and
the model must come back bit-identical."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.evaluator import Evaluator
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate
from tests.fanout.test_fan_s19 import _variants


def _batches(n: int = 40, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[:24], y[:24]), (x[24:], y[24:])]


def _matches_naive(model: nn.Module, mods: list[str]) -> dict:
    """Counts equal the naive loop's in fp32 (default options: prefix sharing, no fan-out on
    the CPU); the model comes back bit-identical. Returns the plan."""
    model.eval()
    variants = _variants(model, mods, n=2)
    batches = _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = Evaluator(model, variants, device="cpu").run(batches)
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return res.plan


class _Three(nn.Module):
    """a -> b -> c, with the write `hook(h, g)` into a's output after b has read it: a cut
    after a is the one a variant of b starts from, and its cached value must not be the
    written one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def write(self, h: torch.Tensor, g: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        g = self.b(h)
        self.write(h, g)
        return self.c(torch.relu(h) + g)


class _AtenAdd(_Three):
    def write(self, h: torch.Tensor, g: torch.Tensor) -> None:
        torch.ops.aten.add_.Tensor(h, g)  # named "add_.Tensor": no trailing underscore


class _AtenPacket(_Three):
    def write(self, h: torch.Tensor, g: torch.Tensor) -> None:
        torch.ops.aten.mul_(h, 3.0)


class _Foreach(_Three):
    def write(self, h: torch.Tensor, g: torch.Tensor) -> None:
        torch._foreach_mul_([h], 3.0)  # a private name: "_foreach_mul_"


class _AtenOut(_Three):
    def write(self, h: torch.Tensor, g: torch.Tensor) -> None:
        torch.ops.aten.addcmul.out(g, g, g, out=h)  # an `.out` overload, into the cut's value


@pytest.mark.parametrize("cls", [_AtenAdd, _AtenPacket, _Foreach, _AtenOut])
def test_writes_by_torch_ops_and_private_inplace_names_keep_the_cached_cut(cls) -> None:
    """A torch.ops operator with a mutable schema (`torch.ops.aten.add_.Tensor`) or a private
    in-place function (`torch._foreach_mul_`) was not taken as in place: the cut's cached
    value was not copied, the write changed it, and the variants of b started from it."""
    torch.manual_seed(0)
    model = cls()
    prog = Program(model)
    assert prog.traced, prog.trace_error
    assert prog.has_inplace
    _matches_naive(model, ["a", "b", "c"])


# ---- reads the program did not credit: a variant started after a step that read its tensor --


class _Gate(nn.Module):
    """Reads `other`'s weight, held in a list (not a submodule); its branch on a value makes
    fx fail, so a Sequential of it runs untraced, cut between its children."""

    def __init__(self, other: nn.Linear) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.refs = [other]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            x = x + 0.0
        return self.lin(x) + F.linear(x, self.refs[0].weight)


def _untraced_sequential() -> nn.Module:
    a = nn.Linear(64, 64)
    return nn.Sequential(_Gate(a), nn.ReLU(), a, nn.ReLU(), nn.Linear(64, 10))


class _StorageAlias(nn.Module):
    """A plain attribute sharing b's weight's storage, read before b runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.bw = self.b.weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x) + 0.1 * (x @ self.bw.t()))
        return self.c(torch.relu(self.b(h)))


class _ReplacedForward(nn.Module):
    """The leaf module a's `forward`, replaced on the instance, computes with b's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        b = self.b
        self.a.forward = lambda x: F.linear(x, b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class _ByB(nn.Module):
    def __init__(self, other: nn.Linear) -> None:
        super().__init__()
        self.refs = [other]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.refs[0].weight.mean() * 10


class _Parametrized(_ReplacedForward):
    """a's weight parametrized by b's mean (a leaf module: fx does not look inside)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        torch.nn.utils.parametrize.register_parametrization(self.a, "weight", _ByB(self.b))


@pytest.mark.parametrize("build", [_untraced_sequential, _StorageAlias, _ReplacedForward,
                                   _Parametrized])
def test_a_tensor_read_past_the_programs_keys_is_not_taken_from_the_prefix(build) -> None:
    """A step that reads a parameter by a way the program's keys (module ownership, get_attr)
    do not see: b's variants started from a cut after it, reusing a prefix computed with the
    final b. Such a step is now found by the storages it reads and made opaque."""
    torch.manual_seed(0)
    model = build()
    _matches_naive(model, ["0.lin", "2", "4"] if isinstance(model, nn.Sequential)
                   else ["a", "b", "c"])


def test_a_plain_model_has_no_unseen_reads() -> None:
    """The check costs no prefix sharing where every read is credited (tied weights and a
    weight read by F.linear through get_attr included)."""
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
            self.c2 = nn.Linear(64, 10)
            self.c2.weight = self.c.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            h = torch.relu(F.linear(h, self.b.weight.t(), self.b.bias))
            return self.c(h) + self.c2(h)

    model = Tied().eval()
    prog = Program(model)
    assert prog.unseen_reads(torch.randn(4, 64)) == set()
    plan = _matches_naive(model, ["a", "b", "c"])
    assert plan["cuts_kept"] >= 2, plan

"""Code the traced program does not see: forward hooks and pre-hooks, functions the user wrapped
with `torch.fx.wrap`, constants fx stores on the model, attributes hooks set (pruning).

Found by an adversarial model zoo run against a naive loop; each case failed before its fix:
- a hook or a wrapped function that reads a parameter made the engine score the variant as the
  baseline (no step "read" its key) or start it after that read (wrong counts);
- a pre-hook or a wrapped function writing into a cached cut's activation in place corrupted
  the cache for the variants starting there;
- hooks on a module fx traces through (a container, or the model itself) never ran;
- tracing left `_tensor_constant0` on the user's model, and pruning's `weight` attribute held
  the last variant's weights after evaluation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from layerfast.engine import Evaluator
from layerfast.engine.graph import Program
from layerfast.units import make_units


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is as fast and does not fight the other tests."""


def head(mod: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A helper the trace keeps as one call: it reads `mod`'s weights inside."""
    return mod(h) * 2.0


def squash(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A wrapped helper that writes into its argument."""
    return t.mul_(s)


def squash_second(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A wrapped helper that writes into its second argument, not its first."""
    return t.mul_(s)


torch.fx.wrap("head")
torch.fx.wrap("squash")
torch.fx.wrap("squash_second")

_OFFSET = torch.linspace(-0.5, 0.5, 10)  # a module-level constant: fx stores it on the model


# ---- the naive loop ------------------------------------------------------------------------


def naive(model: nn.Module, variants: list[dict], batches) -> torch.Tensor:
    """Counts [V, 3] (correct@1, summed CE, agreement): each variant's tensors copied into the
    model itself (not a deep copy: a hook's closure reads the original model's parameters),
    every batch a fresh copy of the data, full forward, then the tensors put back."""
    model.eval()
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        ref = [model(x.clone()).argmax(1) for x, _ in batches]
    counts = torch.zeros(len(variants), 3, dtype=torch.float64)
    for i, ov in enumerate(variants):
        saved = {k: live[k].detach().clone() for k in ov}
        with torch.no_grad():
            for k, t in ov.items():
                live[k].copy_(t)
            for j, (x, y) in enumerate(batches):
                lg = model(x.clone()).float()
                counts[i, 0] += (lg.argmax(1) == y).sum().item()
                counts[i, 1] += F.cross_entropy(lg, y, reduction="sum").double().item()
                counts[i, 2] += (lg.argmax(1) == ref[j]).sum().item()
            for k, t in saved.items():
                live[k].copy_(t)
    return counts


def check(model: nn.Module, variants: list[dict], n: int = 40, dim: int = 16) -> dict:
    """The engine's counts equal the naive loop's for every variant, fan-out on and off, at two
    batch sizes, and the model's tensors are the same objects with the same values after."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    with torch.no_grad():
        y = model.eval()(x.clone()).argmax(1)
    y[::3] = (y[::3] + 1) % 10  # some errors for the baseline too
    before = {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    want = None
    plan = {}
    for bs in (8, 40):
        batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
        if want is None:
            want = naive(model, [{}, *variants], batches)
        for fanout in (False, True):
            res = Evaluator(model, [{}, *variants], device="cpu", precision="fp32",
                            fanout=fanout).run(batches)
            got = res.counts[:, [0, 2, 3]]
            assert torch.equal(got[:, [0, 2]], want[:, [0, 2]]), (bs, fanout, got, want)
            torch.testing.assert_close(got[:, 1], want[:, 1], rtol=1e-5, atol=1e-4)
            plan = res.plan
    for k, v in model.state_dict(keep_vars=True).items():
        assert v is before[k][0] and torch.equal(v, before[k][1]), k
    return plan


def flipped(t: torch.Tensor) -> torch.Tensor:
    return -t.detach().clone()


# ---- reads the trace does not see ----------------------------------------------------------


class WrappedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head(self.fc, torch.relu(self.l1(x)))


def test_a_wrapped_function_that_reads_a_modules_weights() -> None:
    """Was scored as the baseline: no step read fc's keys (correct@1 40/40 for 1/40)."""
    torch.manual_seed(0)
    m = WrappedHead()
    prog = Program(m)
    assert prog.traced and any(prog.is_opaque(s) for s in prog.steps)
    check(m, [{"fc.weight": flipped(m.fc.weight)}, {"l1.bias": flipped(m.l1.bias)}])


class Gated(nn.Module):
    """A forward hook on the leaf l1 gates its output by a parameter of the model."""

    def __init__(self, visible: bool) -> None:
        super().__init__()
        self.visible = visible
        self.l1 = nn.Linear(16, 16)
        self.l2 = nn.Linear(16, 16)
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.fc = nn.Linear(16, 10)
        self.l1.register_forward_hook(lambda mod, i, o: o * self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        h = torch.relu(self.l2(h))
        return self.fc(h * self.gate if self.visible else h)


@pytest.mark.parametrize("visible", [False, True])
def test_a_hook_that_reads_another_modules_parameter(visible: bool) -> None:
    """Invisible read only: scored as the baseline. Also read visibly after l2: started after
    l2, past the hook's read (9/40 correct came out 5/40)."""
    torch.manual_seed(0)
    m = Gated(visible)
    check(m, [{"gate": -torch.linspace(0.5, 2, 16)}, {"l2.weight": flipped(m.l2.weight)},
              {"fc.bias": flipped(m.fc.bias)}])


# ---- writes the trace does not see ---------------------------------------------------------


class PreHookInPlace(nn.Module):
    """A pre-hook on l2 halves l2's input in place; that input is a cut's cached carrier."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.l2 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)
        self.l2.register_forward_pre_hook(self.halve)

    @staticmethod
    def halve(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0].mul_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        return self.fc(torch.relu(self.l2(h)))


class WrappedInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.l2 = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.full((16,), 0.7))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        h = squash(h, self.scale)
        return self.fc(torch.relu(self.l2(h)))


class WrappedInPlaceSecond(WrappedInPlace):
    """The written argument is the cached one, the first argument a private fresh value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        h = squash_second(self.scale * 1.0, h)
        return self.fc(torch.relu(self.l2(h)))


@pytest.mark.parametrize("cls", [PreHookInPlace, WrappedInPlace, WrappedInPlaceSecond])
def test_an_unseen_in_place_write_does_not_corrupt_a_cached_activation(cls) -> None:
    """The variants starting at the written cut read the already-halved value (22/40 came
    out 31/40)."""
    torch.manual_seed(0)
    m = cls()
    g = torch.Generator().manual_seed(1)
    variants = [{"l2.weight": m.l2.weight.detach() + 0.3 * torch.randn(16, 16, generator=g)},
                {"fc.weight": flipped(m.fc.weight)}]
    if cls is not PreHookInPlace:
        variants.append({"scale": torch.linspace(-1, 1, 16)})
    check(m, variants)


# ---- hooks a traced program would not run --------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.scale = nn.Parameter(torch.ones(16))  # 1: the hook changes nothing in the baseline
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.block(x)))


def test_a_hook_on_a_module_the_trace_goes_through() -> None:
    """fx traces through `block`: its hook never ran, and since it changes nothing in the
    baseline (scale = 1) the first batch's check could not tell."""
    torch.manual_seed(0)
    m = Outer()
    m.block.register_forward_hook(lambda mod, i, o: o * m.scale)
    assert not Program(m).traced
    check(m, [{"scale": torch.linspace(-1, 1, 16)}, {"block.b.weight": flipped(m.block.b.weight)}])


def test_a_hook_on_the_model_itself() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    m.register_parameter("temp", nn.Parameter(torch.ones(1)))
    m.register_forward_hook(lambda mod, i, o: o * m.temp)
    prog = Program(m)
    assert not prog.traced and len(prog.steps) == 3  # input, the whole model, output
    check(m, [{"temp": torch.full((1,), -1.0)}, {"2.bias": flipped(m[2].bias)}])


def test_a_global_forward_hook() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    calls: list[int] = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: calls.append(1))
    try:
        assert not Program(m).traced
        check(m, [{"0.weight": flipped(m[0].weight)}])
    finally:
        handle.remove()
    assert calls and Program(m).traced


# ---- what the engine leaves on the model ---------------------------------------------------


class UsesConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.l1(x))) + _OFFSET


def test_tracing_leaves_no_constant_on_the_model() -> None:
    torch.manual_seed(0)
    m = UsesConstant()
    before = dict(vars(m))
    prog = Program(m)
    assert prog.traced and list(prog.constants) == ["_tensor_constant0"]
    assert vars(m).keys() == before.keys()
    assert [u.name for u in make_units(m, "layer")] == ["l1", "fc"]  # traces the model too
    assert vars(m).keys() == before.keys()
    check(m, [{"fc.weight": flipped(m.fc.weight)}, {"l1.weight": flipped(m.l1.weight)}])
    assert vars(m).keys() == before.keys()


class Cached(nn.Module):
    """Fills a tensor cache on first use (positional tables, rotary caches, masks)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)
        self._table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._table is None or self._table.shape[0] != x.shape[1]:
            self._table = torch.linspace(0, 1, x.shape[1])
        return self.fc(torch.relu(self.l1(x + self._table)))


def test_a_cache_filled_on_first_use_comes_back_empty() -> None:
    """Tracing left an fx Proxy in the cache (the model's own forward then raised), and after a
    run the attribute that had been None was deleted."""
    torch.manual_seed(0)
    m = Cached()
    Program(m)
    assert m._table is None
    variants = [{"fc.bias": flipped(m.fc.bias)}, {"l1.weight": flipped(m.l1.weight)}]
    batches = [(torch.randn(8, 16), torch.arange(8))]
    Evaluator(m, variants, device="cpu", precision="fp32").run(batches)
    assert m._table is None
    check(m, variants)  # counts; its naive loop's forwards fill the cache
    table = m._table
    assert table is not None
    Evaluator(m, variants, device="cpu", precision="fp32").run(batches)
    assert m._table is table  # a filled cache stays the same object


class ShapeCache(nn.Module):
    """A cache keyed by the input's width (rotary and positional tables), and a list of the
    activations it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)
        self.cache: dict = {}
        self.seen: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        if n not in self.cache:
            self.cache[n] = torch.linspace(0, 1, n)
        h = torch.relu(self.l1(x + self.cache[n]))
        self.seen.append(h)
        return self.fc(h)


def test_containers_of_tensors_come_back_as_they_were(tmp_path: Path) -> None:
    """Tracing left a Proxy key and value in the dict cache, and `torch.save(model)` could not
    pickle it; after a run the dict and list held the variants' tensors."""
    torch.manual_seed(0)
    m = ShapeCache()
    cache, seen = m.cache, m.seen
    variants = [{"fc.bias": flipped(m.fc.bias)}, {"l1.weight": flipped(m.l1.weight)}]
    Evaluator(m, variants, device="cpu", precision="fp32").run(
        [(torch.randn(8, 16), torch.arange(8))])
    assert m.cache is cache and m.cache == {} and m.seen is seen and m.seen == []
    torch.save(m, tmp_path / "model.pt")
    check(m, variants)


def test_a_pruned_model_comes_back_with_its_own_masked_weight() -> None:
    """pruning's pre-hook sets `weight = weight_orig * weight_mask` at every call: after a pass
    the attribute held the last variant's weights (an inference-mode tensor)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    prune.l1_unstructured(m[0], "weight", amount=0.3)
    variants = [{"0.weight_orig": flipped(m[0].weight_orig)}, {"2.weight": flipped(m[2].weight)}]
    check(m, variants)  # its naive loop's forwards set the attribute too
    weight = m[0].weight
    Evaluator(m, variants, device="cpu", precision="fp32").run([(torch.randn(8, 16),
                                                                 torch.arange(8))])
    assert m[0].weight is weight
    assert torch.equal(m[0].weight, m[0].weight_orig * m[0].weight_mask)
    m.train()
    m(torch.randn(4, 16)).sum().backward()  # still trainable (no inference tensor left behind)
    assert m[0].weight_orig.grad is not None


class BufferBranch(nn.Module):
    """Branches on a buffer's value (ActNorm's "initialized" flag, a mode switch)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)
        self.register_buffer("on", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        if self.on.item() > 0:
            h = h * -5
        return self.fc(h)


def test_a_branch_on_a_buffers_value_is_not_frozen_into_the_trace() -> None:
    """fx handed the branch the buffer's value at trace time: the variant that turns the
    buffer off took the baseline's branch (19 correct where the naive loop has 21)."""
    torch.manual_seed(0)
    m = BufferBranch()
    assert not Program(m).traced
    check(m, [{"on": torch.tensor(0.0)}, {"fc.bias": flipped(m.fc.bias)}])

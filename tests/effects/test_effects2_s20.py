"""Hidden writes into the model's own state (session 20): a forward that writes into a
PARAMETER in place even in eval mode — `nn.Embedding(max_norm=...)` renormalising the rows it
looks up, `self.weight.data.clamp_(...)`, `with torch.no_grad(): self.scale.mul_(0.5)`. On the
CPU the pass runs on the model's own tensors, so such a write stayed in the user's model after
`Evaluator.run` (buffers were restored, parameters were not). The engine's counts must equal the
naive loop's, and the model must come back bit for bit (DESIGN §3, the Evaluator's contract)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine.evaluator import Evaluator
from layerfast.engine.naive import naive_evaluate
from tests.engine.test_traceatk_s19 import _batches
from tests.fanout.test_fan_s19 import _variants


class _Emb(nn.Module):
    """An embedding with max_norm (its rows renormalised in place on lookup, in eval mode
    too) beside a linear path; rows of norm ~8, so every lookup rewrites them."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(50, 64, max_norm=1.0)
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x.abs() * 10).long().clamp(0, 49)[:, :4]
        h = self.e(idx).mean(1) + self.a(x)
        return self.c(torch.relu(self.b(torch.relu(h))))


class _Clamp(nn.Module):
    """A forward that clamps a later layer's weight through `.data` (no version counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        with torch.no_grad():
            self.b.weight.mul_(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        self.b.weight.data.clamp_(-0.05, 0.05)
        return self.c(torch.relu(self.b(h)))


class _Drift(nn.Module):
    """A parameter the forward scales on every call: not a function of its input, which
    the first-batch check names; whatever the counts, the model must come back as it came."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        with torch.no_grad():
            self.scale.mul_(0.5)
        return self.c(torch.relu(self.b(h * self.scale)))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(before: dict[str, torch.Tensor], m: nn.Module) -> list[str]:
    after = m.state_dict()
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize(("make", "mods"), [(_Emb, ["e", "a", "b", "c"]),
                                            (_Clamp, ["a", "b", "c"])],
                         ids=["embedding_max_norm", "data_clamp"])
def test_a_forward_writing_into_a_parameter_leaves_the_model_as_it_came(
        make: type[nn.Module], mods: list[str], fanout: bool) -> None:
    """Counts equal the naive loop's (the writes are idempotent), and the parameter the
    forward rewrote is the final model's again after the pass."""
    torch.manual_seed(0)
    m = make().eval()
    variants = _variants(m, mods, n=2)
    batches = _batches()
    before = _state(m)
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    assert _unchanged(before, m) == []
    torch.manual_seed(0)
    ref = make().eval()  # the naive loop rewrites its model as the forward does
    want = naive_evaluate(ref, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


def test_a_parameter_that_drifts_per_call_comes_back() -> None:
    torch.manual_seed(0)
    m = _Drift().eval()
    before = _state(m)
    res = Evaluator(m, _variants(m, ["a", "b"], n=1), device="cpu").run(_batches())
    assert _unchanged(before, m) == []
    assert "not deterministic" in str(res.plan.get("untraced"))


def test_the_model_comes_back_when_the_pass_raises() -> None:
    """Written on the first batch, then the forward fails on the second: restored anyway."""

    class Failing(_Emb):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 16:
                raise ValueError("bad batch")
            return super().forward(x)

    torch.manual_seed(0)
    m = Failing().eval()
    before = _state(m)
    with pytest.raises(Exception):  # noqa: B017,PT011 - which one is not the point here
        Evaluator(m, _variants(m, ["a"], n=1), device="cpu").run(_batches())
    assert _unchanged(before, m) == []


# ---- a derived weight cached on the first call ------------------------------------------------


class _Cached(nn.Module):
    """`a`'s weight copied into a plain attribute on the first call and reused after. fx
    traced the forward with the cache empty, so the program recomputed it from the live
    weight for every variant, while the model's own forward (the naive loop, the user's
    code) reuses what its first call stored: the counts of `a`'s variants differed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.wc: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wc is None:
            self.wc = self.a.weight * 1.0
        h = torch.relu(torch.nn.functional.linear(x, self.wc, self.a.bias))
        return self.c(torch.relu(self.b(h)))


class _Stores(nn.Module):
    """Stores an activation on every call (for inspection): not a cache, stays traced."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.feat: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        self.feat = h
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
def test_a_cache_filled_on_the_first_call_is_the_models_own(fanout: bool) -> None:
    torch.manual_seed(0)
    m = _Cached().eval()
    variants = _variants(m, ["a", "b", "c"], n=2)
    batches = _batches()
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout=fanout).run(batches)
    assert m.wc is None  # the model comes back holding its own (empty) cache
    assert "wc" in str(res.plan.get("untraced")), res.plan.get("untraced")
    want = naive_evaluate(m, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


def test_an_activation_stored_on_every_call_keeps_the_trace() -> None:
    torch.manual_seed(0)
    m = _Stores().eval()
    variants = _variants(m, ["a", "b", "c"], n=1)
    res = Evaluator(m, variants, device="cpu", precision="fp32").run(_batches())
    assert res.plan.get("untraced") is None
    assert m.feat is None


def test_a_table_cached_from_the_input_shape_keeps_the_trace() -> None:
    """A positional table filled on first use is not derived from weights: the program's
    recomputation is the same for every variant, so the model stays traced."""
    from tests.engine.test_engine_hooks import Cached

    torch.manual_seed(0)
    m = Cached().eval()
    variants = [{"l1.weight": torch.randn(16, 16)}, {"fc.weight": torch.randn(10, 16)}]
    res = Evaluator(m, variants, device="cpu", precision="fp32").run(
        [(torch.randn(8, 16), torch.arange(8))])
    assert res.plan.get("untraced") is None
    assert m._table is None

"""Tests that kill the mutants of `Program.run` / `fetch` and `fanrun.run_fanned` the other
tests let through (session 25's mutation pass over `engine/graph.py` and `engine/fanrun.py`).
Each test names the mutant it kills in its docstring."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from layerfast.engine.graph import Program, no_inplace_modules


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4)).eval()


def test_run_drops_each_value_after_its_last_use() -> None:
    """`Program.run` frees a value once its last user has run (`frees`): a suffix holds one
    activation at a time, not every one of the pass. Mutant killed: the loop that pops
    `frees[s.index]` from the run's values made a no-op (every activation kept to the end)."""
    model = _chain()
    prog = Program(model)
    assert prog.traced, prog.trace_error
    refs: dict[int, weakref.ref] = {}
    alive: dict[int, list[int]] = {}

    def on_value(i: int, v: object) -> None:
        if isinstance(v, torch.Tensor):
            refs[i] = weakref.ref(v)

    def after_step(i: int) -> None:
        # called once step i has run, before the run drops what step i read last: of the
        # values before it, only step i-1's (its input) may be alive
        alive[i] = sorted(j for j, r in refs.items() if r() is not None)

    x = torch.randn(5, 8)
    with torch.no_grad(), no_inplace_modules(model):
        out = prog.run(x, 0, after_step=after_step, on_value=on_value)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert len(alive) == 5
    for i, live in alive.items():
        assert set(live) <= {i - 1}, (i, live)


class _EarlyParam(nn.Module):
    """A parameter read at the top of the forward and used only at its end: fx records its
    `get_attr` first, and the value it reads is no state flowing through the cuts between."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h))
        return self.fc(h) * s


def test_a_parameter_read_early_does_not_block_the_cuts_after_it() -> None:
    """A parameter read (`get_attr`) is re-read wherever a run starts and never counts as a
    value flowing through a cut (`_find_cuts`): a variant of `fc` starts after `b`'s ReLU, not
    from the input. Mutant killed: `get_attr` steps counted as live values (no cut between the
    early read and its use, every such variant a full forward)."""
    torch.manual_seed(0)
    model = _EarlyParam().eval()
    prog = Program(model)
    assert prog.traced, prog.trace_error
    ops = {s.index: s.target for s in prog.steps}
    fc = next(i for i, t in ops.items() if t == "fc")
    start = prog.start_cut({"fc.weight"})
    assert start == fc - 1, (start, prog.cuts, ops)
    x = torch.randn(5, 8)
    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        full = prog.run(x, 0, keep={start}, saved=cache)
        suffix = prog.run(cache[start], start)
    torch.testing.assert_close(suffix, model(x), rtol=0, atol=0)
    torch.testing.assert_close(full, model(x), rtol=0, atol=0)


def test_regions_here_is_built_once_per_state_in_force() -> None:
    """`regions_here` is asked per batch and per run: the mapping for a state in force is built
    once and handed back as is. Mutant killed: the cache looked up under the wrong key (the
    steps swept again on every call)."""
    from tests.engine.test_autocast_attack_s24 import ConstantIntoRegion

    prog = Program(ConstantIntoRegion().eval(), precision=("bf16", torch.device("cpu")))
    assert prog.traced, prog.trace_error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = prog.regions_here()
        assert first and prog.regions_here() is first
    with torch.autocast("cpu", enabled=False):
        off = prog.regions_here()
        assert off == {} and prog.regions_here() is off


class _DeadBranch(nn.Module):
    """A module called whose value nothing reads (a leftover auxiliary head): its variants
    change no logit."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.aux = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        self.aux(h)
        return self.fc(h.mean((2, 3)))


def test_a_fanned_group_whose_output_is_shared_returns_k_copies() -> None:
    """The output of a fanned suffix that no overridden module reaches is the shared [B, C]
    logits: `run_fanned` still returns the K·B rows its callers split per variant, each
    variant's the baseline's. Mutant killed: the shared output returned as it is (B rows)."""
    from tests.fanout.test_fanrun import _fanned, _setup

    torch.manual_seed(0)
    model, x, K = _DeadBranch().eval(), torch.randn(6, 3, 8, 8), 3
    setup = _setup(model, ("aux",), x, K, False)
    plan = setup[1]
    out_step = len(setup[0].steps) - 1
    assert plan.modules == ["aux"] and out_step - 1 not in plan.fanned, plan
    got = _fanned(setup, K, True)
    with torch.no_grad():
        want = model(x)
    assert got.shape == (K, 6, 5)
    for k in range(K):
        torch.testing.assert_close(got[k], want, rtol=0, atol=0)


def test_the_unfolded_glue_runs_every_step_after_a_conv_on_the_batch() -> None:
    """`run_fanned(fold=False)` (glue "unfolded", the session-3 path kept for comparison) lays
    each fanned conv's output out as the K·B batch at once: no later step runs on the fold
    form, and the logits are the folded run's. Mutant killed: the conv's Fold returned as it
    is with `fold=False` (the "unfolded" glue silently the fold path)."""
    from tests.fanout.test_fanrun import _fanned, _resnet, _setup

    torch.manual_seed(0)
    model = _resnet("resnet18")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    setup = _setup(model, ("layer3.1.conv2.",), x, 3, False)  # its BN is shared
    unfolded: list[str] = []
    folded: list[str] = []
    got = _fanned(setup, 3, False, unfolded)
    want = _fanned(setup, 3, True, folded)
    assert "fold" in folded or "fused" in folded, folded
    assert set(unfolded) <= {"module", "batch"} and "batch" in unfolded, unfolded
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_fold_at_the_output_comes_back_variant_major() -> None:
    """A fanned suffix whose output is still in fold form (conv -> BN -> ReLU -> pool, [B, K·C,
    1, 1]) is returned as the variant-major K·B batch, each variant's rows its own forward's.
    Mutant killed: the Fold's tensor returned as it is (the K variants side by side on the
    channel dim, read back as rows of other samples)."""
    from tests.fanout.test_fanrun import _three_ways

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    folded, unfolded, ref, trace = _three_ways(model, ("0.",), x, K=3)
    assert trace[-1] == "fold", trace
    ref = ref.flatten(2)
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfolded, ref, rtol=1e-5, atol=1e-5)


class _InplaceKept(nn.Module):
    """An `inplace=True` ReLU whose input is read again (it runs in place, as in eager mode),
    then an in-place write on the batch form of its output: `h` must see both writes."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        z = self.act(h).flatten(1)
        z.mul_(2)
        return self.fc(h.flatten(1) + z)



def _fold_matches_eager(cls: type[nn.Module]) -> None:
    """The conv `c`'s variants run folded and unfolded (K=3) give the eager logits."""
    from tests.fanout.test_fanrun import _three_ways

    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    folded, unfolded, ref, trace = _three_ways(model, ("c.",), x, K=3)
    assert trace[1] == "fold", trace
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfolded, ref, rtol=1e-5, atol=1e-5)


def test_an_inplace_module_on_a_fold_keeps_one_fold() -> None:
    """A per-channel module that ran in place on a Fold's tensor returns that same Fold, so
    the one Fold is retired to one batch form for every step holding it, and a write into that
    batch (`z.mul_(2)`) is seen through `h` as in eager mode. Mutant killed: a second Fold
    wrapped around the written tensor (retired separately: `h` read a stale copy)."""
    _fold_matches_eager(_InplaceKept)


class _IaddAliased(nn.Module):
    """`b = a; b += 1.0` on a conv's output (in place on the fold form), then an in-place write
    on the batch form of `b`: `a` is the same tensor and must see both."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c(x)
        b = a
        b += 1.0
        z = b.flatten(1)
        z.mul_(2)
        return self.fc(a.flatten(1) + z)


def test_an_inplace_binary_on_a_fold_returns_that_fold() -> None:
    """`+=` into a Fold (`fanrun._binary`) returns the Fold it wrote into, so `a` and `b` stay
    one value through the retire to the batch form. Mutant killed: a new Fold around the
    written tensor (`a`'s batch form a stale copy that missed `z.mul_(2)`)."""
    _fold_matches_eager(_IaddAliased)


class _TwoNamesOneFold(nn.Module):
    """`a = act(h)` in place: `h` and `a` are one Fold. `h`'s batch form is written in place
    (`zh.mul_(2)`), then `a` is read by a per-channel step that could run on the fold form."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        a = self.act(h)
        zh = h.flatten(1)
        zh.mul_(2)
        return self.fc(torch.sigmoid(a).flatten(1) + zh)


def test_retiring_a_fold_retires_it_under_every_name() -> None:
    """`fanrun._retire` replaces the Fold by its batch form for every step holding it: `a`'s
    sigmoid then runs on the batch form and sees `zh.mul_(2)`, as in eager mode. Mutant killed:
    only the first holder retired (`a`'s sigmoid ran on the stale fold-form tensor)."""
    from tests.fanout.test_fanrun import _three_ways

    torch.manual_seed(0)
    model = _TwoNamesOneFold().eval()
    x = torch.randn(5, 3, 8, 8)
    folded, unfolded, ref, trace = _three_ways(model, ("c.",), x, K=3)
    assert "fold" in trace, trace
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfolded, ref, rtol=1e-5, atol=1e-5)

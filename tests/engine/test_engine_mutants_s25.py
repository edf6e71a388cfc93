"""Mutation testing of the engine's planner (engine.plan), cut verification (engine.verify) and
per-variant metrics (engine.evaluator, ops.score_reference), session 25: each test here kills
a realistic slip that the related tests let through (named in its docstring)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanout import FanPlan
from layerfast.engine.plan import Group, Plan, choose_batch, memory_budget


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 7))


def _data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 7, (n,), generator=g)


def _draws(model: nn.Module, key: str, n: int, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    t = model.state_dict()[key]
    return [{key: torch.randn(t.shape, generator=g) * t.std()} for _ in range(n)]


# ---- engine.plan ---------------------------------------------------------------------------


def test_a_resumed_pass_record_keeps_its_fanned_groups_in_the_summary() -> None:
    """`Plan.from_record` rebuilds a fanned group with an (empty) FanPlan: a record read back
    as swap-path groups (mutant: `fan` ignored) told run.json a finished pass fanned nothing."""
    plan = Plan([Group(2, [0, 1, 2], FanPlan(2, [], set(), set()), kmax=3),
                 Group(4, [3], None)], [4], [2, 4])
    back = Plan.from_record(plan.record(), range(5), 32)
    assert back.summary() == plan.summary()
    assert back.summary()["fanned_variants"] == 3 and back.summary()["swapped_variants"] == 1


def test_merged_plans_count_a_cut_kept_by_two_passes_once() -> None:
    """Two passes that keep the same cut keep one cut: `cuts_kept` of the merged plan is the
    distinct cuts (mutant: a list, not a set, counted the shared one twice)."""
    a = Plan([Group(2, [0], None)], [], [2, 4])
    b = Plan([Group(4, [1], None)], [], [4, 6])
    assert Plan.merged([a, b]).cuts == [2, 4, 6]
    assert Plan.merged([a, b]).summary()["cuts_kept"] == 3


def test_the_input_is_not_a_kept_cut() -> None:
    """Variants starting at the input read the batch itself: step 0 is never a kept cut
    (mutant: `g.start >= 0` kept it, and counted it in run.json's `cuts_kept`)."""
    model = _mlp()
    variants = _draws(model, "0.weight", 2) + _draws(model, "4.weight", 2, seed=3)
    ev = Evaluator(model, variants, device="cpu", fanout=False)
    res = ev.run([_data()])
    assert sorted(g.start for g in ev.last_plan.groups)[0] == 0
    assert 0 not in ev.last_plan.cuts and res.plan["cuts_kept"] == len(ev.last_plan.cuts) == 1


def test_the_gpu_budget_is_a_fraction_of_total_not_free_memory(monkeypatch) -> None:
    """Total, not free (`memory_budget`'s docstring): the same machine always picks the same
    K, so a resumed run adds the same fanned logits. Mutant: free memory read as the total."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 80 << 30))
    assert memory_budget(torch.device("cuda"), 0.5) == 40 << 30


def test_a_batch_that_fits_the_budget_exactly_is_taken() -> None:
    """B·need must fit the budget: equal to it fits (mutant: `>=` halved such a B)."""
    # need = kept + 4·peak·k = 0 + 4·1·1 = 4 bytes per sample
    assert choose_batch(0.0, 1.0, 1, 4 * 1000, 1000) == 1000
    assert choose_batch(0.0, 1.0, 1, 4 * 1000 - 1, 1000) == 512


def test_the_cpu_activation_cap_counts_every_fanned_variant() -> None:
    """On the CPU the largest activation of a batch, B·peak·K bytes, stays under the cap:
    K variants share the batch (mutant: the cap read B·peak, and picked an 8× larger B)."""
    from layerfast.engine.plan import CPU_TENSOR_CAP

    b = choose_batch(1.0, 10_000.0, 8, 1 << 40, 1000, CPU_TENSOR_CAP)
    assert b == 64 and b * 10_000 * 8 <= CPU_TENSOR_CAP < 2 * b * 10_000 * 8


def test_k_is_at_least_one_when_one_variant_does_not_fit() -> None:
    """A budget smaller than one variant's batch still runs one variant at a time (K=1); the
    out-of-memory back-off handles the rest (mutant: K=0, a chunk of no variants, forever)."""
    from layerfast.engine.plan import choose_kmax

    assert choose_kmax(1e9, 1000, 1 << 20, 32) == 1
    assert choose_kmax(10.0, 100, 10 * 100 * 5, 32) == 5


def test_a_group_that_exactly_fills_a_pass_goes_into_it() -> None:
    """First fit: a pass with exactly the group's bytes left has room for it (mutant: `<`
    sent it to a new pass, and a later group then split the passes otherwise)."""
    from layerfast.engine.plan import split_passes

    a, b, c = frozenset({"a"}), frozenset({"b"}), frozenset({"c"})
    assert split_passes([a, a, b, c], [3, 3, 4, 5], 10) == [[0, 1, 2], [3]]


def test_a_cut_group_fills_its_pass_to_the_limit_before_moving_on() -> None:
    """A group larger than the limit goes, in order, into the pass the previous variant went
    to while it has room, and exactly full is room (mutant: `>=` moved the piece that would
    fill it to an earlier pass, so the group spread over three passes instead of two)."""
    from layerfast.engine.plan import split_passes

    a, b = frozenset({"a"}), frozenset({"b"})
    assert split_passes([a, b, b, b], [4, 5, 3, 4], 8) == [[0, 3], [1, 2]]


def test_warn_plan_says_a_swap_path_back_off_alone(capsys) -> None:
    """An out-of-memory back-off on the swap path only (whole batches still fit) slowed the
    run all the same: it is said (mutant: only `rows_after_oom` was read)."""
    from layerfast.engine.plan import warn_plan

    warn_plan({"untraced": None, "rows_after_oom": None, "swap_rows_after_oom": 4})
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "swapped variants 4 samples at a time" in err
    assert "every batch in pieces" not in err


# ---- the per-variant metrics (DESIGN.md §5's error, top5_error, loss, agreement, n) ---------


def _by_hand(model: nn.Module, variants, batches) -> dict[str, torch.Tensor]:
    """Each variant's error, top-5 error, mean cross-entropy and agreement with the baseline's
    predictions, from its own model's forward, sample by sample."""
    base = torch.cat([model(x) for x, _ in batches]).argmax(1)
    y = torch.cat([y for _, y in batches])
    cols: dict[str, list[float]] = {"error": [], "top5": [], "loss": [], "agreement": []}
    for v in variants:
        m = copy.deepcopy(model)
        m.load_state_dict({**model.state_dict(), **v})
        with torch.no_grad():
            lg = torch.cat([m(x) for x, _ in batches]).double()
        top5 = lg.topk(5, 1).indices
        cols["error"].append(1.0 - (lg.argmax(1) == y).double().mean().item())
        cols["top5"].append(1.0 - (top5 == y[:, None]).any(1).double().mean().item())
        cols["loss"].append(nn.functional.cross_entropy(lg, y).item())
        cols["agreement"].append((lg.argmax(1) == base).double().mean().item())
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()}


def test_error_loss_and_agreement_are_the_naive_loops() -> None:
    """EvalResult's error, loss and agreement are top-1 error, mean cross-entropy and the
    fraction agreeing with the baseline's predictions, over every sample of every batch (a
    last partial one too). Mutants: error from the correct@5 column, loss from agreement's."""
    model = _mlp().eval()
    variants = _draws(model, "2.weight", 3) + _draws(model, "4.weight", 2, seed=5)
    x, y = _data(45)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    with torch.no_grad():
        want = _by_hand(model, variants, batches)
    res = Evaluator(model, variants, device="cpu", precision="fp32").run(batches)
    assert res.n == 45 and res.num_classes == 7
    torch.testing.assert_close(res.error, want["error"], rtol=0, atol=1e-12)
    torch.testing.assert_close(1.0 - res.counts[:, 1] / res.n, want["top5"], rtol=0, atol=1e-12)
    torch.testing.assert_close(res.loss, want["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.agreement, want["agreement"], rtol=0, atol=1e-12)
    assert (res.error != 1.0 - res.counts[:, 1] / res.n).any()  # the columns tell apart
    assert (res.loss != res.agreement).all()


# ---- out-of-memory back-offs never change a result -------------------------------------------


def test_an_oom_after_part_of_a_piece_was_scored_does_not_count_it_twice(monkeypatch) -> None:
    """A fanned chunk already at one variant that runs out of memory sends the batch's
    back-off (`_pass_rows`) to retry the piece in halves: what the piece had already added
    (the baseline-equal variant, the swap-path group before it) is dropped first, so each
    sample is scored once (mutant: not dropped, those variants counted the piece twice)."""
    import layerfast.engine.evaluator as ev

    model = _mlp().eval()
    live = model.state_dict()
    variants = ([{"0.weight": live["0.weight"].clone()}]  # equal to the baseline
                + _draws(model, "0.weight", 1, seed=4)  # a swap-path group of one, at step 0
                + _draws(model, "2.weight", 3))  # a fanned group
    x, y = _data(32)
    clean = Evaluator(model, variants, device="cpu", fanout=True).run([(x, y)])
    real, st = ev.run_fanned, {"fails": 0, "ks": []}

    def flaky(prog, plan, inp, stacks, K, **kw):
        st["ks"].append((K, inp.shape[0]))
        if st["fails"] < 2:  # K=3, then K=1: no smaller chunk, the batch is halved
            st["fails"] += 1
            raise torch.OutOfMemoryError("simulated")
        return real(prog, plan, inp, stacks, K, **kw)

    monkeypatch.setattr(ev, "run_fanned", flaky)
    e = Evaluator(model, variants, device="cpu", fanout=True)
    res = e.run([(x, y)])
    assert st["ks"][:2] == [(3, 32), (1, 32)] and e._rows == 16
    assert res.plan["baseline_equal_variants"] == 1 and res.plan["rows_after_oom"] == 16
    assert torch.equal(res.counts[:, [0, 1, 3]], clean.counts[:, [0, 1, 3]])
    torch.testing.assert_close(res.counts[:, 2], clean.counts[:, 2], rtol=1e-6, atol=1e-5)


def test_a_swap_path_back_off_keeps_the_larger_half(monkeypatch) -> None:
    """A swapped forward of 9 samples that runs out of memory runs as 4 + 5, and the rest of
    the run at most 5 at a time: the larger half, which just fitted (mutant: the smaller one,
    4, recorded and then every 5-sample piece cut again)."""
    from layerfast.engine.graph import Program

    model = _mlp().eval()
    variants = _draws(model, "2.weight", 2) + _draws(model, "4.weight", 1, seed=6)
    x, y = _data(9)
    clean = Evaluator(model, variants, device="cpu", fanout=False).run([(x, y)])
    real, sizes = Program.run, []

    def run(self, inp, start=0, *a, **kw):
        if start > 0 and "keep" not in kw:  # a swapped variant's suffix
            sizes.append(inp.shape[0])
            if len(sizes) == 1:
                raise torch.OutOfMemoryError("simulated")
        return real(self, inp, start, *a, **kw)

    monkeypatch.setattr(Program, "run", run)
    res = Evaluator(model, variants, device="cpu", fanout=False).run([(x, y)])
    assert sizes == [9, 4, 5, 4, 5, 4, 5]
    assert res.plan["swap_rows_after_oom"] == 5
    assert torch.equal(res.counts[:, [0, 1, 3]], clean.counts[:, [0, 1, 3]])
    torch.testing.assert_close(res.counts[:, 2], clean.counts[:, 2], rtol=1e-6, atol=1e-5)


# ---- the planned batch --------------------------------------------------------------------


def test_the_planned_batch_sizes_fanned_groups_at_most_max_fanout_wide(monkeypatch) -> None:
    """B is sized for the widest fanned chunk, a group capped at max_fanout variants (chunks
    never hold more): mutant, sized for the whole group of 8, a B four times too small."""
    import layerfast.engine.evaluator as ev
    from layerfast.data import open_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    variants = _draws(model, "3.weight", 8)
    seen = []
    real = ev.choose_batch

    def spy(kept, peak, k, *a):
        seen.append(k)
        return real(kept, peak, k, *a)

    monkeypatch.setattr(ev, "choose_batch", spy)
    e = Evaluator(model, variants, device="cpu", fanout=True, max_fanout=2)
    e.plan_batch(open_data("digits", split="test"))
    assert seen == [2]


# ---- engine.verify: which cuts are proven ---------------------------------------------------


class _SwapHalves(nn.Module):
    """A layer, then the batch's halves swapped (`cat([q, p])`): the outputs depend on which
    samples share a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        k = h.shape[0] // 2
        return self.b(torch.cat([h[k:], h[:k]]))


def test_a_batch_of_two_shows_swapped_halves() -> None:
    """From a batch of 2 repeated to 8 rows, 4 rows are the same two samples in the same
    proportions, and swapping halves gives them back unchanged: the second size is 3 rows
    (mutant: 4, and the model was taken for one that does not mix samples)."""
    from layerfast.engine.graph import Program
    from layerfast.engine.verify import unbatched_cuts

    torch.manual_seed(0)
    model = _SwapHalves().eval()
    report: dict = {}
    unbatched_cuts(Program(model), torch.randn(2, 6), torch.device("cpu"), report)
    assert report["mixes_samples"] is True and report["checked"] == 3


def test_a_batch_of_one_sample_cannot_show_mixing() -> None:
    """Every row of a one-sample batch is that sample: whether the model mixes samples is
    "unknown", so no out-of-memory back-off cuts its batches (mutant: left False)."""
    from layerfast.engine.graph import Program
    from layerfast.engine.verify import unbatched_cuts

    torch.manual_seed(0)
    report: dict = {}
    unbatched_cuts(Program(_mlp().eval()), torch.randn(1, 8), torch.device("cpu"), report)
    assert report["mixes_samples"] == "unknown"
    report = {}
    unbatched_cuts(Program(_mlp().eval()), torch.randn(3, 8), torch.device("cpu"), report)
    assert "mixes_samples" not in report


class _Seq8(nn.Module):
    """Sequence-first between two layers: the cut there holds the batch in dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x.view(x.shape[0], 3, 6))).transpose(0, 1)  # [3, B, 6]
        return self.b(h.mean(0))


def test_a_cut_not_batch_first_is_refused_from_one_size_alone(monkeypatch) -> None:
    """Where only the first size ran (the others failed), a cut whose dim 0 is not the batch
    is still refused from its shape (mutant: the shape clause skipped, and with no second
    size to compare rows with, the sequence-first cut counted as proven)."""
    from layerfast.engine.graph import Program
    from layerfast.engine.verify import unbatched_cuts

    torch.manual_seed(0)
    prog = Program(_Seq8().eval())
    real = Program.run

    def only8(self, x, *a, **kw):
        if x.shape[0] != 8:
            raise RuntimeError("this forward takes batches of 8")
        return real(self, x, *a, **kw)

    monkeypatch.setattr(Program, "run", only8)
    report: dict = {}
    bad = unbatched_cuts(prog, torch.randn(8, 18), torch.device("cpu"), report)
    cache: dict = {}
    real(prog, torch.randn(8, 18), 0, keep=set(prog.cuts), saved=cache)
    seq_first = {c for c, t in cache.items() if c and t.dim() == 3 and t.shape[0] == 3}
    assert report["checked"] == 1 and seq_first and seq_first <= bad


def test_rows_of_an_integer_cut_are_compared_exactly() -> None:
    """An integer cut (class indices fed to an embedding) whose rows on 4 samples are not the
    first rows on 8 is refused like a float one (mutant: integer rows taken as the same)."""
    from layerfast.engine.graph import Program
    from layerfast.engine.verify import unbatched_cuts

    class IntCut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.emb, self.b = nn.Linear(6, 5), nn.Embedding(5, 6), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            i = self.a(x).argmax(1)
            k = i.shape[0] // 2
            return self.b(self.emb(torch.cat([i[k:], i[:k]])))

    torch.manual_seed(0)
    prog = Program(IntCut().eval())
    x = torch.randn(8, 6) * 3
    cache: dict = {}
    prog.run(x, 0, keep=set(prog.cuts), saved=cache)
    ints = {c for c, t in cache.items() if c and not t.is_floating_point()}
    assert ints & unbatched_cuts(prog, x, torch.device("cpu"))  # the one after the swap


def test_close_needs_a_nan_where_the_reference_has_one() -> None:
    """`_close`: NaN matches NaN only; a finite value where the reference is NaN differs
    (mutant: any NaN in the reference passed)."""
    from layerfast.engine.verify import _close

    nan = float("nan")
    assert _close(torch.tensor([1.0, nan]), torch.tensor([1.0, nan]), floor=0.0)
    assert not _close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, nan]), floor=0.0)
    assert not _close(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0]), floor=0.0)


def test_differs_needs_the_forwards_nans_and_dtype() -> None:
    """`differs` (the trace check's verdict): on the CPU bit for bit, NaN only where the
    forward has NaN (mutant: any NaN of the forward's excused the program's value there),
    and the same dtype (mutant: a float64 program output equal in value passed)."""
    from layerfast.engine.verify import differs

    cpu, nan = torch.device("cpu"), float("nan")
    ref = torch.tensor([[1.0, nan]])
    assert differs(torch.tensor([[1.0, nan]]), ref, cpu) is None
    assert "logits differ" in differs(torch.tensor([[1.0, 2.0]]), ref, cpu)
    same = torch.tensor([[1.0, 2.0]])
    assert differs(same.clone(), same, cpu) is None
    assert "dtype" in differs(same.double(), same, cpu)


# ---- ops.score_reference ------------------------------------------------------------------


def test_the_reference_sums_the_loss_in_float64() -> None:
    """`score_`'s loss column is per-sample float32 cross-entropy summed in float64, and
    `score_reference` (what a GPU without the compiled kernel runs) must add the same: one
    loss of 1e8 and a thousand of log 3 (mutant: a float32 sum, off by units)."""
    from layerfast import ops

    x = torch.zeros(1, 1001, 3)
    x[0, 0, 0] = -1e8  # sample 0's label logit: a loss of 1e8
    y = torch.zeros(1001, dtype=torch.int64)
    per = (torch.logsumexp(x, 2) - x[..., 0])[0]  # float32, per sample
    acc = torch.zeros(1, 4, dtype=torch.float64)
    ops.score_reference(x, y, y, acc)
    assert abs(acc[0, 2].item() - per.double().sum().item()) < 1e-3
    kernel = torch.zeros(1, 4, dtype=torch.float64)
    ops.score_(x, y, y, kernel)
    assert abs(kernel[0, 2].item() - acc[0, 2].item()) < 1e-3


def _oom_once(monkeypatch, when) -> list[int]:
    """Program.run raises OutOfMemoryError the first time `when(x, start, kw)` holds."""
    from layerfast.engine.graph import Program

    real, sizes = Program.run, []

    def run(self, x, start=0, *a, **kw):
        if when(x, start, kw):
            sizes.append(x.shape[0])
            if len(sizes) == 1:
                raise torch.OutOfMemoryError("simulated")
        return real(self, x, start, *a, **kw)

    monkeypatch.setattr(Program, "run", run)
    return sizes


def test_no_back_off_cuts_the_batches_of_a_model_whose_mixing_is_unknown(monkeypatch) -> None:
    """A first batch of one sample cannot show whether the model mixes samples: an
    out-of-memory later is a clear error, not a batch cut in pieces that might change its
    counts (mutant: only a model seen to mix was refused; "unknown" was cut)."""
    import pytest

    from layerfast.errors import LayerfastError

    model = _mlp().eval()
    x, y = _data(17)
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    _oom_once(monkeypatch, lambda inp, start, kw: "keep" in kw and inp.shape[0] == 16)
    with pytest.raises(LayerfastError, match="could not be told from its first batch of one"):
        Evaluator(model, _draws(model, "2.weight", 2), device="cpu").run(batches)


def test_a_swapped_forward_of_a_model_that_mixes_samples_is_never_halved(monkeypatch) -> None:
    """A model whose outputs depend on which samples share a batch: an out-of-memory on the
    swap path is a clear error, not halves whose counts differ (mutant: halved)."""
    import pytest

    from layerfast.errors import LayerfastError

    torch.manual_seed(0)
    model = _SwapHalves().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
    sizes = _oom_once(monkeypatch, lambda inp, start, kw: start > 0 and "keep" not in kw)
    with pytest.raises(LayerfastError, match="depend on which samples share a batch"):
        Evaluator(model, _draws(model, "b.weight", 2), device="cpu", fanout=False).run([(x, y)])
    assert sizes == [16]


# ---- second round: records, refusals, K without a probe, scattered fanned rows --------------


def test_a_record_with_an_empty_group_is_refused() -> None:
    """A group of no variants is no group `record` writes: a damaged store (mutant: taken)."""
    import pytest

    rec = {"groups": [{"start": 0, "members": [], "fan": False, "kmax": 1, "fallback": None,
                       "refused": None}], "same_as_baseline": [], "cuts": [], "untraced": None}
    with pytest.raises(ValueError, match="are not variants of this pass"):
        Plan.from_record(rec, range(3), 32)


def test_a_refusal_names_three_modules_and_counts_the_rest() -> None:
    """`_named`: the first three modules, then how many more (mutant: the rest unsaid)."""
    from layerfast.engine.plan import _named

    assert _named(frozenset({"a", "b", "c", "d", "e"})) == "a, b, c and 2 more"
    assert _named(frozenset({"b", "a"})) == "a, b"


def test_fanned_rows_that_are_not_one_run_add_up_over_batches() -> None:
    """A fanned group whose variants are not consecutive rows (interleaved with another
    unit's) is scored into a block and added to its rows: every batch adds (mutant: the
    block assigned, so only the last batch counted)."""
    model = _mlp().eval()
    a, b = _draws(model, "2.weight", 3), _draws(model, "4.weight", 3, seed=7)
    variants = [v for pair in zip(a, b, strict=True) for v in pair]
    x, y = _data(48)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    want = Evaluator(model, variants, device="cpu", fanout=False).run(batches)
    got = Evaluator(model, variants, device="cpu", fanout=True).run(batches)
    assert got.plan["fanned_variants"] == 6 and not got.plan["fanout_fallbacks"]
    assert torch.equal(got.counts[:, [0, 1, 3]], want.counts[:, [0, 1, 3]])
    torch.testing.assert_close(got.counts[:, 2], want.counts[:, 2], rtol=1e-6, atol=1e-5)
    assert got.counts[:, 0].sum() > 0 and got.n == 48


def test_k_without_a_probe_is_sized_per_sample(monkeypatch) -> None:
    """For a plain iterable of batches (no probe), K is sized from one sample's bytes, taken
    from the first batch's kept cuts divided by its samples (mutant: the whole batch's bytes
    per sample, a K 32 times too small)."""
    import layerfast.engine.evaluator as ev

    seen = []
    real = ev.choose_kmax

    def spy(per_sample, batch, budget, cap):
        seen.append(per_sample)
        return real(per_sample, batch, budget, cap)

    monkeypatch.setattr(ev, "choose_kmax", spy)
    model = _mlp().eval()
    Evaluator(model, _draws(model, "4.weight", 3), device="cpu", fanout=True).run([_data(32)])
    assert seen and all(0 < s <= 4 * 16 * 4 for s in seen)  # the widest activation: 16 floats


def test_a_fanned_output_not_per_sample_falls_back(monkeypatch) -> None:
    """A fanned run whose output is [B, K·C] instead of [K·B, C] (the proof missed a model
    that folds the variants into features) goes to the swap path, exact (mutant: the shape
    check skipped and its rows reshaped into other variants' samples)."""
    import layerfast.engine.evaluator as ev

    real = ev.run_fanned

    def folded(prog, plan, inp, stacks, K, **kw):
        out = real(prog, plan, inp, stacks, K, **kw)
        b = inp.shape[0]
        return out.reshape(K, b, -1).transpose(0, 1).reshape(b, -1)

    model = _mlp().eval()
    variants = _draws(model, "2.weight", 3)
    x, y = _data(16)
    want = Evaluator(model, variants, device="cpu", fanout=False).run([(x, y)])
    monkeypatch.setattr(ev, "run_fanned", folded)
    got = Evaluator(model, variants, device="cpu", fanout=True).run([(x, y)])
    assert "NotPerSample" in " ".join(got.plan["fanout_fallbacks"].values())
    assert torch.equal(got.counts[:, [0, 1, 3]], want.counts[:, [0, 1, 3]])


def test_an_empty_batch_proves_no_cut_and_checks_nothing() -> None:
    """`unbatched_cuts` on no samples: nothing to tell from, so nothing checked (the caller
    checks a later batch) (mutant: a modulo by zero samples raised)."""
    from layerfast.engine.graph import Program
    from layerfast.engine.verify import unbatched_cuts

    report: dict = {}
    prog = Program(_mlp().eval())
    assert unbatched_cuts(prog, torch.zeros(0, 8), torch.device("cpu"), report) == set()
    assert report == {"checked": 0}


def test_close_takes_an_outliers_feature_as_its_scale() -> None:
    """`_close`: a feature holding an outlier (a mask at -1e9) has that magnitude as its
    scale, for its other rows too (mutant: each value its own scale, and a rounding
    difference next to a mask failed)."""
    from layerfast.engine.verify import _close

    r = torch.tensor([[-1e9, 1.0, 2.0], [0.5, 1.0, 2.0], [0.25, 1.0, 2.0]])
    t = r.clone()
    t[1, 0] += 1e-2  # within 1e-5 · 1e9 of the mask's feature, far outside 1e-5 · 2
    assert _close(t, r, floor=0.0)
    t = r.clone()
    t[1, 1] += 1e-2  # a feature without outliers: the tensor's largest ordinary value, 2
    assert not _close(t, r, floor=0.0)

"""Results that must not change (DESIGN.md §7, docs/engine.md "Exactness"): in fp32 on the
swap path a variant's counts are the naive loop's whatever the batch size, the thread count,
the order of the variants or which others share the run; a resumed pass adds what an
uninterrupted one does; running out of memory anywhere backs off without changing a count and
ends, when even one sample does not fit, in one clear error; an exception or Ctrl-C in any
forward leaves the model exactly as it came; bf16 on the CPU really runs bf16, within the bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerfast.engine.evaluator as ev
from layerfast.data.source import DataSource
from layerfast.engine import Evaluator, naive_evaluate
from layerfast.engine.graph import Program
from layerfast.errors import LayerfastError
from tests.engine.test_engine import _naive_logits


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test on one thread unless it sets its own (the conftest fixture restores it)."""


class Net(nn.Module):
    """A user model: conv, BN, a frozen weight, dropout, an in-place ReLU, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.r = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.c2.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r(self.bn(self.c1(x)))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(self.drop(x.flatten(1)))


def _net() -> tuple[Net, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 1.5)
    sd = m.state_dict()
    g = torch.Generator().manual_seed(1)

    def rnd(k: str) -> torch.Tensor:
        return torch.randn(sd[k].shape, generator=g) * 0.3

    variants = [{"c1.weight": rnd("c1.weight")}, {"c1.weight": rnd("c1.weight"), "c1.bias": rnd("c1.bias")},
                {"c2.weight": rnd("c2.weight"), "c2.bias": rnd("c2.bias")}, {"c2.weight": rnd("c2.weight")},
                {"bn.running_mean": rnd("bn.running_mean")}, {"fc.weight": rnd("fc.weight")},
                {"fc.weight": rnd("fc.weight"), "fc.bias": rnd("fc.bias")}, {}]
    return m, variants


def _fcn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def _fcn_variants(m: nn.Module, per: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [{f"{i}.weight": torch.randn(m[i].weight.shape, generator=g) * 0.1,
             f"{i}.bias": torch.randn(m[i].bias.shape, generator=g) * 0.1}
            for i in (1, 3, 5) for _ in range(per)]


def _xy(n: int, shape: tuple[int, ...], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _batches(x, y, b):
    return [(x[i:i + b], y[i:i + b]) for i in range(0, len(x), b)]


def _snapshot(m: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in m.state_dict().items()},
            "params": [(n, p, p.data_ptr(), p.requires_grad, p.grad) for n, p in m.named_parameters()],
            "buffers": [(n, b) for n, b in m.named_buffers()],
            "modes": [mm.training for mm in m.modules()],
            "inplace": [getattr(mm, "inplace", None) for mm in m.modules()]}


def _same(a: dict, m: nn.Module) -> bool:
    b = _snapshot(m)
    return (a["state"].keys() == b["state"].keys()
            and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
            and len(a["params"]) == len(b["params"])
            and all(n1 == n2 and p1 is p2 and d1 == d2 and r1 == r2 and g1 is g2
                    for (n1, p1, d1, r1, g1), (n2, p2, d2, r2, g2) in zip(a["params"], b["params"], strict=True))
            and all(n1 == n2 and b1 is b2 for (n1, b1), (n2, b2) in zip(a["buffers"], b["buffers"], strict=True))
            and a["modes"] == b["modes"] and a["inplace"] == b["inplace"])


def _engine_logits(m, variants, data, b, **kw):
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg)

    res = Evaluator(m, variants, device="cpu", batch_size=b, **kw).run(data, on_logits=hook)
    return res, torch.stack([torch.cat(got[i]) for i in range(len(variants))])


# ---- fp32, swap path: the naive loop's bits whatever the batching, threads, order -----------


@pytest.mark.parametrize("b", [1, 7, 13, 1000])
def test_every_batch_size_gives_the_naive_logits_at_that_batch_size(b):
    """B=1, primes, a last partial batch, B larger than the data: the engine's logits are the
    naive loop's at the same B bit for bit, and the counts do not depend on B at all."""
    m, variants = _net()
    x, y = _xy(29, (3, 8, 8))
    src = DataSource.from_arrays("t", x, y, num_classes=10)
    res, got = _engine_logits(m, variants, src, b, fanout=False)
    assert torch.equal(got, _naive_logits(m, variants, x, b))
    ref = naive_evaluate(m, variants, lambda: _batches(x, y, 29))
    assert torch.equal(res.counts[:, [0, 1, 3]], ref[:, [0, 1, 3]])


def test_thread_count_does_not_change_the_logits():
    m, variants = _net()
    x, y = _xy(24, (3, 8, 8))
    _, one = _engine_logits(m, variants, _batches(x, y, 12), 12, fanout=False)
    torch.set_num_threads(2)  # the autouse fixture puts 1 back
    _, two = _engine_logits(m, variants, _batches(x, y, 12), 12, fanout=False)
    assert torch.equal(one, two)
    assert torch.equal(two, _naive_logits(m, variants, x, 12))


def test_a_variants_counts_do_not_depend_on_the_others_or_their_order():
    m, variants = _net()
    x, y = _xy(40, (3, 8, 8))
    data = _batches(x, y, 16)
    full = Evaluator(m, variants, device="cpu", fanout=False).run(data).counts
    rev = Evaluator(m, variants[::-1], device="cpu", fanout=False).run(data).counts.flip(0)
    assert torch.equal(full, rev)
    for sub in ([2], [0, 5], [7, 3, 1], list(range(1, 8, 2))):
        got = Evaluator(m, [variants[i] for i in sub], device="cpu", fanout=False).run(data).counts
        assert torch.equal(got, full[sub]), sub


# ---- resume -----------------------------------------------------------------------------


def test_a_run_resumed_at_the_last_partial_batch_uses_the_same_k(monkeypatch):
    """K (variants per fanned chunk) was sized from the first batch the run saw: a pass resumed
    at its last, partial batch picked a larger K than the uninterrupted one and so added other
    fanned bits. It is sized from the planned B now; every resume point gives the same sums."""
    monkeypatch.setattr(ev, "memory_budget", lambda device, fraction: 40_000)  # K binds at B=16
    m = _fcn()
    variants = _fcn_variants(m)
    x, y = _xy(100, (1, 8, 8))
    src = DataSource.from_arrays("t", x, y, num_classes=10)
    e = Evaluator(m, variants, device="cpu", batch_size=16, fanout=True)
    saved: list[tuple[torch.Tensor, int]] = []
    full = e.run(src, on_checkpoint=lambda c, n: saved.append((c.clone(), n)),
                 checkpoint_every=0.0).counts
    kmax = e.last_plan.summary()["kmax"]
    assert kmax and set(kmax.values()) == {1}  # the budget really bounds K
    assert 96 in [n for _, n in saved]  # a checkpoint before the last batch (4 samples)
    for counts, n in saved:
        r = Evaluator(m, variants, device="cpu", batch_size=16, fanout=True)
        got = r.run(src, start=n, counts=counts).counts
        if n < 100:
            assert r.last_plan.summary()["kmax"] == kmax, n
        assert torch.equal(got, full), n


# ---- out of memory --------------------------------------------------------------------


def _inject(monkeypatch, pred, fails):
    """Program.run raises OutOfMemoryError on its first `fails` calls that `pred` picks, outside
    the first batch's check of the cuts' batch dim (`verify.unbatched_cuts`, which keeps the
    cuts as the baseline does, on a few samples; its own back-off is tested apart)."""
    from layerfast.engine import firstbatch

    real, st = Program.run, {"fails": 0, "sizes": []}
    inside = {"check": False}
    real_check = firstbatch.unbatched_cuts

    def check(*a, **k):
        inside["check"] = True
        try:
            return real_check(*a, **k)
        finally:
            inside["check"] = False

    monkeypatch.setattr(firstbatch, "unbatched_cuts", check)

    def run(self, x, start=0, *a, **kw):
        if not inside["check"] and pred(start, kw):
            st["sizes"].append(x.shape[0])
            if st["fails"] < fails:
                st["fails"] += 1
                raise torch.OutOfMemoryError("simulated")
        return real(self, x, start, *a, **kw)

    monkeypatch.setattr(Program, "run", run)
    return st


def _baseline(start, kw):
    return "keep" in kw  # the baseline pass keeps the cuts


def _suffix(start, kw):
    return start > 0 and "keep" not in kw  # a swapped variant's suffix


@pytest.mark.parametrize("fails", [1, 3])
def test_oom_on_the_swap_path_halves_the_batch_and_keeps_results(monkeypatch, fails):
    m, variants = _net()
    x, y = _xy(32, (3, 8, 8))
    data = _batches(x, y, 16)
    clean = Evaluator(m, variants, device="cpu", fanout=False).run(data).counts
    before = _snapshot(m)
    st = _inject(monkeypatch, _suffix, fails)
    res = Evaluator(m, variants, device="cpu", fanout=False).run(data)
    got = res.counts
    assert st["fails"] == fails and min(st["sizes"]) == 16 >> fails  # it really backed off
    # and kept the smaller size: later variants and batches do not each fail at 16 first
    assert max(st["sizes"][fails:]) == 16 >> fails
    assert res.plan["swap_rows_after_oom"] == 16 >> fails and res.plan["rows_after_oom"] is None
    assert torch.equal(got[:, [0, 1, 3]], clean[:, [0, 1, 3]])
    torch.testing.assert_close(got[:, 2], clean[:, 2], rtol=1e-6, atol=1e-5)
    assert _same(before, m)


def test_oom_in_the_baseline_halves_the_batch_and_keeps_results(monkeypatch):
    """The baseline forward (which also keeps every cut) had no back-off: an out-of-memory there
    ended the run with torch's error. Now the batch is cut in halves, for the rest of the run."""
    m, variants = _net()
    x, y = _xy(48, (3, 8, 8))
    data = _batches(x, y, 16)
    first = Evaluator(m, variants, device="cpu", fanout=False).run(data)
    clean = first.counts
    assert first.plan["rows_after_oom"] is None and first.plan["swap_rows_after_oom"] is None
    before = _snapshot(m)
    st = _inject(monkeypatch, _baseline, 1)
    e = Evaluator(m, variants, device="cpu", fanout=False)
    res = e.run(data)
    got = res.counts
    assert st["fails"] == 1 and st["sizes"][0] == 16 and set(st["sizes"][1:]) == {8}
    assert e._rows == 8  # lowered, and kept for the later batches
    assert res.plan["rows_after_oom"] == 8  # and said in the plan (run.json's engine.plan)
    assert torch.equal(got[:, [0, 1, 3]], clean[:, [0, 1, 3]])  # each sample scored once
    torch.testing.assert_close(got[:, 2], clean[:, 2], rtol=1e-6, atol=1e-5)
    assert _same(before, m)


@pytest.mark.parametrize("where", ["baseline", "suffix", "fanned"])
def test_oom_on_every_attempt_is_one_clear_error(monkeypatch, where):
    """No endless retry and no bare torch error: after backing off to one sample (and one
    variant per fanned chunk) the run says it does not fit; the model is as it came."""
    m, variants = _net()
    x, y = _xy(16, (3, 8, 8))
    before = _snapshot(m)
    st = {"fails": 0}
    if where == "fanned":
        def oom(*a, **kw):
            st["fails"] += 1
            raise torch.OutOfMemoryError("simulated")

        monkeypatch.setattr(ev, "run_fanned", oom)
    else:
        st = _inject(monkeypatch, _baseline if where == "baseline" else _suffix, 10**9)
    with pytest.raises(LayerfastError, match="out of memory on cpu even with one sample"):
        Evaluator(m, variants, device="cpu", fanout=where == "fanned").run([(x, y)])
    assert 0 < st["fails"] < 200
    assert _same(before, m)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_model_with_gradients_moved_to_the_device_comes_back_as_it_came(monkeypatch, layout):
    """`Module.to(cuda)` moves each gradient by replacing the grad object's own data, so the
    restore paired a CPU parameter with a CUDA grad and raised halfway (the later parameters,
    the buffers and the training flags left on the GPU). The move is simulated on the CPU by
    one with the same effect on grads, a cast to float64; channels_last converted 4-D grads the
    same way. Gradients now stay where they were, off the model during the run."""
    m, variants = _net()
    grads = {n: torch.randn(p.shape) for n, p in m.named_parameters() if p.dim() >= 2}
    for n, p in m.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    m.train()
    before = _snapshot(m)
    real_to = nn.Module.to

    def to_elsewhere(self, *args, **kw):  # the evaluator's model.to(device), as far as grads go
        if args and isinstance(args[0], torch.device):
            return real_to(self, torch.float64)
        return real_to(self, *args, **kw)

    monkeypatch.setattr(nn.Module, "to", to_elsewhere)
    ev = Evaluator(m, variants, device="cpu", layout=layout)
    with ev._on_device():
        assert all(p.dtype == torch.float64 for p in m.parameters())  # it did move
    assert _same(before, m)
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32
        if n in grads:
            g = p.grad
            assert g.dtype == torch.float32 and g.is_contiguous() and torch.equal(g, grads[n]), n


@pytest.mark.cuda
def test_a_cpu_model_with_gradients_run_on_cuda_comes_back_as_it_came():
    """The real move of the test above: a CPU model with gradients, run on the GPU."""
    m, variants = _net()
    grads = {n: torch.randn(p.shape) for n, p in m.named_parameters() if p.dim() >= 2}
    for n, p in m.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    before = _snapshot(m)
    x, y = _xy(16, (3, 8, 8))
    Evaluator(m, variants, device="cuda").run(_batches(x, y, 8))
    assert _same(before, m)
    assert all(p.grad.device.type == "cpu" and torch.equal(p.grad, grads[n])
               for n, p in m.named_parameters() if n in grads)


# ---- exceptions and Ctrl-C inside a forward ------------------------------------------------


@pytest.mark.parametrize("fanout", [False, True])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
def test_an_exception_at_any_forward_call_leaves_the_model_as_it_came(fanout, exc):
    """A user model that raises on its N-th module call, for every N the run makes: the state
    dict, each parameter's object, data pointer, requires_grad and grad, each buffer's object,
    every module's training flag and in-place flag come back as they were (train mode here)."""
    m, variants = _net()
    m.fc.weight.grad = torch.ones_like(m.fc.weight)
    m.train()
    x, y = _xy(16, (3, 8, 8))
    data = _batches(x, y, 8)
    calls = {"n": 0, "at": 0}

    def bomb(mod, args):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise exc("boom")

    for mod in (m.r, m.drop):
        mod.register_forward_pre_hook(bomb)
    before = _snapshot(m)
    Evaluator(m, variants, device="cpu", fanout=fanout).run(data)
    total = calls["n"]
    assert total > 20 and _same(before, m)
    raised = 0
    for at in range(1, total + 1):
        calls.update(n=0, at=at)
        try:
            Evaluator(m, variants, device="cpu", fanout=fanout).run(data)
        except exc:
            raised += 1
        assert _same(before, m), at
    # the first calls are the trace check's own forwards, whose failure is the pass's to report,
    # the check of which tensors each step reads (`Program.unseen_reads`) and the check of the
    # cuts' batch dim, which only learn nothing from a failed run
    assert raised >= total - 10


def test_a_train_mode_model_is_evaluated_in_eval_mode_and_comes_back_in_train_mode():
    """Dropout off and BN on running statistics, like the naive loop; train mode afterwards."""
    m, variants = _net()
    m.train()
    x, y = _xy(40, (3, 8, 8))
    data = _batches(x, y, 20)
    for fanout in (False, True):
        got = Evaluator(m, variants, device="cpu", fanout=fanout).run(data).counts
        assert m.training and all(mm.training for mm in m.modules())
        ref = naive_evaluate(m, variants, lambda: data)
        assert torch.equal(got[:, [0, 1, 3]], ref[:, [0, 1, 3]])
        torch.testing.assert_close(got[:, 2], ref[:, 2], rtol=1e-5, atol=1e-4)


# ---- precision ------------------------------------------------------------------------------


def _trained_digits_fcn():
    from layerfast.data.digits import open_digits

    def arrays(split):
        src = open_digits(split, None)
        xs, ys = zip(*src.batches(10_000), strict=True)
        x = torch.cat(xs).float() / src.scale
        if src.mean is not None:
            x = (x - torch.tensor(src.mean).view(1, -1, 1, 1)) / torch.tensor(src.std).view(1, -1, 1, 1)
        return x, torch.cat(ys)

    (xtr, ytr), (xte, yte) = arrays("train"), arrays("test")
    m = _fcn()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    ckpts = {0: {k: v.clone() for k, v in m.state_dict().items()}}
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, 7):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(m(xtr[idx]), ytr[idx]).backward()
            opt.step()
        if epoch in (1, 2):
            ckpts[epoch] = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    variants = [{f"{i}.weight": ck[f"{i}.weight"], f"{i}.bias": ck[f"{i}.bias"]}
                for i in (1, 3, 5) for ck in ckpts.values()]
    return m, variants, _batches(xte, yte, 128)


def test_bf16_on_the_cpu_runs_bf16_within_half_a_point_on_a_trained_model():
    """A trained FCN on `digits`, its layers reset to earlier checkpoints: bf16 error within 0.5
    points of fp32 per variant (measured 0.28), and bf16 really ran (its logits are not fp32's),
    on both the swap and the fanned path; tf32 has no CPU form and is fp32's bits."""
    m, variants, data = _trained_digits_fcn()
    ref, l32 = _engine_logits(m, variants, data, None, precision="fp32", fanout=False)
    assert ref.error.max() > 0.02  # the reset variants are not all trivially right
    for fanout in (False, True):
        res, l16 = _engine_logits(m, variants, data, None, precision="bf16", fanout=fanout)
        assert res.precision == "bf16"
        assert (res.error - ref.error).abs().max().item() <= 0.005 + 1e-12
        d = (l16 - l32).abs().max().item()
        assert 1e-3 < d < 1.0, d  # bf16 rounding, not fp32 bits and not garbage
    rtf, ltf = _engine_logits(m, variants, data, None, precision="tf32", fanout=False)
    assert torch.equal(ltf, l32)
    assert rtf.precision == "fp32"  # recorded as what ran (it was "tf32"), with a warning


def test_oom_on_the_swap_path_a_fanned_group_fell_back_to_is_backed_off(monkeypatch):
    """A fanned run that fails (not for memory) sends the rest of its group to the swap path;
    an out-of-memory there used to be taken for the fanned chunk's, halving K of a group that
    had no fan plan any more (AttributeError) after some members were already scored. It now
    goes to the batch's back-off: the same counts as a clean run."""
    m, variants = _net()
    variants = [variants[i] for i in (2, 3, 5, 6)]  # two fanned groups, both past a cut
    x, y = _xy(16, (3, 8, 8))
    clean = Evaluator(m, variants, device="cpu", fanout=False).run([(x, y)]).counts
    before = _snapshot(m)

    def broken(*a, **kw):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(ev, "run_fanned", broken)
    st = _inject(monkeypatch, _suffix, 5)  # 16, 8, 4, 2, 1 samples: out of memory each time
    res = Evaluator(m, variants, device="cpu", fanout=True).run([(x, y)])
    assert st["fails"] == 5 and st["sizes"][:5] == [16, 8, 4, 2, 1]
    assert len(res.plan["fanout_fallbacks"]) == 2
    assert torch.equal(res.counts[:, [0, 1, 3]], clean[:, [0, 1, 3]])
    torch.testing.assert_close(res.counts[:, 2], clean[:, 2], rtol=1e-6, atol=1e-5)
    assert _same(before, m)


@pytest.mark.parametrize("which", ["traced", "eager"])
def test_oom_in_the_first_batchs_trace_check_backs_off_and_keeps_the_trace(monkeypatch, which):
    """The trace check on the first batch took an out-of-memory as its verdict: in the traced
    program, the whole run went untraced (no prefix sharing, no fan-out); in the model's own
    forward, the trace was trusted unchecked. It now checks on fewer samples."""
    m, variants = _net()
    x, y = _xy(32, (3, 8, 8))
    data = _batches(x, y, 16)
    clean = Evaluator(m, variants, device="cpu", fanout=False).run(data).counts
    real_run, real_fwd, st = Program.run, Net.forward, {"fails": 0, "sizes": []}

    def fail_first(x):
        st["sizes"].append(x.shape[0])
        if st["fails"] < 2:
            st["fails"] += 1
            raise torch.OutOfMemoryError("simulated")

    def run(self, x, start=0, *a, **kw):
        if which == "traced" and start == 0 and not kw:  # only the check runs it without keep
            fail_first(x)
        return real_run(self, x, start, *a, **kw)

    def forward(self, x):
        if which == "eager" and isinstance(x, torch.Tensor) and not st["sizes"][2:]:  # not fx's
            fail_first(x)
        return real_fwd(self, x)

    monkeypatch.setattr(Program, "run", run)
    monkeypatch.setattr(Net, "forward", forward)
    e = Evaluator(m, variants, device="cpu", fanout=False)
    got = e.run(data).counts
    assert st["fails"] == 2 and st["sizes"][:3] == [16, 8, 4]
    assert e._trace_ok is True and e.last_plan.summary()["untraced"] is None
    assert e.last_plan.summary()["cuts_kept"] > 0
    assert torch.equal(got[:, [0, 1, 3]], clean[:, [0, 1, 3]])
    torch.testing.assert_close(got[:, 2], clean[:, 2], rtol=1e-6, atol=1e-5)


"""The memory planner picks B (samples per batch) when the caller does not (DESIGN.md §7.3).

B must fit the budget, be deterministic (a resumed analysis repeats it), leave the caller's
explicit choice alone, and never change a result: counts with a planned B equal the naive loop's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.data import open_data, to_device
from layerfast.engine import Evaluator, naive_evaluate
from layerfast.engine.plan import B_CPU, B_MIN, CPU_TENSOR_CAP, choose_batch


def test_choose_batch_fits_the_budget_and_prefers_large():
    assert choose_batch(1e3, 1e3, 8, 1 << 30, 4096) == 4096  # tiny model: the ceiling
    # ResNet-50-like at 224² in bf16: ~11 MB of kept cuts, 1.6 MB peak, 6 variants per unit,
    # half of an 80 GB GPU -> 512 (1024 would need 52 GB)
    b = choose_batch(11.4e6, 1.6e6, 6, 40 << 30, 4096)
    assert b == 512 and b * (11.4e6 + 4 * 1.6e6 * 6) <= 40 << 30
    assert choose_batch(1e3, 1e3, 8, 1 << 30, B_CPU) == B_CPU  # a non-power-of-two ceiling
    assert choose_batch(1e6, 1e6, 8, 10**7, B_CPU) == B_MIN  # nothing fits: the floor
    # monotone in the budget, and every answer but the floor fits
    last = 0
    for budget in [2**p for p in range(20, 34)]:
        b = choose_batch(5e4, 2e4, 4, budget, 4096)
        assert b >= last and (b == B_MIN or b * (5e4 + 4 * 2e4 * 4) <= budget)
        last = b


def _fcn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def _variants(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for name, p in model.named_parameters():
        for _ in range(3):
            out.append({name: torch.randn(p.shape, generator=g) * p.detach().std()})
    return out


def test_planned_batch_defaults_and_respects_the_caller():
    model, src = _fcn(), open_data("digits", split="test")
    variants = _variants(model)
    assert Evaluator(model, variants, device="cpu").plan_batch(src) == B_CPU
    fixed = Evaluator(model, variants, device="cpu", batch_size=77)
    assert fixed.plan_batch(src) == 77
    # A plain iterable is already batched: the planner leaves it alone.
    ev = Evaluator(model, variants, device="cpu", memory_fraction=1e-9)
    assert ev.plan_batch([(torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))]) == B_CPU


@pytest.mark.parametrize("fanout", [False, True])
def test_small_budget_shrinks_batch_and_keeps_results(fanout, monkeypatch):
    # 400 kB: the digits FCN needs ~1.6 kB per sample alone, ~7 kB with 6 variants fanned
    monkeypatch.setattr("layerfast.engine.evaluator.memory_budget", lambda dev, frac: 400_000)
    model, src = _fcn(), open_data("digits", split="test")
    variants = _variants(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = Evaluator(model, variants, device="cpu", precision="fp32", fanout=fanout)
    b = ev.plan_batch(src)
    assert b == (32 if fanout else 128)
    assert ev.plan_batch(src) == b  # idempotent
    again = Evaluator(model, variants, device="cpu", precision="fp32", fanout=fanout)
    assert again.plan_batch(src) == b  # deterministic
    res = ev.run(src)
    assert res.n == src.n
    cpu = torch.device("cpu")
    ref = naive_evaluate(model, variants, lambda: (to_device(x, y, src, cpu, torch.float32, False)
                                                   for x, y in src.batches(1000)), device=cpu)
    flips = (res.counts[:, 0] - ref[:, 0]).abs()
    if fanout:
        assert flips.max() <= 1, flips
    else:
        assert torch.equal(res.counts[:, 0], ref[:, 0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cpu_tensor_cap_keeps_activations_cache_sized():
    # ResNet-20-like at 28²: 16×28×28 fp32 = 50 kB per sample -> 128 samples (6.4 MB ≤ 8 MB)
    assert choose_batch(5e5, 50176, 1, 4 << 30, B_CPU, CPU_TENSOR_CAP) == 128
    assert choose_batch(5e5, 50176, 1, 4 << 30, B_CPU) == B_CPU  # no cap: memory allows 1000
    assert choose_batch(3e3, 3136, 1, 4 << 30, B_CPU, CPU_TENSOR_CAP) == B_CPU  # the FCN


def test_fanout_defaults_off_on_cpu_and_planned_batch_follows_the_cap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    src = open_data("synthetic:cifar:64", split="test")  # 3×32×32
    model[0] = nn.Conv2d(3, 16, 3, padding=1)
    variants = [{"2.weight": torch.zeros(16, 16, 3, 3)}, {"6.bias": torch.ones(10)}]
    ev = Evaluator(model, variants, device="cpu")
    assert ev.fanout is False
    assert Evaluator(model, variants, device="cpu", fanout=True).fanout is True
    # 16×32×32 fp32 = 64 kB per sample: 8 MB allows 128
    assert ev.plan_batch(src) == 128


def test_analysis_fanout_on_matches_default_on_cpu(tmp_path, ckpts):
    from layerfast import analyze

    kw = dict(data="digits", seeds=2, device="cpu", precision="fp32", progress=False,
              figures=False)
    a = analyze("fcn3x256", ckpts, out=tmp_path / "a", **kw)
    b = analyze("fcn3x256", ckpts, out=tmp_path / "b", fanout=True, **kw)
    assert a.run["batch_size"] == b.run["batch_size"] == B_CPU
    n = a.run["n"]
    diff = ((a.table["error"] - b.table["error"]) * n).round().abs()
    assert diff.max() <= 1, diff.max()

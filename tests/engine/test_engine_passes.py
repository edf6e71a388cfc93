"""Bounded staging and the model's state: several passes when the variants' tensors exceed the
stage limit (DESIGN §2: memory bounded by the model size times a constant, not by the number
of checkpoints), resuming inside a later pass, and the model coming back exactly as it came
(tensor objects, layouts, per-module training flags) whatever happens inside its forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import layerfast
from layerfast.engine import Evaluator
from layerfast.engine.plan import split_passes, stage_limit
from layerfast.errors import LayerfastError
from tests.engine.test_engine import VGGish, _data, _variants, fcn


def test_split_passes_keeps_units_together_and_bounds_each_pass() -> None:
    a, b, c = frozenset({"a"}), frozenset({"b"}), frozenset({"c"})
    keys = [a, b, a, c, b, a]
    sizes = [4, 3, 4, 10, 3, 4]
    assert split_passes(keys, sizes, 100) == [[0, 1, 2, 3, 4, 5]]  # all fit: one pass
    passes = split_passes(keys, sizes, 12)
    assert sorted(i for p in passes for i in p) == list(range(6))  # each variant exactly once
    assert all(sum(sizes[i] for i in p) <= 12 for p in passes)
    assert passes[0] == [0, 2, 5]  # unit `a` together, in order
    assert split_passes(keys, sizes, 5) == [[0], [2], [5], [1], [4], [3]]  # 10 > 5: alone
    assert stage_limit(10) == 1 << 30 and stage_limit(1 << 30) == 8 << 30


@pytest.mark.parametrize("fanout", [False, True])
def test_several_passes_give_the_one_pass_results(fanout: bool) -> None:
    torch.manual_seed(0)
    model = VGGish()
    variants = _variants(model)
    x, y = _data(100)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 100, 32)]

    def run(stage_bytes: int | None):
        seen: dict[int, list[torch.Tensor]] = {}

        def hook(rows, logits):
            for r, lg in zip(rows, logits, strict=True):
                seen.setdefault(r, []).append(lg)

        ev = Evaluator(model, variants, device="cpu", fanout=fanout, stage_bytes=stage_bytes)
        res = ev.run(batches, on_logits=hook)
        return res, {r: torch.cat(v) for r, v in seen.items()}, ev

    one, logits1, _ = run(None)
    biggest = max(sum(t.numel() * 4 for t in v.values()) for v in variants)
    many, logits2, ev = run(biggest)
    P = len(ev.passes())
    assert one.plan["passes"] == 1 and many.plan["passes"] == P > 2
    assert torch.equal(many.counts, one.counts) and many.n == one.n == 100
    assert logits1.keys() == logits2.keys()  # the hook sees every variant by its own index
    assert all(torch.equal(logits1[r], logits2[r]) for r in logits1)
    # (a unit's variants split across passes may lose fan-out: a group of one runs swapped)
    assert all(not g.stacks for g in ev.last_plan.groups)  # no weight stacks held after run


def test_several_passes_need_data_that_can_be_read_again() -> None:
    model = fcn()
    variants = [{"1.weight": model[1].weight.detach() + i} for i in range(3)]
    x, y = _data(8)
    ev = Evaluator(model, variants, device="cpu", stage_bytes=1)
    assert len(ev.passes()) == 3
    with pytest.raises(LayerfastError, match="3 passes over the data.*one-shot iterator"):
        ev.run(iter([(x, y)]))
    assert ev.run([(x, y)]).n == 8  # a list can be read three times


def test_resume_inside_a_later_pass_gives_the_uninterrupted_results(ckpts: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """analyze() with the stage limit at a third of the model: progress counts samples over the
    passes; a crash in pass 2 resumes there and results.csv is byte for byte the one-pass one."""
    import layerfast.engine.evaluator as evm
    from layerfast.store import ResumeStore

    args = {"data": "digits", "seeds": 1, "device": "cpu", "batch_size": 32, "progress": False,
            "figures": False, "checkpoint_every": 0}
    ref = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "one", **args)
    monkeypatch.setattr(evm, "stage_limit", lambda model_bytes: model_bytes // 3)
    real, saves = ResumeStore.save, []

    def save(self, counts, n_done):
        real(self, counts, n_done)
        saves.append(n_done)
        if n_done > 360 + 64:  # three batches into pass 2 (of at least 3; 360 samples each)
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ResumeStore, "save", save)
        with pytest.raises(KeyboardInterrupt):
            layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "many", **args)
    assert saves == sorted(saves) and {352, 360, 392, 424}.issubset(saves)  # pass 1's end, on
    res = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "many", **args)
    P = res.run["engine"]["plan"]["passes"]
    assert P >= 3 and res.run["engine"]["resumed_from"] == saves[-1]
    assert res.run["engine"]["evaluated"] == P * 360 - saves[-1] and res.run["n"] == 360
    for name in ("results.csv", "distances.csv"):
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert ref.run["engine"]["plan"]["passes"] == 1


# ---- the model comes back exactly as it came ----------------------------------------------


class Guarded(nn.Module):
    """A user's forward with a data-dependent check that raises."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        if not torch.isfinite(h).all():
            raise ValueError("non-finite activations")
        return self.l2(h)


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_an_exception_inside_forward_leaves_the_weights_as_they_were(exc) -> None:
    torch.manual_seed(0)
    model = Guarded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 8), torch.randint(0, 10, (16,))
    if exc is KeyboardInterrupt:  # Ctrl-C in the middle of a variant's forward
        model.l2.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt)
                                           if m.weight.abs().max() > 100 else None)
        variants = [{"l2.weight": torch.full((10, 8), 1000.0)}]
    else:
        variants = [{"l1.weight": torch.full((8, 8), float("inf"))}]
    # the user's check that a variant trips is bad input, said as such (the weights are also
    # put back after the engine has tried the variant's forward on its own to tell)
    with pytest.raises(LayerfastError if exc is ValueError else exc):
        Evaluator(model, variants, device="cpu", fanout=False).run([(x, y)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_objects_layouts_and_each_modules_mode_are_restored() -> None:
    """A train-mode model with a frozen eval-mode BN, channels_last weights, a 4-D buffer held
    elsewhere, gradients: after runs in both layouts everything is the same object as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10))
    model[0].register_buffer("gain", torch.ones(1, 4, 1, 1))
    model.to(memory_format=torch.channels_last)
    model.train()
    model[1].eval()
    model[4].weight.grad = torch.ones_like(model[4].weight)
    modes = [m.training for m in model.modules()]
    params = [(p, p.data_ptr(), p.stride(), p.grad) for p in model.parameters()]
    buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items()]
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for layout in ("contiguous", "channels_last"):
        Evaluator(model, [{"4.bias": torch.zeros(10)}, {"0.weight": torch.zeros(4, 3, 3, 3)}],
                  device="cpu", layout=layout).run([(x, y)])
        assert [m.training for m in model.modules()] == modes
        assert all(p.data_ptr() == d and p.stride() == s and p.grad is g for p, d, s, g in params)
        assert all(m._buffers[n] is b for m, n, b in buffers)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


class ViewFlatten(nn.Module):
    """CIFAR-style code: `x.view(B, -1)` on a conv map, which channels_last cannot view."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(x))
        return self.fc(x.view(x.size(0), -1))


def test_a_model_that_cannot_run_channels_last_falls_back_or_says_so() -> None:
    torch.manual_seed(0)
    model = ViewFlatten().eval()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    v = [{"c.bias": torch.zeros(4)}]
    ref = Evaluator(model, v, device="cpu", layout="contiguous").run([(x, y)])
    with pytest.raises(LayerfastError, match="does not run with channels_last.*contiguous"):
        Evaluator(model, v, device="cpu", layout="channels_last").run([(x, y)])
    ev = Evaluator(model, v, device="cpu", layout="channels_last")
    ev.layout = "auto"  # what `auto` means on a GPU in bf16: channels_last unless it cannot
    res = ev.run(iter([(x, y)]))  # a one-shot iterator: the probe must not eat its batch
    assert not ev.channels_last and res.n == 8 and torch.equal(res.counts, ref.counts)
    ok = Evaluator(VGGish(), [{}], device="cpu", layout="channels_last")
    assert ok.settle_layout(torch.zeros(2, 1, 8, 8)) and ok.channels_last


def test_a_units_variants_stay_in_one_pass_so_fan_out_gives_the_one_pass_bits() -> None:
    """split_passes filled each pass greedily and cut a unit's group at the pass boundary: its
    pieces fanned out apart (or, one left alone, ran swapped), and on a ResNet, where a fanned
    group's logits depend on its width in the last bits, results depended on the split (7 of
    71 rows of a ResNet-20 study, bf16: up to 1 sample). A group that fits is now never cut."""
    from layerfast.models import build_model
    from layerfast.units import make_units

    torch.manual_seed(0)
    model, spec = build_model("resnet20", 10, (1, 8, 8))
    model.eval()
    g = torch.Generator().manual_seed(1)
    variants: list[dict[str, torch.Tensor]] = [{}]
    for u in make_units(model, granularity="block", arch=spec):
        sd = model.state_dict()
        for _ in range(3):
            variants.append({k: sd[k] + 0.2 * torch.randn(sd[k].shape, generator=g) * sd[k].std()
                             if sd[k].is_floating_point() and sd[k].numel() > 1 else sd[k]
                             for k in u.keys})
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    batches = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 96, 40)]
    group = max(sum(t.numel() * t.element_size() for v in variants[i:i + 3] for t in v.values())
                for i in range(1, len(variants), 3))

    def run(stage_bytes: int | None):
        # bf16: there a fanned group's logits depend on its width (in fp32 here they did not)
        ev = Evaluator(model, variants, device="cpu", fanout=True, stage_bytes=stage_bytes,
                       precision="bf16")
        return ev.run(batches), ev

    one, _ = run(None)
    many, ev = run(group + group // 3)  # a group and a bit: greedy filling cut groups here
    assert many.plan["passes"] > 2
    keys = [frozenset(v) for v in variants]
    for p in ev.passes():  # each unit's three variants in one pass
        assert all(keys.count(keys[i]) == sum(keys[j] == keys[i] for j in p) for i in p if i)
    assert torch.equal(many.counts, one.counts) and many.plan["fanned_variants"] == 33


def test_a_unit_too_big_for_a_pass_fills_the_room_others_left() -> None:
    """A unit larger than the limit is cut; its pieces used to start a new pass each, never
    the room earlier passes had left (ResNet-50 at 101 checkpoints: 23 passes instead of 21)."""
    a, b = frozenset({"a"}), frozenset({"b"})
    assert split_passes([a] * 5 + [b], [4] * 5 + [3], 8) == [[0, 1], [2, 3], [4, 5]]
    assert split_passes([b, a, a, a], [3, 4, 4, 4], 8) == [[0, 1], [2, 3]]


def test_fan_out_width_does_not_depend_on_the_split() -> None:
    """K (variants per fanned chunk) was sized per pass from the largest activation that pass
    kept: a ResNet-20 study got K = 2 in one pass and 5 and 11 in the passes of a split, so a
    unit's chunks, and on a GPU the last bits of its logits, depended on the split. It is now
    sized once from the cuts of every variant."""
    from layerfast.models import build_model
    from layerfast.units import make_units

    torch.manual_seed(0)
    model, spec = build_model("resnet20", 10, (1, 8, 8))
    variants: list[dict[str, torch.Tensor]] = [{}]
    for u in make_units(model, granularity="block", arch=spec):
        sd = model.state_dict()
        for s in range(6):
            variants.append({k: sd[k] * (1 + 0.01 * (s + 1)) for k in u.keys})
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]
    unit_bytes = max(sum(t.numel() * t.element_size() for t in v.values()) for v in variants) * 6

    def kmax(stage_bytes: int | None) -> tuple[dict[frozenset[int], int], int]:
        ev = Evaluator(model, variants, device="cpu", fanout=True, stage_bytes=stage_bytes,
                       memory_fraction=1e-4)  # a budget small enough that K depends on it
        res = ev.run(batches)
        return {frozenset(g.members): g.kmax for g in ev.last_plan.groups if g.fan}, \
            res.plan["passes"]

    one, p1 = kmax(None)
    many, p2 = kmax(unit_bytes)
    assert p1 == 1 and p2 > 2
    assert 1 < min(one.values()) < 32 and many == one  # K set by the budget, not the cap

"""The fold form of the fan-out (`engine/fanrun.py`): a unit's K variants stay side by side on
the channel dim, [B, K·C, *S], from their first conv to the first step that needs a batch.

Every case runs the same fanned group three ways — folded, unfolded after every conv (the
earlier path), and one variant at a time through the model itself — and checks that the
folded logits equal the per-variant ones (fp32, to rounding), that the fold form was really
used (the trace), and that the layout (channels_last) survives it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator, layout, naive_evaluate
from layerfast.engine.fanout import fan_plan
from layerfast.engine.fanrun import run_fanned, stack_module
from layerfast.engine.graph import Program, no_inplace_modules
from layerfast.engine.layout import Fold, expand, to_batch, to_fold
from tests.engine.test_engine import _perturb_bn as _perturb


def _resnet(arch: str, hw: int = 16) -> nn.Module:
    from layerfast.models import build_model

    model, _ = build_model(arch, 10, (3, hw, hw))
    return model


def _draws(model: nn.Module, prefixes: tuple[str, ...], K: int, seed: int = 0) -> list[dict]:
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    keys = [k for k in sd if k.startswith(prefixes) and sd[k].is_floating_point()]
    return [{k: (torch.rand(sd[k].shape, generator=g) + 0.5 if "running_var" in k
                 else torch.randn(sd[k].shape, generator=g) * (sd[k].std() + 0.05))
             for k in keys} for _ in range(K)]


def _setup(model: nn.Module, prefixes: tuple[str, ...], x: torch.Tensor, K: int, cl: bool):
    model.eval()
    if cl:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    variants = _draws(model, prefixes, K)
    keys = set(variants[0])
    prog = Program(model)
    start = prog.start_cut(keys)
    plan = fan_plan(prog, start, keys)
    assert plan is not None, f"{prefixes} should fan out"
    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad(), no_inplace_modules(model):
        prog.run(x, 0, keep={start}, saved=cache)
    inp = x if start == 0 else cache[start]
    stacks = {}
    for mod in plan.modules:
        per = [{k[len(mod) + 1:]: t for k, t in v.items() if k.startswith(mod + ".")}
               for v in variants]
        stacks[mod] = stack_module(prog.modules[mod], per, cl)
    return prog, plan, inp, stacks, variants, x


def _fanned(setup, K: int, fold: bool, trace: list[str] | None = None, fuse: bool = True
            ) -> torch.Tensor:
    prog, plan, inp, stacks, _, x = setup
    with torch.no_grad(), no_inplace_modules(prog.model):
        out = run_fanned(prog, plan, inp.clone(), stacks, K, fold=fold, fuse_ops=fuse, trace=trace)
    return out.view(K, x.shape[0], -1)


def _three_ways(model: nn.Module, prefixes: tuple[str, ...], x: torch.Tensor, K: int = 3,
                cl: bool = False, fuse: bool = True):
    """(folded logits, unfolded logits, per-variant logits, trace), each [K, B, C]."""
    setup = _setup(model, prefixes, x, K, cl)
    trace: list[str] = []
    folded = _fanned(setup, K, True, trace, fuse)
    unfolded = _fanned(setup, K, False)
    variants, x = setup[4], setup[5]
    ref = []
    sd = model.state_dict()
    with torch.no_grad():
        for v in variants:
            saved = {k: sd[k].clone() for k in v}
            model.load_state_dict(v, strict=False)
            ref.append(model(x))
            model.load_state_dict(saved, strict=False)
    return folded, unfolded, torch.stack(ref), trace


CASES = {
    # a BasicBlock without downsample: conv-BN-ReLU-conv-BN, += the shared input, ReLU
    "resnet18 layer1.0": ("resnet18", ("layer1.0.",)),
    # a BasicBlock with a downsample: the residual add is Fold + Fold
    "resnet18 layer2.0": ("resnet18", ("layer2.0.",)),
    # one conv alone: the BN after it is the model's own, tiled over the K variants
    "resnet18 layer3.1.conv2": ("resnet18", ("layer3.1.conv2.",)),
    # a Bottleneck with a downsample, and one without
    "resnet50 layer1.0": ("resnet50", ("layer1.0.",)),
    "resnet50 layer3.2": ("resnet50", ("layer3.2.",)),
    # a whole stage: the fold form runs across block boundaries
    "resnet18 layer2": ("resnet18", ("layer2.",)),
}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_fold_matches_per_variant(case, cl, fuse):
    arch, prefixes = CASES[case]
    torch.manual_seed(0)
    model = _resnet(arch)
    _perturb(model)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    folded, unfolded, ref, trace = _three_ways(model, prefixes, x, cl=cl, fuse=fuse)
    scale = ref.abs().max().item()
    d_ref = (folded - ref).abs().max().item()
    d_old = (folded - unfolded).abs().max().item()
    print(f"{case} cl={cl}: max |Δ| vs per-variant {d_ref:.3g}, vs unfolded {d_old:.3g} "
          f"(logits up to {scale:.3g}); trace {trace}")
    assert d_ref <= 1e-4 * max(scale, 1.0)
    assert d_old <= 1e-4 * max(scale, 1.0)
    assert "fold" in trace or "fused" in trace, "the fold form was never used"
    assert ("fused" in trace) == fuse, "every case has a BN -> [add ->] ReLU chain to fuse"
    assert torch.equal(folded.argmax(-1), ref.argmax(-1)) or d_ref < 1e-5


def test_fold_keeps_channels_last_until_the_batch(monkeypatch):
    """Every Fold that reaches the K·B batch is still channels_last (BN, ReLU and the broadcast
    residual add kept the layout), so the convs after it stay in the fast layout."""
    seen: list[bool] = []
    real = layout.to_batch

    def spy(y, K):
        seen.append(y.dim() != 4 or y.is_contiguous(memory_format=torch.channels_last))
        out = real(y, K)
        assert out.is_contiguous(memory_format=torch.channels_last) or out.dim() != 4
        return out

    monkeypatch.setattr(layout, "to_batch", spy)
    torch.manual_seed(0)
    model = _resnet("resnet18")
    x = torch.randn(4, 3, 16, 16)
    _three_ways(model, ("layer1.0.",), x, cl=True)
    assert seen and all(seen)


def test_bottleneck_unfolds_once(monkeypatch):
    """A Bottleneck with a downsample, fanned: ONE layout copy (into the next block), where the
    unfolded path makes one after each of its 4 convs and one before each of its 2 grouped convs."""
    torch.manual_seed(0)
    model = _resnet("resnet50")
    setup = _setup(model, ("layer2.0.",), torch.randn(2, 3, 16, 16), 3, False)
    calls: dict[str, int] = {}

    def counting(name, real):
        def f(y, K):
            calls[name] = calls.get(name, 0) + 1
            return real(y, K)
        return f

    monkeypatch.setattr(layout, "to_batch", counting("unfold", layout.to_batch))
    monkeypatch.setattr(layout, "to_fold", counting("fold", layout.to_fold))
    trace: list[str] = []
    _fanned(setup, 3, True, trace, fuse=False)
    assert calls == {"unfold": 1}, (calls, trace)
    # 8 overridden modules; relu, relu, add, relu on the fold form; layer2.1 onwards on the batch
    assert trace[:12].count("module") == 8 and trace[:12].count("fold") == 4, trace
    assert set(trace[12:]) == {"batch"}, trace
    # fused: bn1+relu, bn2+relu, downsample BN + add (of bn3) + relu are 3 affine_relu calls
    calls.clear()
    trace.clear()
    _fanned(setup, 3, True, trace)
    assert calls == {"unfold": 1}, (calls, trace)
    assert trace[:12].count("module") == 5 and trace[:12].count("fused") == 7, trace
    calls.clear()
    _fanned(setup, 3, False)
    assert calls == {"unfold": 4, "fold": 2}, calls


def test_layout_helpers_round_trip():
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = torch.randn(5, 3 * 4, 6, 7).contiguous(memory_format=fmt)
        b = to_batch(y, 3)
        assert b.shape == (15, 4, 6, 7)
        assert torch.equal(b.view(3, 5, 4, 6, 7)[1], y[:, 4:8])
        assert b.is_contiguous(memory_format=fmt)
        assert torch.equal(to_fold(b, 3), y)
        e = expand(y[:, :4], 3)
        assert torch.equal(e.view(3, 5, 4, 6, 7)[2], y[:, :4])


def test_fold_per_variant_shape():
    f = Fold(torch.zeros(2, 12, 5, 5), 3)
    assert f.per_variant_shape == (2, 4, 5, 5)
    assert f.batch() is f.batch()  # made once


class Aliasing(nn.Module):
    """A view of a fanned value taken before an in-place op must see the op, as in eager mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(2 * 4 * 6 * 6, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h.relu_()  # in place, on the fold form
        f = torch.flatten(h, 1)  # a view of h: from here on h is a K·B batch
        h.add_(0.5)  # eager: f sees this
        g = torch.flatten(h, 1)
        return self.head(torch.cat([f, g], 1))


class Functional(nn.Module):
    """Per-channel functional ops, numbers on either side, a shared skip on the left."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c = nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        s = self.c(x)  # shared (not overridden)
        h = F.relu(self.a(x))
        h = 1.5 - torch.sigmoid(self.b(h)) * 2.0
        h = s + h  # shared on the left
        h = F.max_pool2d(h, 2) + 0.25
        h = F.adaptive_avg_pool2d(h.relu(), 1)
        return self.head(torch.flatten(h, 1))


@pytest.mark.parametrize("model_cls", [Aliasing, Functional])
def test_user_models_fold_equal_naive(model_cls):
    torch.manual_seed(0)
    model = model_cls()
    in_ch = 1 if model_cls is Aliasing else 2
    x = torch.randn(5, in_ch, 6, 6, generator=torch.Generator().manual_seed(2))
    prefixes = ("conv.", "bn.") if model_cls is Aliasing else ("a.", "b.")
    folded, _, ref, trace = _three_ways(model, prefixes, x)
    print(model_cls.__name__, trace, (folded - ref).abs().max().item())
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
    assert "fold" in trace


def test_batchnorm_with_batch_statistics_is_not_fanned():
    """An eval-mode BN without running statistics normalises with the batch's: a K·B batch
    would mix variants, so the proof refuses it."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()
    prog = Program(model)
    assert fan_plan(prog, 0, {"0.weight", "0.bias"}) is None


@pytest.mark.parametrize(("arch", "layout", "glue"), [
    ("resnet18", "contiguous", "fused"), ("resnet18", "contiguous", "fold"),
    ("resnet18", "contiguous", "unfolded"), ("resnet50", "channels_last", "fused")])
def test_evaluator_with_fold_equals_naive_on_resnet_blocks(arch, layout, glue):
    """End to end: block variants of a ResNet through the Evaluator, fanned (fold form, fused
    BN -> add -> ReLU), equal the naive loop's counts (at most one flip on a near-tie)."""
    torch.manual_seed(0)
    model = _resnet(arch, 8)
    _perturb(model)
    variants = []
    for i, p in enumerate(("layer1.0.", "layer2.0.", "layer4.1.")):
        variants += _draws(model, (p,), 2, seed=i)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(70, 3, 8, 8, generator=g), torch.randint(0, 10, (70,), generator=g)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 70, 32)]
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True,
                    batch_size=32, layout=layout, glue=glue).run(batches)
    assert res.plan["fanned_variants"] == len(variants)
    naive = naive_evaluate(model, variants, lambda: batches)
    assert (res.counts[:, [0, 1, 3]] - naive[:, [0, 1, 3]]).abs().max() <= 1
    torch.testing.assert_close(res.counts[:, 2], naive[:, 2], rtol=1e-4, atol=1e-3)


def test_evaluator_fold_bf16_agrees_with_fp32():
    """bf16 (autocast) through the fold form and affine_relu: every prediction whose fp32 top-2
    margin is clear of bf16's rounding (> 5% of the logits' spread) is the same in bf16, and the
    error differs by at most 0.5 points (the issue's bound) overall."""
    torch.manual_seed(0)
    model = _resnet("resnet18", 8)
    _perturb(model)
    variants = []
    for i, p in enumerate(("layer1.0.", "layer3.0.")):
        variants += _draws(model, (p,), 2, seed=i)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(400, 3, 8, 8, generator=g), torch.randint(0, 10, (400,), generator=g)
    batches = [(x[i:i + 200], y[i:i + 200]) for i in range(0, len(x), 200)]
    logits = {}
    for prec in ("fp32", "bf16"):
        got: dict[int, list[torch.Tensor]] = {}
        res = Evaluator(model, variants, device="cpu", precision=prec, fanout=True).run(
            batches, on_logits=lambda rows, lg, got=got: [got.setdefault(r, []).append(t)
                                                         for r, t in zip(rows, lg, strict=True)])
        assert res.plan["fanned_variants"] == len(variants)
        logits[prec] = torch.stack([torch.cat(got[i]) for i in range(len(variants))])
    l32, l16 = logits["fp32"], logits["bf16"].float()
    top2 = l32.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05 * l32.std()
    assert clear.float().mean() > 0.8, "the test needs mostly clear predictions to mean anything"
    assert torch.equal(l32.argmax(-1)[clear], l16.argmax(-1)[clear])
    e32 = (l32.argmax(-1) != y).float().mean(-1)
    e16 = (l16.argmax(-1) != y).float().mean(-1)
    assert (e32 - e16).abs().max().item() <= 0.005 + 1e-12, (e32, e16)


def test_channels_last_conv_stack_is_one_copy():
    """In channels_last a conv's K weight sets are kept once, already in the layout the conv
    reads ([K·out, in, kh, kw]), not also as a [K, out, ...] stack."""
    conv = nn.Conv2d(3, 4, 3)
    per = [{"weight": torch.randn(4, 3, 3, 3)}, {}, {"weight": torch.randn(4, 3, 3, 3)}]
    st = stack_module(conv, per, channels_last=True)
    assert set(st) == {"weight4", "bias"}
    w4 = st["weight4"]
    assert w4.shape == (12, 3, 3, 3) and w4.is_contiguous(memory_format=torch.channels_last)
    want = torch.cat([per[0]["weight"], conv.weight.detach(), per[2]["weight"]])
    assert torch.equal(w4, want)
    assert torch.equal(st["bias"], conv.bias.detach().repeat(3).view(3, 4))


def test_evaluator_rejects_unknown_glue():
    from layerfast.errors import LayerfastError

    with pytest.raises(LayerfastError, match="glue must be one of fused, fold, unfolded"):
        Evaluator(nn.Linear(2, 2), [{}], device="cpu", glue="fast")

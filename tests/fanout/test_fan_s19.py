"""Fan-out refusals say why, and two torchvision patterns fan out (session 19).

1. A group the proof (`fanout.prove_fan`) refuses carries a one-line reason naming the step,
   in the plan summary (`fanout_refused`, beside `fanout_fallbacks`: run.json's engine.plan,
   `layerfast bench --json`): a slow run now says which group ran swapped and why.
2. ConvNeXt's `LayerNorm2d` (`permute(0, 2, 3, 1)`, `F.layer_norm`, `permute(0, 3, 1, 2)`)
   and ShuffleNetV2's `channel_shuffle` (`x.size()` unpacked, `view(batchsize, g, c // g, h,
   w)`, `torch.transpose(x, 1, 2)`, `.contiguous()`, `view(batchsize, -1, h, w)`) keep the
   batch in dim 0 and every sample apart, so their groups fan out; counts equal the naive
   loop's in fp32 and the model comes back bit-identical. Variants of those that would mix
   samples (a permute moving the batch dim, a transpose of dim 0, a layer_norm over every dim,
   a view whose batch entry is not the fanned batch size) are refused, with a reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanout import fan_plan, prove_fan
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate


class LayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d, verbatim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision.models.shufflenetv2.channel_shuffle (with `-1` for the channels, as the
    issue quotes it; torchvision's own passes `num_channels`, tested too)."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, -1, height, width)
    return x


class ConvNeXtish(nn.Module):
    """stem -> depthwise conv -> LayerNorm2d -> channels-last MLP (permute, Linear, GELU,
    Linear, permute back, as torchvision's CNBlock) -> residual -> LayerNorm2d -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = LayerNorm2d(8, eps=1e-6)
        self.pw1 = nn.Linear(8, 16)
        self.pw2 = nn.Linear(16, 8)
        self.head_norm = LayerNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.norm(self.dw(x))
        h = torch.permute(h, [0, 2, 3, 1])  # torchvision.ops.misc.Permute
        h = self.pw2(F.gelu(self.pw1(h)))
        x = x + h.permute(0, 3, 1, 2)
        x = self.head_norm(x)
        return self.fc(x.mean([2, 3]))


class ShuffleNetish(nn.Module):
    """stem -> two branches -> cat -> channel_shuffle -> 1x1 conv -> chunk -> shuffle -> head."""

    def __init__(self, minus_one: bool = True) -> None:
        super().__init__()
        self.minus_one = minus_one
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(16, 16, 1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:
        if self.minus_one:
            return channel_shuffle(x, 2)
        batchsize, num_channels, height, width = x.size()
        x = x.view(batchsize, 2, num_channels // 2, height, width)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(batchsize, num_channels, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat((F.relu(self.a(x)), F.relu(self.bn(self.b(x)))), dim=1)
        x = self.shuffle(x)
        x = F.relu(self.c(x))
        x1, x2 = x.chunk(2, dim=1)  # ShuffleNetV2's stride-1 block
        x = self.shuffle(torch.cat((x1, F.relu(self.d(x2))), dim=1))
        return self.fc(x.mean([2, 3]))


def _variants(model: nn.Module, mods: list[str], n: int = 3, seed: int = 1) -> list[dict]:
    """`n` fresh draws (std 2× the live weights') of each module in `mods`, one unit each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for mod in mods:
        m = model.get_submodule(mod)
        for _ in range(n):
            ov = {}
            for k, t in m.named_parameters():
                ov[f"{mod}.{k}"] = torch.randn(t.shape, generator=g) * (t.std() * 2 + 0.1)
            out.append(ov)
    return out


def _batches(n: int = 40, c: int = 1, s: int = 8, seed: int = 3) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, s, s, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[:24], y[:24]), (x[24:], y[24:])]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_fans_and_matches_naive(model: nn.Module, mods: list[str]) -> dict:
    """Every unit of `mods` fans (the plan says so, no refusal, no runtime fallback); counts
    equal the naive loop's in fp32; the model comes back bit-identical."""
    model.eval()
    variants = _variants(model, mods)
    batches = _batches()
    before = _state(model)
    ids = {k: v.data_ptr() for k, v in model.state_dict().items()}
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run(batches)
    plan = res.plan
    assert plan["fanned_variants"] == len(variants), plan
    assert plan["swapped_variants"] == 0 and plan["fanout_refused"] == {}, plan
    assert plan["fanout_fallbacks"] == {}, plan
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: v.data_ptr() for k, v in after.items()} == ids
    return plan


def test_convnext_layernorm2d_and_permuted_mlp_fan_out_and_match_naive() -> None:
    torch.manual_seed(0)
    model = ConvNeXtish()
    # dw is followed by LayerNorm2d and the permuted MLP; stem by everything
    _check_fans_and_matches_naive(model, ["stem", "dw", "pw1", "pw2"])


@pytest.mark.parametrize("minus_one", [True, False])
def test_shufflenet_channel_shuffle_and_chunk_fan_out_and_match_naive(minus_one: bool) -> None:
    torch.manual_seed(0)
    model = ShuffleNetish(minus_one)
    with torch.no_grad():  # BN statistics other than 0 / 1
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    _check_fans_and_matches_naive(model, ["stem", "a", "b", "c", "d"])


def test_torchvision_convnext_and_shufflenet_units_fan() -> None:
    """The real torchvision definitions: every conv/linear unit's group is proven fannable.
    ConvNeXt's CNBlock owns `layer_scale`, read as a tensor (`get_attr`): that unit is
    refused, with a reason naming the read."""
    tv = pytest.importorskip("torchvision")
    for build in (tv.models.convnext_tiny, tv.models.shufflenet_v2_x0_5):
        torch.manual_seed(0)
        model = build(num_classes=10).eval()
        prog = Program(model)
        assert prog.traced, prog.trace_error
        refused = {}
        for name, m in model.named_modules():
            if not isinstance(m, nn.Conv2d | nn.Linear):
                continue
            keys = {f"{name}.{k}" for k, _ in m.named_parameters(recurse=False)}
            got = prove_fan(prog, prog.start_cut(keys), keys)
            if isinstance(got, str):
                refused[name] = got
        assert not refused, (build.__name__, refused)
        if build is tv.models.convnext_tiny:
            keys = {"features.1.0.layer_scale"}
            why = prove_fan(prog, prog.start_cut(keys), keys)
            assert isinstance(why, str) and "layer_scale" in why and "as a tensor" in why, why


@pytest.mark.parametrize(
    ("build", "mods"),
    [
        ("convnext_tiny", ["features.0.0", "features.1.0.block.0", "features.1.2.block.3",
                           "features.2.1", "features.5.1.block.5"]),
        ("shufflenet_v2_x0_5", ["conv1.0", "stage2.1.branch2.0", "stage3.0.branch1.2",
                                "stage4.3.branch2.5"]),
    ],
)
def test_torchvision_models_count_as_the_naive_loop_when_fanned(build: str, mods: list[str]) -> None:
    """convnext_tiny and shufflenet_v2_x0_5 at 32×32, units at the stem, inside blocks and
    after a downsampling LayerNorm2d, fanned on the CPU: counts equal the naive loop's."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, build)(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    variants = _variants(model, mods, n=2)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
    batches = [(x, y)]
    before = _state(model)
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run(batches)
    assert res.plan["fanned_variants"] == len(variants), res.plan
    assert res.plan["fanout_fallbacks"] == {} == res.plan["fanout_refused"], res.plan
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- what must still be refused, and with a reason -----------------------------------------


class Mixer(nn.Module):
    """conv -> `how` -> head; every `how` here moves or mixes the batch dim."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.how == "permute-batch":  # batch moved to dim 1
            h = h.permute(1, 0, 2, 3).permute(1, 0, 2, 3)
        elif self.how == "transpose-0":
            h = torch.transpose(h, 0, 1).transpose(0, 1)
        elif self.how == "t-method":  # [B, C] -> [C, B] -> [B, C]: not proven
            return self.fc(h.mean([2, 3]).t().t())
        elif self.how == "view-constant":  # the batch entry is a number: K·B rows meet
            b = 6
            h = h.view(b, -1).view(b, 4, 8, 8)
        elif self.how == "size0-arith":  # the batch size in arithmetic (K·B there)
            batchsize, c, hh, ww = h.size()
            h = h * (1.0 / batchsize)
        return self.fc(h.mean([2, 3]))


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("permute-batch", "permute"),
        ("transpose-0", "transpose"),
        ("t-method", ".t()"),
        ("view-constant", "view"),
        ("size0-arith", "size"),
    ],
)
def test_mixing_patterns_are_refused_with_a_reason(how: str, words: str) -> None:
    torch.manual_seed(0)
    model = Mixer(how).eval()
    prog = Program(model)
    keys = {"conv.weight", "conv.bias"}
    start = prog.start_cut(keys)
    why = prove_fan(prog, start, keys)
    assert isinstance(why, str) and words in why, why
    assert fan_plan(prog, start, keys) is None
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    variants = _variants(model, ["conv"])
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run([(x, y)])
    assert res.plan["fanned_variants"] == 0, res.plan
    (reason,) = res.plan["fanout_refused"].values()
    assert "conv" in reason and words in reason, reason
    want = naive_evaluate(model, variants, lambda: [(x, y)])
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])


def test_layer_norm_over_every_dim_falls_back_at_run_time() -> None:
    """`F.layer_norm`'s normalized_shape covers the last dims; as long as the value's rank it
    covers the batch dim too. Known only when it runs: the group takes the swap path, and
    `fanout_fallbacks` says the dim was the batch dim."""

    class AllDims(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x).sum(1)  # [B]
            h = F.layer_norm(h, (6,))  # normalises over the batch: mixes samples
            return self.fc(x) + h[:, None]

    torch.manual_seed(0)
    model = AllDims().eval()
    x, y = torch.randn(6, 4), torch.randint(0, 10, (6,))
    variants = _variants(model, ["lin"])
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run([(x, y)])
    assert res.plan["fanned_variants"] == 0, res.plan
    (why,) = res.plan["fanout_fallbacks"].values()
    assert "batch dim" in why, why
    want = naive_evaluate(model, variants, lambda: [(x, y)])
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])


def test_refusal_reason_in_run_json_engine_plan_and_bench_table(tmp_path) -> None:
    """The reason travels where `fanout_fallbacks` does: the plan summary (run.json's
    engine.plan, `bench --json`'s layerfast_plan) and scripts/bench_table.py's lines."""
    import importlib.util
    from pathlib import Path

    torch.manual_seed(0)
    model = Mixer("permute-batch").eval()
    variants = _variants(model, ["conv"])
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    ev = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True)
    plan = ev.run([(x, y)]).plan
    assert plan["fanout_refused"] and ev.last_plan.summary()["fanout_refused"] == plan[
        "fanout_refused"]
    spec = importlib.util.spec_from_file_location(
        "bench_table", Path(__file__).parents[2] / "scripts" / "bench_table.py")
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    d = {"seconds": {"naive": 1.0, "layerfast": 0.5}, "variants": 3,
         "speedup_vs_naive": {"layerfast": 2.0}, "floor": {"seconds_measured_rate": 0.1},
         "times_floor": {"layerfast": 5.0}, "layerfast_plan": {**plan, "batch_size": 6}}
    lines = "\n".join(bt.rows(d, "case"))
    assert "FAN-OUT REFUSED" in lines and "permute" in lines, lines


def test_fanout_off_records_no_refusals() -> None:
    torch.manual_seed(0)
    model = Mixer("permute-batch").eval()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    res = Evaluator(model, _variants(model, ["conv"]), device="cpu", precision="fp32",
                    fanout=False).run([(x, y)])
    assert res.plan["fanout_refused"] == {}


class TokenView(nn.Module):
    """A parameter viewed with the conv output's batch size: [B, 24] in eager mode; fanned,
    `h.size(0)` is K·B and the view [K·B, 96 / (K·B)] puts other numbers in every row."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.tok = nn.Parameter(torch.randn(96))
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        t = self.tok.view(h.size(0), -1)
        return self.fc(h.mean([2, 3]) + 10 * t[:, :4])


def test_a_parameter_viewed_with_the_fanned_batch_size_is_not_fanned() -> None:
    torch.manual_seed(0)
    model = TokenView().eval()
    variants = _variants(model, ["conv"])
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run([(x, y)])
    assert res.plan["fanned_variants"] == 0, res.plan
    assert "view" in next(iter(res.plan["fanout_refused"].values()))
    want = naive_evaluate(model, variants, lambda: [(x, y)])
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5)

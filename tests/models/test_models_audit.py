"""Audit of the model zoo and re-randomization against the paper's meaning.

Re-randomization (Zhang, Bengio & Singer) is a fresh draw from the distribution the model was
*initialized* from. These tests compare, tensor by tensor, what `make_variants` draws (the real
code path) with the θ⁰ the registered constructors (and so `layerfast train`) produce, and with
the closed-form init of each rule; they pin the seed mechanism (CPU generator, hash of seed,
unit and module), the unit lists of the paper's architectures, and the warning when the
checkpoints' θ⁰ was not drawn from the rule layerfast re-randomizes with.

Every statistical check uses fixed seeds, so its outcome is deterministic; the bands are wide
enough for a correct rule (KS z < 2.5; from 4096 elements, std within 7% of θ⁰'s and 5% of
the rule's) and narrow enough
that the wrong rules tested in `test_the_distribution_check_rejects_wrong_rules` fail.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.models import build_model
from layerfast.models.init import resnet_init
from layerfast.units import make_units
from layerfast.variants import derive_seed, init_mismatches, make_variants, rerandom_draw

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {
    "fcn3x256": (1, 28, 28),
    "vgg11_cifar": (3, 32, 32),
    "vgg11_bn_cifar": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet18_cifar": (3, 32, 32),
    "resnet18": (3, 64, 64),
    "resnet50": (3, 64, 64),
}


def ks_z(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic scaled by sqrt(nm/(n+m)) (~ Kolmogorov law)."""
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    both = np.concatenate([a, b])
    d = np.abs(
        np.searchsorted(a, both, side="right") / a.size
        - np.searchsorted(b, both, side="right") / b.size
    ).max()
    return float(d * math.sqrt(a.size * b.size / (a.size + b.size)))


def same_distribution(draw: torch.Tensor, theta0: torch.Tensor) -> str | None:
    """None when `draw` looks like another sample of θ⁰'s distribution, else why not."""
    a, b = draw.double().numpy().ravel(), theta0.double().numpy().ravel()
    if b.min() == b.max():  # a deterministic rule: the draw is the same constant
        return None if (a.min() == a.max() and a[0] == b[0]) else f"constant {b[0]} vs draw"
    if a.size < 64:
        return None
    z = ks_z(a, b)
    if z > 2.5:
        return f"KS z {z:.2f}"
    if a.size >= 4096 and not 0.93 < a.std() / b.std() < 1.07:  # 4.5 sigma of the ratio
        return f"std {a.std():.4g} vs {b.std():.4g}"
    return None


def expected_std(arch: str, name: str, module: nn.Module, key: str) -> float | None:
    """The closed-form std of each registered rule (None for constant or norm tensors)."""
    if isinstance(module, nn.Conv2d):
        if key.endswith("bias"):
            return None  # zero in the VGG rule, checked as a constant
        fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
        return math.sqrt(2.0 / fan_out)  # kaiming_normal_, fan_out, relu
    if isinstance(module, nn.Linear):
        if arch.startswith("vgg"):
            return None if key.endswith("bias") else 0.01
        return 1.0 / math.sqrt(3 * module.in_features)  # PyTorch default: U(±1/sqrt(fan_in))
    return None


@pytest.mark.parametrize("arch", list(SHAPES))
def test_rerandom_draws_from_the_constructors_init(arch: str) -> None:
    torch.manual_seed(0)
    model, spec = build_model(arch, 10, SHAPES[arch])
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    units = make_units(model, "layer", arch=spec)
    modules = dict(model.named_modules())
    bad, checked = [], 0
    for v in make_variants(model, units, None, spec, reset="rerandom", seeds=[1]):
        for key, t in v.overrides().items():
            why = same_distribution(t, theta0[key])
            if why:
                bad.append(f"{key}: {why}")
            mod_name, _, leaf = key.rpartition(".")
            std = expected_std(arch, mod_name, modules[mod_name], leaf)
            if std is not None and t.numel() >= 4096:  # 5% is 4.5 sigma of a sample std
                for what, x in (("draw", t), ("theta0", theta0[key])):
                    if not 0.95 < float(x.std()) / std < 1.05:
                        bad.append(f"{key}: {what} std {float(x.std()):.4g}, rule {std:.4g}")
                checked += 1
            if leaf in ("running_mean", "running_var") or isinstance(
                modules[mod_name], nn.BatchNorm2d
            ):
                want = 1.0 if leaf in ("weight", "running_var") else 0.0
                assert bool((t == want).all()), f"{key} is not reset to {want}"
    assert not bad, bad
    assert checked >= 3


def test_the_distribution_check_rejects_wrong_rules() -> None:
    """The checks above can fail: fan_in for fan_out (a 2x-wide conv), uniform for normal at the
    same std, a factor 2 in std, PyTorch's default conv init for torchvision's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3)  # 73,728 weights
    resnet_init(conv)
    theta0 = conv.weight.detach().clone()
    std = math.sqrt(2 / (128 * 9))
    wrong = {
        "fan_in": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
        "uniform": lambda w: nn.init.uniform_(w, -std * math.sqrt(3), std * math.sqrt(3)),
        "2x std": lambda w: nn.init.normal_(w, 0, 2 * std),
        "default": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    }
    torch.manual_seed(1)
    right = conv.weight.detach().clone()
    resnet_init(conv)
    assert same_distribution(conv.weight.detach(), theta0) is None
    for name, rule in wrong.items():
        w = right.clone()
        rule(w)
        assert same_distribution(w, theta0) is not None, name
        assert init_mismatches({"w": w}, {"w": theta0}) or name == "uniform", name


def test_seeds_give_reproducible_distinct_device_independent_draws() -> None:
    torch.manual_seed(0)
    model, spec = build_model("resnet20", 10, (3, 32, 32))
    units = {u.name: u for u in make_units(model, "layer", arch=spec)}
    u = units["layer2.0.conv1"]
    one = rerandom_draw(model, u, 1, spec)
    torch.manual_seed(12345)  # the caller's RNG state plays no part
    again = rerandom_draw(model, u, 1, spec)
    other = rerandom_draw(model, u, 2, spec)
    for k in u.keys:
        assert torch.equal(one[k], again[k])
    assert not torch.equal(one["layer2.0.conv1.weight"], other["layer2.0.conv1.weight"])
    # The mechanism: the CPU generator seeded by the hash of (seed, unit, module), the rule
    # applied to a CPU copy; nothing depends on the model's device, or on any CUDA generator.
    w = torch.empty_like(one["layer2.0.conv1.weight"])
    gen = torch.Generator().manual_seed(derive_seed("layerfast-rerandom", 1, u.name, u.modules[0]))
    conv = nn.Conv2d(16, 32, 3, 2, 1, bias=False)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.set_state(gen.get_state())
        resnet_init(conv)
    w.copy_(conv.weight.detach())
    assert torch.equal(w, one["layer2.0.conv1.weight"])


def test_a_draw_does_not_depend_on_the_rest_of_the_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, spec = build_model("resnet20", 10, (3, 32, 32))
    torch.save(model.state_dict(), tmp_path / "epoch_000.pt")
    torch.save(model.state_dict(), tmp_path / "epoch_002.pt")
    ck = CheckpointDir(tmp_path)
    units = make_units(model, "layer", arch=spec)

    def draws(us, **kw):
        vs = make_variants(model, us, ck, spec, **kw)
        return {(v.unit, v.seed): v.overrides() for v in vs if v.kind == "rerandom"}

    full = draws(units, reset="reinit,rerandom,fullmodel", seeds=[1, 2, 3])
    alone = draws(list(reversed(units))[:3], reset="rerandom", seeds=[3, 1])
    assert alone
    for key, d in alone.items():
        for k in d:
            assert torch.equal(d[k], full[key][k]), (key, k)


def test_same_seed_same_shape_units_are_not_correlated() -> None:
    torch.manual_seed(0)
    model, spec = build_model("resnet20", 10, (3, 32, 32))
    units = {u.name: u for u in make_units(model, "layer", arch=spec)}
    a = rerandom_draw(model, units["layer3.1.conv1"], 1, spec)["layer3.1.conv1.weight"]
    b = rerandom_draw(model, units["layer3.2.conv1"], 1, spec)["layer3.2.conv1.weight"]
    assert a.shape == b.shape
    r = float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])
    assert abs(r) < 4 / math.sqrt(a.numel()), r  # 4 sigma of the null correlation


def test_paper_unit_lists() -> None:
    torch.manual_seed(0)
    model, spec = build_model("resnet50", 1000, (3, 64, 64))
    blocks = make_units(model, "block", arch=spec)
    assert [u.name for u in blocks] == ["stem"] + [
        f"layer{s}.{b}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=True) for b in range(n)
    ] + ["fc"]
    assert len(make_units(model, "layer", arch=spec)) == 54
    every = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    for bn in ("with-layer", "separate"):
        for g in ("layer", "block", "stage"):
            keys = [k for u in make_units(model, g, bn=bn, arch=spec) for k in u.keys]
            assert len(keys) == len(set(keys)) and set(keys) == every, (g, bn)
    kept = [k for u in make_units(model, "block", bn="keep", arch=spec) for k in u.keys]
    assert not any(".bn" in k or "downsample.1" in k or k.startswith("bn1") for k in kept)
    stem = blocks[0]
    assert stem.keys == ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                         "bn1.running_var")  # fmt: skip
    vgg, vspec = build_model("vgg11_bn_cifar", 10, (3, 32, 32))
    units = make_units(vgg, "layer", arch=vspec)
    convs = [u for u in units if u.name.startswith("features")]
    assert (len(convs), len(units)) == (8, 11)
    assert all(any("running_var" in k for k in u.keys) for u in convs)


def test_parameter_counts_and_fcn_shape() -> None:
    fcn, _ = build_model("fcn3x256", 10, (1, 28, 28))
    shapes = [tuple(p.shape) for p in fcn.parameters()]
    assert shapes == [(256, 784), (256,), (256, 256), (256,), (256, 256), (256,), (10, 256), (10,)]
    assert [type(m).__name__ for m in fcn] == ["Flatten"] + ["Linear", "ReLU"] * 3 + ["Linear"]
    count = {a: sum(p.numel() for p in build_model(a, 10, (3, 32, 32))[0].parameters())
             for a in ("resnet20", "vgg11_cifar", "resnet18_cifar")}  # fmt: skip
    # ResNet-20 with option-B shortcuts (two 1x1 conv + BN projections); option A is 269,722
    assert count == {"resnet20": 272_474, "vgg11_cifar": 9_750_922, "resnet18_cifar": 11_173_962}


# ------------------------------------------------------------- θ⁰ drawn from another rule


class Kaiming(nn.Sequential):
    """A user model whose constructor applies its own init (what reset_parameters() is not)."""

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)


def _run(tmp_path: Path, model: nn.Module, spec, granularity: str = "layer") -> None:
    torch.save(model.state_dict(), tmp_path / "epoch_000.pt")
    torch.save(model.state_dict(), tmp_path / "epoch_001.pt")
    units = make_units(model, granularity, arch=spec)
    make_variants(model, units, CheckpointDir(tmp_path), spec, reset="rerandom", seeds=[1])


def test_a_theta0_from_another_init_is_a_warning(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    _run(tmp_path, Kaiming(), None)
    err = capsys.readouterr().err
    assert "layerfast: warning: re-randomization draws from each module's reset_parameters()" in err
    assert "1.weight" in err and "1.bias: θ⁰ is all 0" in err


def test_the_init_warning_is_collected_for_run_json(tmp_path: Path, capsys) -> None:
    """analyze() keeps what `warn` says in run.json's "warnings": the init check's message
    arrives there whole, once per enclosing collector, and not after the block ends."""
    from layerfast.errors import collect_warnings, warn

    torch.manual_seed(0)
    with collect_warnings() as outer:
        with collect_warnings() as inner:
            _run(tmp_path, Kaiming(), None)
        warn("after the inner block")
    err = capsys.readouterr().err
    assert len(inner) == 1 and inner[0].startswith("re-randomization draws from")
    assert f"layerfast: warning: {inner[0]}\n" in err
    assert outer == [inner[0], "after the inner block"]


def test_zero_init_residual_theta0_is_a_warning(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model, spec = build_model("resnet20", 10, (3, 32, 32))
    with torch.no_grad():  # timm's zero_init_last / torchvision's zero_init_residual=True
        for name, m in model.named_modules():
            if name.endswith("bn2"):
                m.weight.zero_()
    _run(tmp_path, model, spec, "block")
    err = capsys.readouterr().err
    assert "layer1.0.bn2.weight: θ⁰ is all 0, the draw all 1" in err


@pytest.mark.parametrize("arch", ["fcn3x256", "vgg11_bn_cifar", "resnet20"])
def test_registered_theta0_gives_no_warning(arch: str, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model, spec = build_model(arch, 10, SHAPES[arch])
    _run(tmp_path, model, spec)
    assert capsys.readouterr().err == ""


def test_init_check_survives_a_constant_prefix() -> None:
    """θ⁰ (or the draw) whose first `_CHECK_SAMPLE` elements are one constant but which is not
    constant as a whole (a zero-initialized first block of rows) has no spread in the prefix: the
    check divided by it (ZeroDivisionError in make_variants). It now compares the whole tensors:
    the same rule gives no line, an all-random draw against it one."""
    torch.manual_seed(0)
    block = torch.zeros(300, 300)  # 90,000 elements, the first 75,000 zero
    block[250:] = torch.randn(50, 300)
    same = torch.zeros(300, 300)
    same[250:] = torch.randn(50, 300)
    assert init_mismatches({"w": same}, {"w": block}) == []
    assert init_mismatches({"w": block}, {"w": same}) == []
    lines = init_mismatches({"w": torch.randn(300, 300)}, {"w": block})
    assert len(lines) == 1 and lines[0].startswith("w: draw mean"), lines


def test_analyze_rerandomizes_a_registered_arch_with_its_own_rule(tmp_path: Path, monkeypatch):
    """End to end: `analyze` must hand the arch's init rule to `make_variants`. Every test
    above calls `make_variants` with the spec itself, and the analyses run end to end used
    fcn3x256 or user models, whose rule is `reset_parameters()`: passing `None` there (PyTorch's
    default conv init, std 1/sqrt(3·fan_in), not torchvision's sqrt(2/fan_out)) passed them all."""
    import layerfast
    import layerfast.engine as engine

    torch.manual_seed(0)
    model, spec = build_model("resnet20", 10, (3, 32, 32))
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(model.state_dict(), ck / "epoch_000.pt")
    torch.save({k: v + 0.01 if v.is_floating_point() else v
                for k, v in model.state_dict().items()}, ck / "epoch_001.pt")
    seen = []
    real = engine.Evaluator

    def keep(model, variants, **kw):
        seen.extend(variants)
        return real(model, variants, **kw)

    monkeypatch.setattr(engine, "Evaluator", keep)
    layerfast.analyze("resnet20", ck, data="synthetic:cifar:16", reset="rerandom", seeds=1,
                      out=tmp_path / "run", device="cpu", progress=False, figures=False,
                      checkpoint_every=0)
    drawn = {v.unit: v.overrides() for v in seen if v.kind == "rerandom"}
    fresh, _ = build_model("resnet20", 10, (3, 32, 32))
    units = make_units(fresh, "layer", arch=spec)
    want = {v.unit: v.overrides() for v in make_variants(fresh, units, None, spec,
                                                         reset="rerandom", seeds=[1])
            if v.kind == "rerandom"}
    assert drawn.keys() == want.keys() and len(drawn) >= 20  # one row per unit
    for unit, tensors in drawn.items():
        assert tensors.keys() == want[unit].keys(), unit
        assert all(torch.equal(t, want[unit][k]) for k, t in tensors.items()), unit
    conv = next(k for k in drawn["layer3.2.conv2"] if k.endswith("weight"))
    std = float(drawn["layer3.2.conv2"][conv].std())  # 64x64x3x3: fan_out = 576
    assert 0.95 < std / math.sqrt(2 / 576) < 1.05, std

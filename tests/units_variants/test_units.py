"""Units: granularities, BN policies (graph pairing and the untraceable fallback), patterns."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx
from torch import nn

from layerfast.errors import LayerfastError
from layerfast.models import ARCHS, build_model
from layerfast.units import (
    BN_POLICIES,
    GRANULARITIES,
    Unit,
    bn_feeders,
    make_units,
    split_patterns,
)


@functools.cache
def _model(name: str, in_shape: tuple[int, int, int] = (3, 32, 32)):
    torch.manual_seed(0)
    return build_model(name, 10, in_shape)


def _names(units: list[Unit]) -> list[str]:
    return [u.name for u in units]


def _by_name(units: list[Unit]) -> dict[str, Unit]:
    return {u.name: u for u in units}


# --------------------------------------------------------------------------- ResNet-50

RESNET50_BLOCKS = (
    ["stem"]
    + [f"layer{s}.{b}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=True) for b in range(n)]
    + ["fc"]
)


def test_resnet50_block_units_are_the_papers() -> None:
    model, spec = _model("resnet50")
    units = make_units(model, "block", arch=spec)
    assert len(units) == 18 and _names(units) == RESNET50_BLOCKS
    stem = units[0]
    assert stem.modules == ("conv1", "bn1")
    assert stem.keys == ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var")  # fmt: skip
    first = _by_name(units)["layer1.0"]
    assert "layer1.0.downsample.0" in first.modules and "layer1.0.downsample.1" in first.modules
    assert _by_name(units)["fc"].keys == ("fc.weight", "fc.bias")


def test_resnet50_stage_units() -> None:
    model, spec = _model("resnet50")
    units = make_units(model, "stage", arch=spec)
    assert _names(units) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert sum(m.endswith("conv1") for m in _by_name(units)["layer3"].modules) == 6


def test_resnet50_layer_units() -> None:
    model, spec = _model("resnet50")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53
    units = make_units(model, arch=spec)
    assert len(units) == 54 and _names(units) == convs + ["fc"]
    assert _names(units)[:4] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_with_layer_units_partition_the_state(granularity: str) -> None:
    """Every parameter and running statistic is reset by exactly one unit; never the counter."""
    model, spec = _model("resnet50")
    keys = [k for u in make_units(model, granularity, arch=spec) for k in u.keys]
    expected = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert sorted(keys) == sorted(expected)


def test_keep_and_separate_on_resnet50_blocks() -> None:
    model, spec = _model("resnet50")
    kept = make_units(model, "block", bn="keep", arch=spec)
    assert _names(kept) == RESNET50_BLOCKS
    assert not any("bn" in k or "downsample.1" in k for u in kept for k in u.keys)
    sep = make_units(model, "block", bn="separate", arch=spec)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(sep) == 18 + 53 and len(bns) == 53
    assert _names(sep)[:4] == ["stem", "bn1", "layer1.0", "layer1.0.bn1"]
    assert _by_name(sep)["stem"].modules == ("conv1",)
    assert _by_name(sep)["layer1.0.downsample.1"].keys[-1] == "layer1.0.downsample.1.running_var"


# --------------------------------------------------------------------------- BN pairing


def test_resnet_bn_feeders_from_the_graph() -> None:
    model, _ = _model("resnet18")
    feeders = bn_feeders(model)
    assert feeders["bn1"] == "conv1"
    assert feeders["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    assert feeders["layer4.1.bn2"] == "layer4.1.conv2"
    assert len(feeders) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_resnet_layer_units_carry_their_bn() -> None:
    model, spec = _model("resnet18")
    units = _by_name(make_units(model, arch=spec))
    assert units["conv1"].modules == ("conv1", "bn1")
    down = units["layer2.0.downsample.0"]
    assert down.modules == ("layer2.0.downsample.0", "layer2.0.downsample.1")
    assert "layer2.0.downsample.1.running_mean" in down.keys
    assert not any(k.endswith("num_batches_tracked") for k in down.keys)
    assert "bn1" not in units  # fed BNs are never units of their own under with-layer


def test_keep_and_separate_layer_units() -> None:
    model, spec = _model("resnet18")
    kept = make_units(model, bn="keep", arch=spec)
    assert _by_name(kept)["conv1"] == Unit("conv1", ("conv1",), ("conv1.weight",), bn="keep")
    sep = make_units(model, bn="separate", arch=spec)
    assert _names(sep)[:4] == ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1"]
    assert _by_name(sep)["bn1"].keys == ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var")  # fmt: skip
    assert len(sep) == len(kept) + sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the fallback rule applies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)  # right after conv, same parent, 8 == 8: paired
        self.act = nn.ReLU()
        self.bn_after_relu = nn.BatchNorm2d(8)  # preceded by the ReLU: not paired
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_wrong_width = nn.BatchNorm2d(4)  # follows conv2 but 4 != 8: not paired
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.BatchNorm1d(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        if x.sum() > 0:  # data-dependent branch
            x = self.bn_after_relu(x)
        x = self.conv2(x)
        return self.head(x)


def test_fallback_pairing_for_untraceable_models() -> None:
    model = Untraceable()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    assert bn_feeders(model) == {"bn": "conv", "head.2": "head.1"}
    units = _by_name(make_units(model))
    assert units["conv"].modules == ("conv", "bn")
    assert units["head.1"].modules == ("head.1", "head.2")
    # unfed normalization layers are reset on their own rather than never
    assert units["bn_after_relu"].modules == ("bn_after_relu",)
    assert units["bn_wrong_width"].modules == ("bn_wrong_width",)
    assert _names(make_units(model, bn="keep")) == ["conv", "conv2", "head.1"]


class SplitParents(nn.Module):
    """Conv and BN in different parents, and a BN fed through a ReLU: only the graph knows."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 1))
        self.b = nn.Sequential(nn.BatchNorm2d(8))
        self.c = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()
        self.d = nn.BatchNorm2d(8)  # follows c in named_modules order, but fed by the ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.relu(self.c(self.b(self.a(x)))))


def test_graph_pairing_beats_the_sibling_rule() -> None:
    model = SplitParents()
    assert bn_feeders(model) == {"b.0": "a.0"}
    units = _by_name(make_units(model))
    assert units["a.0"].modules == ("a.0", "b.0") and units["c"].modules == ("c",)
    assert units["d"].modules == ("d",)


def test_conv_subclasses_count_as_feeders() -> None:
    class MyConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(x, self.weight * 1.0, self.bias, padding=1)

    model = nn.Sequential(MyConv(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4))
    assert bn_feeders(model) == {}  # an Identity in between is "something else"
    model = nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4))
    assert bn_feeders(model) == {"1": "0"}


# --------------------------------------------------------------------------- other archs


def test_fcn3x256_units() -> None:
    model, spec = _model("fcn3x256", (1, 28, 28))
    for granularity in GRANULARITIES:  # no blocks of its own: top-level children
        units = make_units(model, granularity, arch=spec)
        assert _names(units) == ["fc1", "fc2", "fc3", "fc4"]
    assert units[0].keys == ("fc1.weight", "fc1.bias")


def test_vgg_units() -> None:
    model, spec = _model("vgg11_bn_cifar")
    layers = make_units(model, arch=spec)
    assert len(layers) == 8 + 3 and _names(layers)[-3:] == ["classifier.0", "classifier.2", "classifier.4"]  # fmt: skip
    assert layers[0].modules == ("features.0", "features.1")
    assert make_units(model, "block", arch=spec) == layers
    stages = make_units(model, "stage", arch=spec)
    assert _names(stages) == ["stage1", "stage2", "stage3", "stage4", "stage5", "classifier"]
    sizes = [sum(isinstance(model.get_submodule(m), nn.Conv2d) for m in u.modules) for u in stages]
    assert sizes == [1, 1, 2, 2, 2, 0]


def test_resnet20_units() -> None:
    model, spec = _model("resnet20")
    assert len(make_units(model, arch=spec)) == 19 + 2 + 1  # convs + 2 shortcuts + fc
    assert len(make_units(model, "block", arch=spec)) == 1 + 9 + 1
    assert _names(make_units(model, "stage", arch=spec)) == ["stem", "layer1", "layer2", "layer3", "fc"]  # fmt: skip


@pytest.mark.parametrize("name", sorted(set(ARCHS) - {"resnet101", "resnet152", "resnet110"}))
@pytest.mark.parametrize("bn", BN_POLICIES)
def test_unit_invariants_for_every_arch(name: str, bn: str) -> None:
    model, spec = _model(name)
    sd = model.state_dict()
    for granularity in GRANULARITIES:
        units = make_units(model, granularity, bn=bn, arch=spec)
        assert len(set(_names(units))) == len(units)
        for u in units:
            assert u.keys and set(u.keys) <= set(sd) and u.modules
            assert not any(k.endswith("num_batches_tracked") for k in u.keys)
            if bn == "keep":
                assert not any("running" in k for k in u.keys)


# --------------------------------------------------------------------------- user models


def test_user_model_blocks_fall_back_to_top_level_children() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4)
    )
    for granularity in ("block", "stage"):
        units = make_units(model, granularity)
        assert [(u.name, u.modules) for u in units] == [("0", ("0", "1")), ("4", ("4",))]
    assert _names(make_units(model, "block", bn="separate")) == ["0", "1", "4"]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.body = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) * self.scale

    units = make_units(Net(), "block")
    assert [(u.name, u.keys) for u in units] == [
        ("(root)", ("scale",)), ("body", ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"))
    ]  # fmt: skip


# --------------------------------------------------------------------------- patterns


def test_glob_and_regex_patterns() -> None:
    model, spec = _model("resnet18")
    units = make_units(model, patterns=["layer1.*", "re:^fc$", "layer2.0"], arch=spec)
    assert _names(units) == ["layer1.*", "re:^fc$", "layer2.0"]
    layer1 = units[0]
    assert all(m.startswith("layer1.") for m in layer1.modules) and len(layer1.modules) == 8
    assert "layer1.1.bn2.running_var" in layer1.keys
    assert units[1].modules == ("fc",)
    assert "layer2.0.downsample.1" in units[2].modules  # a block name selects the whole block


def test_joint_pattern_and_comma_string() -> None:
    model, spec = _model("resnet18")
    (joint,) = make_units(model, patterns="re:^(conv1|fc)$", arch=spec)
    assert joint.modules == ("conv1", "bn1", "fc")  # conv1's BN joins it (with-layer)
    assert _names(make_units(model, patterns="fc,conv1")) == ["fc", "conv1"]


def test_pattern_bn_policies() -> None:
    model, _ = _model("resnet18")
    kept = make_units(model, patterns=["layer1.0"], bn="keep")
    assert kept[0].modules == ("layer1.0.conv1", "layer1.0.conv2")
    sep = make_units(model, patterns=["layer1.0"], bn="separate")
    assert _names(sep) == ["layer1.0", "layer1.0.bn1", "layer1.0.bn2"]
    with pytest.raises(LayerfastError, match="only normalization layers"):
        make_units(model, patterns=["re:bn"], bn="keep")


@pytest.mark.parametrize(
    ("patterns", "fragment"),
    [
        (["layer9.*"], "'layer9.*' matches no module"),
        (["fc", "re:^nope$"], "'re:^nope$' matches no module"),
        (["re:("], "bad regex"),
        (["re:a{99999999999}"], "bad regex"),  # OverflowError inside re
        (["fc", ""], "empty unit pattern"),
        ([], "at least one pattern"),
    ],
)
def test_bad_patterns(patterns: list[str], fragment: str) -> None:
    model, _ = _model("resnet18")
    with pytest.raises(LayerfastError) as exc:
        make_units(model, patterns=patterns)
    assert fragment in str(exc.value)


@pytest.mark.parametrize("pattern", ["fc(1|2)", "^layer1$", "layer9.*"])
def test_unmatched_glob_says_regexes_need_re_prefix(pattern: str) -> None:
    """A regex typed without `re:` is read as a glob and matches nothing; the error says how to
    write a regex, and still shows what module names look like."""
    model, _ = _model("resnet18")
    with pytest.raises(LayerfastError) as exc:
        make_units(model, patterns=[pattern])
    msg = str(exc.value)
    assert f"for a regex write 're:{pattern}'" in msg and "conv1, bn1, layer1.0.conv1" in msg
    with pytest.raises(LayerfastError) as exc:
        make_units(model, patterns=["re:^nope$"])
    assert "for a regex" not in str(exc.value)  # it already is one


def test_commas_inside_brackets_do_not_split_patterns() -> None:
    model, spec = _model("resnet18")
    assert split_patterns(" re:^layer[12]\\.0\\.conv{1,2}$ , fc,,[cf][oc]*") == [
        "re:^layer[12]\\.0\\.conv{1,2}$", "fc", "[cf][oc]*"]
    units = make_units(model, patterns="re:^layer1\\.0\\.conv[1,2]$,fc", arch=spec)
    assert _names(units) == ["re:^layer1\\.0\\.conv[1,2]$", "fc"]
    assert units[0].modules == ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"granularity": "blocks"}, "unknown granularity 'blocks'"),
        ({"bn": "with_layer"}, "unknown BN policy 'with_layer'"),
        ({"granularity": "block", "patterns": ["fc"]}, "replace the granularity"),
    ],
)
def test_bad_options(kwargs: dict, fragment: str) -> None:
    model, _ = _model("fcn3x256", (1, 8, 8))
    with pytest.raises(LayerfastError) as exc:
        make_units(model, **kwargs)
    assert fragment in str(exc.value)


def test_model_without_parameters() -> None:
    with pytest.raises(LayerfastError, match="no parameters"):
        make_units(nn.Sequential(nn.ReLU()))

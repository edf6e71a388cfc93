"""Audit of `layerfast.units`: which units are made and which state-dict keys each one resets.

Each test pins a defect found by building real and hand-made models (see the report in the
commit message): parametrized layers, a normalization layer shared by two feeders, parameters
registered on the model itself, modules registered under two names, and the error for a
pattern naming a module that owns nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.errors import LayerfastError
from layerfast.models import build_model
from layerfast.units import ROOT, bn_feeders, make_units


def _by_name(units):
    return {u.name: u for u in units}


# --------------------------------------------------------------------------- parametrizations


def _weight_normed() -> nn.Module:
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    lin = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 2, bias=False))
    return nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), lin)


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_a_parametrized_layer_keeps_its_weight(granularity: str) -> None:
    """`weight_norm`/`spectral_norm` (torch.nn.utils.parametrizations) move a layer's weight to
    `<layer>.parametrizations.weight.original*`. The layer's unit must still reset it: before,
    unit `0` held only `0.bias` (+ its BN), so `reinit 0` left the conv's weight at the final
    model, and `0.parametrizations.weight` became a unit of its own; a bias-free parametrized
    Linear was no unit at all but for that stray one."""
    model = _weight_normed()
    units = _by_name(make_units(model, granularity))
    assert set(units) == {"0", "5"}
    assert units["0"].modules == ("0", "1")
    assert set(units["0"].keys) == {
        "0.bias", "0.parametrizations.weight.original0", "0.parametrizations.weight.original1",
        "1.weight", "1.bias", "1.running_mean", "1.running_var",
    }  # fmt: skip
    # spectral_norm's power-iteration vectors decide the weight in eval: they travel with it
    assert set(units["5"].keys) == {
        "5.parametrizations.weight.original", "5.parametrizations.weight.0._u",
        "5.parametrizations.weight.0._v",
    }  # fmt: skip
    sd = model.state_dict()
    covered = {k for u in units.values() for k in u.keys}
    assert covered == {k for k in sd if not k.endswith("num_batches_tracked")}


def test_a_parametrized_layer_is_selected_by_its_own_name() -> None:
    model = _weight_normed()
    (u,) = make_units(model, patterns=["0"])
    assert "0.parametrizations.weight.original1" in u.keys and u.modules == ("0", "1")
    with pytest.raises(LayerfastError, match="only the parametrizations of 0, which are reset"):
        make_units(model, patterns=["0.parametrizations*"])  # not a unit of its own any more


# --------------------------------------------------------------------------- shared BN


class SharedBN(nn.Module):
    """One BatchNorm applied to the outputs of two convs: fed directly by both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.a(x)) + self.bn(self.b(x))
        return self.fc(y.mean((2, 3)))


def test_a_shared_bn_is_reset_with_each_conv_that_feeds_it() -> None:
    """DESIGN §3: a normalization layer fed directly by a unit's conv is reset with it. The BN
    here is fed directly by `a` and by `b`; before, only `a`'s unit reset it (the first call in
    the graph won), so `reinit b` ran b at τ through the final model's statistics."""
    model = SharedBN()
    assert bn_feeders(model) == {"bn": "a"}  # the public map names the first feeder
    units = _by_name(make_units(model))
    assert units["a"].modules == ("a", "bn") and units["b"].modules == ("b", "bn")
    assert "bn.running_var" in units["b"].keys
    sep = make_units(model, bn="separate")
    assert [u.name for u in sep] == ["a", "bn", "b", "fc"]  # listed once, after its first feeder


# --------------------------------------------------------------------------- pattern names


class RootParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(3))
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + self.cls_token)


def test_root_parameters_are_selected_by_their_unit_name() -> None:
    """Layer granularity names the model's own parameters `(root)` (a ViT's class token); that
    name did not work in `--units`, the only way to reset them jointly with another unit."""
    model = RootParams()
    assert [u.name for u in make_units(model)] == [ROOT, "fc"]
    (joint,) = make_units(model, patterns=["re:^(\\(root\\)|fc)$"])
    assert joint.modules == ("", "fc") and joint.keys == ("cls_token", "fc.weight", "fc.bias")
    (root,) = make_units(model, patterns=[ROOT])
    assert root.keys == ("cls_token",)


class Aliased(nn.Module):
    """One block registered under two names (weight sharing, ALBERT-style)."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.first = shared
        self.second = shared
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(x)))


def test_a_module_registered_twice_is_selected_by_either_name() -> None:
    """`named_modules()` lists a shared module once, under its first name; `--units second`
    said no module matched (listing `first.0` as what names look like)."""
    model = Aliased()
    (u,) = make_units(model, patterns=["second"])
    assert u.modules == ("first.0", "first.1") and "first.0.weight" in u.keys
    (v,) = make_units(model, patterns=["second.0"])
    assert v.modules == ("first.0", "first.1")  # the LayerNorm fed by it joins (with-layer)


def test_a_pattern_naming_a_module_without_parameters_says_so() -> None:
    """`--units avgpool` named a real module; the error suggested writing a regex instead."""
    model, _ = build_model("resnet18", 10, (3, 32, 32))
    with pytest.raises(LayerfastError) as exc:
        make_units(model, patterns=["avgpool"])
    msg = str(exc.value)
    assert "'avgpool' selects only modules that own no parameters (avgpool)" in msg
    assert "for a regex" not in msg


# --------------------------------------------------------------------------- documented choices


class PreActNet(nn.Module):
    """A pre-activation ResNet in miniature: the stem conv feeds the first block's bn1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(PreActBlock(), PreActBlock())
        self.bn = nn.GroupNorm(2, 4)
        self.linear = nn.Linear(4, 2)
        self.ln = nn.LayerNorm(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.layer1(self.conv1(x))))
        return self.ln(self.linear(out.mean((2, 3))))


class PreActBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        return self.conv2(torch.relu(self.bn2(out))) + x


def test_pre_activation_norms_follow_the_documented_rule() -> None:
    """Pinned, not a defect: a norm goes with the conv that feeds it directly (the stem gets
    `layer1.0.bn1`, at block granularity too); norms after an addition are units of their own
    at layer granularity and stay in their block otherwise; LayerNorm after a Linear joins it."""
    model = PreActNet()
    assert bn_feeders(model) == {
        "layer1.0.bn1": "conv1", "layer1.0.bn2": "layer1.0.conv1",
        "layer1.1.bn2": "layer1.1.conv1", "ln": "linear",
    }  # fmt: skip
    layer = _by_name(make_units(model))
    assert layer["conv1"].modules == ("conv1", "layer1.0.bn1")
    assert layer["layer1.1.bn1"].modules == ("layer1.1.bn1",)  # fed by the addition
    assert layer["bn"].modules == ("bn",) and layer["linear"].modules == ("linear", "ln")
    block = _by_name(make_units(model, "block"))
    assert list(block) == ["conv1", "layer1", "bn", "linear"]
    assert block["conv1"].modules == ("conv1", "layer1.0.bn1")
    assert "layer1.1.bn1" in block["layer1"].modules and "layer1.0.bn1" not in block["layer1"].modules
    keys = [k for u in block.values() for k in u.keys]
    assert len(keys) == len(set(keys))
    assert set(keys) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}


def test_the_pattern_star_is_refused_and_re_dot_star_is_one_unit() -> None:
    """`--units '*'` made a unit named '*': its reinit rows read `*,reinit,0`, like the
    fullmodel rows (DESIGN §5 reserves '*' for baseline and fullmodel)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(LayerfastError, match=r"unit pattern '\*' would name a unit '\*'.*fullmodel"):
        make_units(model, patterns="*")
    (unit,) = make_units(model, patterns="re:.*")
    assert unit.name == "re:.*" and unit.modules == ("0", "2")

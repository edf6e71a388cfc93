"""The architecture registry: torchvision equivalence, shapes, init rules, user factories."""

from __future__ import annotations

import math
import os
import sys
import textwrap

import pytest
import torch
from torch import nn

from layerfast.errors import LayerfastError
from layerfast.models import ARCHS, ArchSpec, build_model, get_arch
from layerfast.models.init import default_init, resnet_init, vgg_init

IMAGENET_RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


# --------------------------------------------------------------------------- registry


def test_registry_has_the_documented_names() -> None:
    for name in ["fcn3x256", "vgg11", "vgg16", "vgg11_bn", "vgg16_bn", "resnet18", "resnet50",
                 "vgg11_cifar", "vgg11_bn_cifar", "resnet20", "resnet18_cifar"]:  # fmt: skip
        spec = get_arch(name)
        assert isinstance(spec, ArchSpec) and spec.name == name and spec is ARCHS[name]
        assert spec.init is not None  # every registered arch knows its init rule


def test_unknown_arch_lists_registered_names() -> None:
    with pytest.raises(LayerfastError) as exc:
        get_arch("resnet5O")
    msg = str(exc.value)
    assert "resnet5O" in msg and "resnet50" in msg and "vgg11_bn" in msg and "fcn3x256" in msg
    assert "did you mean" in msg


def test_lookup_is_case_insensitive() -> None:
    assert get_arch("ResNet50") is ARCHS["resnet50"]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_build_rejects_bad_num_classes(bad: object) -> None:
    with pytest.raises(LayerfastError, match="num_classes"):
        build_model("fcn3x256", bad, (1, 8, 8))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [(8, 8), (1, 0, 8), (1, 8, 8, 1)])
def test_build_rejects_bad_in_shape(bad: tuple) -> None:
    with pytest.raises(LayerfastError, match="in_shape"):
        build_model("resnet20", 10, bad)


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name", IMAGENET_RESNETS)
def test_resnet_state_dict_matches_torchvision(name: str) -> None:
    tvm = pytest.importorskip("torchvision.models")
    with torch.device("meta"):  # structure only: no allocation, no init cost
        theirs = getattr(tvm, name)(num_classes=1000).state_dict()
        ours = get_arch(name).build(1000, (3, 224, 224)).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_outputs_match_torchvision(name: str) -> None:
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    theirs = getattr(tvm, name)(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics so the test sees them
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    ours, _ = build_model(name, 10, (3, 32, 32))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_seeded_resnet_build_draws_torchvisions_weights(name: str) -> None:
    """Same construction order and init rule as torchvision: same numbers under one seed."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(123)
    theirs = getattr(tvm, name)().state_dict()
    torch.manual_seed(123)
    ours = get_arch(name).build(1000, (3, 224, 224)).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg16_bn"])
def test_vgg_is_torchvisions_and_draws_its_weights(name: str) -> None:
    """DESIGN §6: `vgg11`, `vgg11_bn` are torchvision's definitions, so torchvision checkpoints
    load: the same keys and shapes, the same numbers under one seed (construction order and
    init rule), and the same forward once loaded."""
    tvm = pytest.importorskip("torchvision.models")
    with torch.device("meta"):  # structure only
        theirs = getattr(tvm, name)(num_classes=1000).state_dict()
        ours = get_arch(name).build(1000, (3, 224, 224)).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    if name != "vgg11_bn":
        return  # one full-size draw is enough (each is 133M+ weights)
    torch.manual_seed(5)
    tv = getattr(tvm, name)(num_classes=10)
    torch.manual_seed(5)
    ours_m, _ = build_model(name, 10, (3, 32, 32))
    sd = tv.state_dict()
    assert all(torch.equal(ours_m.state_dict()[k], sd[k]) for k in sd)
    with torch.no_grad():  # non-trivial BN statistics so the forward sees them
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        ours_m.load_state_dict(tv.state_dict(), strict=True)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(ours_m.eval()(x), tv.eval()(x))


def test_the_cifar_vgg_is_not_torchvisions() -> None:
    """The CIFAR form keeps its own name: a 512-wide head, not torchvision's 4096-wide one."""
    with torch.device("meta"):  # structure only
        cifar, _ = build_model("vgg11_cifar", 10, (3, 32, 32))
        tv, _ = build_model("vgg11", 10, (3, 32, 32))
    assert cifar.classifier[0].in_features == 512 and tv.classifier[0].in_features == 512 * 49
    assert [k for k in cifar.state_dict() if k.startswith("classifier")][-1] == "classifier.4.bias"
    assert [k for k in tv.state_dict() if k.startswith("classifier")][-1] == "classifier.6.bias"


def test_resnet_in_channels_come_from_the_data() -> None:
    model, _ = build_model("resnet50", 7, (1, 28, 28))
    assert model.conv1.weight.shape == (64, 1, 7, 7) and model.fc.out_features == 7


# --------------------------------------------------------------------------- forward shapes


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("in_shape", [(3, 32, 32), (1, 28, 28)])
def test_forward_shape(name: str, in_shape: tuple[int, int, int]) -> None:
    """Every registered arch: shapes propagate through the real forward (meta tensors: no
    compute, so the 150-layer ResNets cost nothing; the real-data runs are below)."""
    with torch.device("meta"):
        model, _ = build_model(name, 10, in_shape)
        out = model.eval()(torch.empty(2, *in_shape))
    assert out.shape == (2, 10)


@pytest.mark.parametrize(
    "name", ["fcn3x256", "vgg11_bn_cifar", "resnet20", "resnet18_cifar", "resnet18"]
)
@pytest.mark.parametrize("in_shape", [(3, 32, 32), (1, 28, 28)])
def test_forward_real(name: str, in_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model, _ = build_model(name, 10, in_shape)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, *in_shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["fcn3x256", "fcn2x100", "vgg11_bn_cifar", "resnet20", "resnet18"])
def test_forward_shape_digits(name: str) -> None:
    model, _ = build_model(name, 10, (1, 8, 8))
    with torch.no_grad():
        assert model.eval()(torch.randn(3, 1, 8, 8)).shape == (3, 10)


# --------------------------------------------------------------------------- FCN


def test_fcn3x256_layout() -> None:
    model, spec = build_model("fcn3x256", 10, (1, 28, 28))
    assert [n for n, _ in model.named_children()] == [
        "flatten", "fc1", "relu1", "fc2", "relu2", "fc3", "relu3", "fc4"
    ]  # fmt: skip
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(784, 256), (256, 256), (256, 256), (256, 10)]
    assert spec.init is default_init and spec.blocks is None and spec.stages is None


@pytest.mark.parametrize(("name", "depth", "width"), [("fcn2x100", 2, 100), ("fcn5x512", 5, 512)])
def test_generic_fcn(name: str, depth: int, width: int) -> None:
    model, spec = build_model(name, 10, (1, 8, 8))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert spec.name == name and len(linears) == depth + 1
    assert linears[0].in_features == 64 and all(m.out_features == width for m in linears[:-1])


@pytest.mark.parametrize("name", ["fcn0x10", "fcn3x0", "fcnx10", "fcn3x"])
def test_malformed_fcn_name_is_unknown(name: str) -> None:
    with pytest.raises(LayerfastError, match="unknown arch"):
        get_arch(name)


# --------------------------------------------------------------------------- VGG / CIFAR ResNets


@pytest.mark.parametrize("name", ["vgg11_cifar", "vgg11"])
def test_vgg_pads_only_small_inputs(name: str) -> None:
    with torch.device("meta"):  # structure only
        small, _ = build_model(name, 10, (1, 28, 28))
        cifar, _ = build_model(name, 10, (3, 32, 32))
    assert isinstance(small.pad, nn.ZeroPad2d) and small.pad.padding == (2, 2, 2, 2)
    assert "pad" not in dict(cifar.named_children())
    assert small.features[0].in_channels == 1 and cifar.features[0].in_channels == 3
    assert small.state_dict().keys() == cifar.state_dict().keys()


def test_vgg_layout() -> None:
    plain, _ = build_model("vgg16_cifar", 10, (3, 32, 32))
    bn, _ = build_model("vgg16_bn_cifar", 10, (3, 32, 32))
    convs = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 13
    head = [(m.in_features, m.out_features) for m in plain.classifier if isinstance(m, nn.Linear)]
    assert head == [(512, 512), (512, 512), (512, 10)]


def test_resnet20_is_he_et_al() -> None:
    model, _ = build_model("resnet20", 10, (3, 32, 32))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert [len(model.get_submodule(f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert [model.get_submodule(f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [
        16, 32, 64
    ]  # fmt: skip
    assert not hasattr(model, "layer4") and model.fc.in_features == 64
    # option B: 1x1 conv + BN shortcut where the shape changes, nowhere else
    assert model.layer1[0].downsample is None
    assert model.layer2[0].downsample[0].kernel_size == (1, 1)
    # 0.27M parameters (269,722 with option A) + the two 1x1 shortcut convs and their BNs
    assert sum(p.numel() for p in model.parameters()) == 269_722 + 16 * 32 + 32 * 64 + 2 * (32 + 64)


def test_resnet18_cifar_has_torchvision_names_and_cifar_stem() -> None:
    model, _ = build_model("resnet18_cifar", 10, (3, 32, 32))
    ref, _ = build_model("resnet18", 10, (3, 32, 32))
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert model.conv1.weight.shape == (64, 3, 3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


# --------------------------------------------------------------------------- init rules


def _std_ok(w: torch.Tensor, std: float, rel: float = 0.03) -> bool:
    return abs(w.std().item() / std - 1) < rel and abs(w.mean().item()) < 0.05 * std


def test_resnet_conv_init_is_kaiming_normal_fan_out() -> None:
    torch.manual_seed(0)
    model, spec = build_model("resnet50", 10, (3, 32, 32))
    conv = model.layer4[0].conv3  # 512 -> 2048, 1x1: 1M draws, fan_out = 4 * fan_in
    fan_out = conv.out_channels
    assert _std_ok(conv.weight, math.sqrt(2 / fan_out))
    # spec.init re-draws from the same rule, in place, reproducibly per seed
    before = conv.weight.detach().clone()
    torch.manual_seed(1)
    spec.init(conv)
    after = conv.weight.detach().clone()
    assert not torch.equal(before, after) and _std_ok(after, math.sqrt(2 / fan_out))
    torch.manual_seed(1)
    spec.init(conv)
    assert torch.equal(conv.weight, after)


def test_resnet_bn_and_fc_init() -> None:
    model, spec = build_model("resnet18", 10, (3, 32, 32))
    bn, fc = model.layer1[0].bn1, model.fc
    with torch.no_grad():
        bn.weight.fill_(3.0)
        bn.bias.fill_(2.0)
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(7.0)
    spec.init(bn)
    assert (bn.weight == 1).all() and (bn.bias == 0).all()
    assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()
    spec.init(fc)  # torchvision leaves fc at PyTorch's default: U(+-1/sqrt(fan_in))
    assert fc.weight.abs().max() <= 1 / math.sqrt(fc.in_features)


def test_fcn_linear_init_is_pytorch_default() -> None:
    torch.manual_seed(0)
    model, spec = build_model("fcn3x256", 10, (1, 28, 28))
    for lin in (model.fc1, model.fc2):
        bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform(a=sqrt(5)) == 1/sqrt(fan_in)
        for t in (lin.weight, lin.bias):
            assert t.abs().max() <= bound and t.abs().max() > 0.98 * bound
    old = model.fc2.weight.detach().clone()
    spec.init(model.fc2)
    w = model.fc2.weight
    assert not torch.equal(old, w) and w.abs().max() <= 1 / 16 and w.abs().max() > 0.98 / 16


def test_vgg_init_rule() -> None:
    torch.manual_seed(0)
    model, spec = build_model("vgg16_bn_cifar", 10, (3, 32, 32))
    # the 256 -> 512 conv, where fan_out (512 * 9) differs from fan_in (256 * 9)
    (conv,) = [m for m in model.features if isinstance(m, nn.Conv2d) and m.in_channels == 256 and m.out_channels == 512]  # fmt: skip
    assert (conv.bias == 0).all() and _std_ok(conv.weight, math.sqrt(2 / (512 * 9)))
    lin = model.classifier[0]
    assert _std_ok(lin.weight, 0.01) and (lin.bias == 0).all()
    with torch.no_grad():
        lin.bias.fill_(1.0)
    spec.init(lin)
    assert (lin.bias == 0).all() and _std_ok(lin.weight, 0.01)


def test_init_functions_touch_only_the_given_module() -> None:
    block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Linear(4, 4))
    snapshot = {k: v.clone() for k, v in block.state_dict().items()}
    for init in (resnet_init, vgg_init, default_init):
        init(block)  # the container: no parameters of its own, nothing changes
    assert all(torch.equal(v, snapshot[k]) for k, v in block.state_dict().items())


# --------------------------------------------------------------------------- user factories


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A temporary cwd NOT on sys.path, and sys.path/sys.modules restored afterwards: the
    modules imported from it are forgotten (only those: a library the test imported first,
    such as matplotlib's lazily imported parts, stays whole for the tests after it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        where = getattr(sys.modules[name], "__file__", None) or ""
        if where.startswith(str(tmp_path)):
            del sys.modules[name]


def _write(d, name: str, source: str) -> None:
    (d / f"{name}.py").write_text(textwrap.dedent(source))


def test_user_factory_gets_the_keywords_it_accepts(user_dir) -> None:
    _write(user_dir, "lf_user_net", """
        from torch import nn
        calls = []
        def full(num_classes, in_shape):
            calls.append(("full", num_classes, in_shape))
            return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes))
        def bare():
            calls.append(("bare",))
            return nn.Linear(4, 2)
        def kw(**kwargs):
            calls.append(("kw", sorted(kwargs)))
            return nn.Linear(4, 2)
        class Net(nn.Linear):
            def __init__(self, num_classes=3):
                super().__init__(4, num_classes)
    """)  # fmt: skip
    model, spec = build_model("lf_user_net:full", 5, (1, 2, 3))
    assert model(torch.randn(2, 1, 2, 3)).shape == (2, 5)
    assert spec.name == "lf_user_net:full"
    assert spec.init is None and spec.blocks is None and spec.stages is None
    build_model("lf_user_net:bare", 5, (1, 2, 3))
    build_model("lf_user_net:kw", 5, (1, 2, 3))
    calls = sys.modules["lf_user_net"].calls
    assert calls == [("full", 5, (1, 2, 3)), ("bare",), ("kw", ["in_shape", "num_classes"])]
    net, _ = build_model("lf_user_net:Net", 7, (1, 2, 2))
    assert net.out_features == 7


def test_user_kwargs_factory_whose_callee_rejects_a_keyword(user_dir) -> None:
    """torchvision's `resnet18(**kwargs)` hands `in_shape` to ResNet.__init__, which refuses it:
    the factory is called again without that keyword (it was a TypeError before). A keyword
    the factory names itself is not dropped: its own TypeError is the user's error."""
    model, _ = build_model("torchvision.models:resnet18", 7, (3, 32, 32))
    assert model.fc.out_features == 7 and model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    _write(user_dir, "lf_user_kw", """
        from torch import nn
        calls = []
        class Net(nn.Linear):
            def __init__(self, num_classes=3):
                super().__init__(4, num_classes)
        def via(**kwargs):
            calls.append(sorted(kwargs))
            return Net(**kwargs)
        def named(in_shape, **kwargs):
            raise TypeError("f() got an unexpected keyword argument 'in_shape'")
    """)  # fmt: skip
    net, _ = build_model("lf_user_kw:via", 5, (1, 2, 2))
    assert net.out_features == 5
    assert sys.modules["lf_user_kw"].calls == [["in_shape", "num_classes"], ["num_classes"]]
    with pytest.raises(LayerfastError, match="unexpected keyword argument 'in_shape'"):
        build_model("lf_user_kw:named", 5, (1, 2, 2))


def test_user_package_module(user_dir) -> None:
    (user_dir / "lf_pkg").mkdir()
    (user_dir / "lf_pkg" / "__init__.py").write_text("")
    _write(
        user_dir / "lf_pkg",
        "nets",
        "from torch import nn\ndef make():\n    return nn.Linear(2, 2)\n",
    )
    model, _ = build_model("lf_pkg.nets:make", 2, (1, 1, 2))
    assert isinstance(model, nn.Linear)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("lf_no_such_module:make", "No module named 'lf_no_such_module'"),
        ("lf_user_bad:missing", "has no attribute 'missing'"),
        ("lf_user_bad:boom", "ValueError: boom from the factory"),
        ("lf_user_bad:not_module", "returned int, not an nn.Module"),
        ("lf_user_bad:CONST", "not callable"),
        ("lf_user_broken:make", "ZeroDivisionError"),
    ],
)
def test_user_factory_errors(user_dir, spec: str, fragment: str) -> None:
    _write(user_dir, "lf_user_bad", """
        CONST = 3
        def boom(num_classes):
            raise ValueError("boom from the factory")
        def not_module():
            return 42
    """)  # fmt: skip
    _write(user_dir, "lf_user_broken", "x = 1 / 0\n")
    with pytest.raises(LayerfastError) as exc:
        build_model(spec, 10, (3, 32, 32))
    msg = str(exc.value)
    assert spec in msg and fragment in msg and "Traceback" not in msg
    err = exc.value  # the user's own exception is chained, for a Python caller's traceback
    raised = {"lf_user_bad:boom": ValueError, "lf_user_broken:make": ZeroDivisionError}.get(spec)
    assert type(err.__cause__) is raised if raised else err.__cause__ is None


def test_user_spec_imports_from_cwd_and_takes_it_off_the_path_again(user_dir) -> None:
    _write(
        user_dir, "lf_user_cwd", "from torch import nn\ndef make():\n    return nn.Linear(1, 1)\n"
    )
    cwd = os.getcwd()
    assert cwd not in sys.path
    get_arch("lf_user_cwd:make")
    assert "lf_user_cwd" in sys.modules  # imported from the cwd
    assert cwd not in sys.path  # and the caller's import path as it was (session 22)

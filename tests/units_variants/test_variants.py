"""Variants: order, what each kind sets, reproducible re-randomization, no mutation of the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.units import Unit
from layerfast.variants import Variant, derive_seed, make_variants, rerandom_draw


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 3)


CONV = Unit(
    "conv",
    ("conv", "bn"),
    ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"),
)
FC = Unit("fc", ("fc",), ("fc.weight", "fc.bias"))
UNITS = [CONV, FC]


def sd_at(tau: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(100 + tau)
    m = Tiny()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.normal_()
    return {k: v.clone() for k, v in m.state_dict().items()}


def write_run(path: Path, labels=(0, 1, 5)) -> Tiny:
    """Checkpoints `epoch_<τ>.pt`; returns the final model loaded from the last one."""
    for tau in labels:
        torch.save({"model": sd_at(tau)}, path / f"epoch_{tau:03d}.pt")
    model = Tiny()
    model.load_state_dict(sd_at(labels[-1]))
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_order_and_labels(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    ck = CheckpointDir(tmp_path)
    vs = make_variants(
        model, UNITS, ck, seeds=(1, 2), joint=[["conv", "fc"]], interp=[("fc", 0, 0.5, 0.0)]
    )
    assert [v.label for v in vs] == [
        "baseline",
        "reinit conv @0", "reinit conv @1", "reinit conv @5",
        "rerandom conv seed 1", "rerandom conv seed 2",
        "reinit fc @0", "reinit fc @1", "reinit fc @5",
        "rerandom fc seed 1", "rerandom fc seed 2",
        "fullmodel @0", "fullmodel @1", "fullmodel @5",
        "joint conv+fc @0", "joint conv+fc @1", "joint conv+fc @5",
        "interp fc @0 alpha=0.5 sigma=0",
    ]  # fmt: skip
    assert vs[0] == Variant("*", "baseline", None, None) and vs[0].overrides() == {}
    assert vs[11].unit == "*" and vs[11].kind == "fullmodel"


def test_reinit_overrides_are_checkpoint_tensors(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    ck = CheckpointDir(tmp_path)
    vs = make_variants(model, UNITS, ck, reset=("reinit",), checkpoints=[1])
    (v,) = [v for v in vs if v.unit == "conv"]
    assert v.keys == CONV.keys and v.checkpoint == 1
    want = {k: sd_at(1)[k] for k in CONV.keys}
    assert_same(v.overrides(), want)


def test_reset_to_final_equals_baseline(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    vs = make_variants(model, UNITS, CheckpointDir(tmp_path), reset=("reinit", "fullmodel"))
    sd = model.state_dict()
    finals = [v for v in vs if v.checkpoint == 5]
    assert len(finals) == 3
    for v in finals:
        got = v.overrides()
        assert got and set(got) == set(v.keys)
        for k, t in got.items():
            assert torch.equal(t, sd[k]), (v.label, k)


def test_fullmodel_is_whole_model_at_tau(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    vs = make_variants(model, UNITS, CheckpointDir(tmp_path), reset=("fullmodel",), checkpoints=[1])
    (v,) = [v for v in vs if v.kind == "fullmodel"]
    want = {k: t for k, t in sd_at(1).items() if not k.endswith("num_batches_tracked")}
    assert set(v.keys) == set(want)  # BN running statistics included
    got = v.overrides()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_fullmodel_under_bn_keep_leaves_norm_layers_at_final(tmp_path: Path) -> None:
    """DESIGN §3: under `--bn keep` normalization layers stay at the final model, in the
    fullmodel row too (parameters and running statistics); every other key is τ."""
    model = write_run(tmp_path)
    kept = [
        Unit("conv", ("conv",), ("conv.weight", "conv.bias"), bn="keep"),
        Unit("fc", ("fc",), ("fc.weight", "fc.bias"), bn="keep"),
    ]
    vs = make_variants(model, kept, CheckpointDir(tmp_path), reset=("fullmodel",), checkpoints=[1])
    (v,) = [v for v in vs if v.kind == "fullmodel"]
    assert set(v.keys) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    got = v.overrides()
    for k in v.keys:
        assert torch.equal(got[k], sd_at(1)[k]), k


def test_bn_policy_travels_from_make_units_to_fullmodel(tmp_path: Path) -> None:
    from layerfast.units import make_units

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    for tau in (0, 1):
        torch.save(net.state_dict(), tmp_path / f"epoch_{tau}.pt")
    ck = CheckpointDir(tmp_path)
    norm = {"1.weight", "1.bias", "1.running_mean", "1.running_var"}
    for bn, has_norm in (("keep", False), ("with-layer", True), ("separate", True)):
        units = make_units(net, bn=bn)
        assert {u.bn for u in units} == {bn}
        vs = make_variants(net, units, ck, reset="fullmodel", checkpoints=[0])
        (v,) = [v for v in vs if v.kind == "fullmodel"]
        assert norm <= set(v.keys) if has_norm else not norm & set(v.keys), (bn, v.keys)
        assert {"0.weight", "0.bias", "3.weight", "3.bias"} <= set(v.keys)
    mixed = [*make_units(net, bn="keep"), Unit("x", ("1",), ("1.weight",))]
    with pytest.raises(LayerfastError, match="different BN policies"):
        make_variants(net, mixed, ck, reset="fullmodel")


def test_overrides_take_model_dtype(tmp_path: Path) -> None:
    for tau in (0, 2):
        torch.save({k: v.half() for k, v in sd_at(tau).items()}, tmp_path / f"e_{tau}.pt")
    model = Tiny()
    vs = make_variants(model, [FC], CheckpointDir(tmp_path), reset=("reinit",), checkpoints=[2])
    got = vs[1].overrides()
    assert got["fc.weight"].dtype == torch.float32
    assert torch.equal(got["fc.weight"], sd_at(2)["fc.weight"].half().float())


def test_rerandom_reproducible_distinct_and_not_theta0(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    ck = CheckpointDir(tmp_path)
    a = [v for v in make_variants(model, UNITS, ck, reset=("rerandom",), seeds=(1, 2)) if v.seed]
    b = [v for v in make_variants(model, UNITS, ck, reset=("rerandom",), seeds=(1, 2)) if v.seed]
    theta0 = sd_at(0)
    for va, vb in zip(a, b, strict=True):
        oa, ob = va.overrides(), vb.overrides()
        assert_same(oa, ob)
        assert_same(oa, va.overrides())
        assert set(oa) == set(va.keys)
        assert not torch.equal(oa[f"{va.unit}.weight"], theta0[f"{va.unit}.weight"])
    s1, s2 = a[0].overrides(), a[1].overrides()  # conv, seeds 1 and 2
    assert not torch.equal(s1["conv.weight"], s2["conv.weight"])
    assert torch.equal(s1["bn.weight"], torch.ones(4))  # BN back to its init state
    assert torch.equal(s1["bn.running_var"], torch.ones(4))
    assert torch.equal(s1["bn.running_mean"], torch.zeros(4))


def test_rerandom_is_order_independent() -> None:
    model = Tiny()
    forward = make_variants(model, [CONV, FC], None, reset=("rerandom",), seeds=(3,))
    backward = make_variants(model, [FC], None, reset=("rerandom",), seeds=(3,))
    assert_same(forward[2].overrides(), backward[1].overrides())  # fc, seed 3


def test_rerandom_never_equals_theta0(tmp_path: Path) -> None:
    model = Tiny()
    first_draw = rerandom_draw(model, FC, seed=1)  # what seed 1 gives without τ0
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    sd0.update(first_draw)  # an init that happens to equal that draw
    torch.save(sd0, tmp_path / "e_0.pt")
    ck = CheckpointDir(tmp_path)
    (v,) = [v for v in make_variants(model, [FC], ck, reset=("rerandom",)) if v.seed == 1]
    got = v.overrides()
    assert not torch.equal(got["fc.weight"], sd0["fc.weight"])
    redraw = rerandom_draw(model, FC, seed=1, theta0={k: sd0[k] for k in FC.keys})
    assert_same(got, redraw)


def test_rerandom_leaves_model_and_rng_untouched(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    before, rng = snapshot(model), torch.get_rng_state()
    vs = make_variants(
        model, UNITS, CheckpointDir(tmp_path), seeds=(1,), interp=[("fc", 1, 0.3, 0.1)]
    )
    for v in vs:
        v.overrides()
    assert_same(snapshot(model), before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_rerandom_uses_arch_init_rule() -> None:
    calls: list[str] = []

    class Arch:
        def init(self, module: nn.Module) -> None:
            calls.append(type(module).__name__)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 100.0)
                nn.init.zeros_(module.bias)

    got = rerandom_draw(Tiny(), FC, seed=1, arch=Arch())
    assert calls == ["Linear"]
    assert got["fc.weight"].std() > 10 and torch.equal(got["fc.bias"], torch.zeros(3))


def test_rerandom_seed_derivation_is_stable() -> None:
    assert derive_seed("layerfast-rerandom", 1, "fc", "fc") == derive_seed(
        "layerfast-rerandom", 1, "fc", "fc"
    )
    assert 0 <= derive_seed("x") < 2**63
    ref = nn.Linear(16, 3)
    torch.manual_seed(derive_seed("layerfast-rerandom", 1, "fc", "fc"))
    ref.reset_parameters()
    got = rerandom_draw(Tiny(), FC, seed=1)
    assert torch.equal(got["fc.weight"], ref.weight.detach())


def test_module_without_init_rule() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(2))

    model = nn.Sequential(Scale())
    unit = Unit("0", ("0",), ("0.s",))
    with pytest.raises(LayerfastError, match="no reset_parameters"):
        rerandom_draw(model, unit, seed=1)


def test_missing_tau0_for_reinit(tmp_path: Path) -> None:
    model = write_run(tmp_path, labels=(1, 5))
    ck = CheckpointDir(tmp_path)
    with pytest.raises(
        LayerfastError, match="re-initialization to init needs τ=0; found labels 1, 5"
    ):
        make_variants(model, UNITS, ck)
    with pytest.raises(LayerfastError, match="needs τ=0; found labels 1, 5"):
        make_variants(model, UNITS, ck, checkpoints=[0, 1])
    vs = make_variants(model, UNITS, ck, checkpoints=[1])  # explicit labels: fine
    assert {v.checkpoint for v in vs if v.kind == "reinit"} == {1}
    with pytest.raises(LayerfastError, match="no checkpoint with label 3"):
        make_variants(model, UNITS, ck, checkpoints=[3])
    vs = make_variants(model, UNITS, ck, reset=("rerandom",))  # needs only the final model
    assert len(vs) == 3


def test_without_checkpoint_dir() -> None:
    with pytest.raises(LayerfastError, match="reinit needs a checkpoint directory"):
        make_variants(Tiny(), UNITS, None)
    vs = make_variants(Tiny(), UNITS, None, reset=("rerandom",), seeds=(1, 2))
    assert [v.kind for v in vs] == ["baseline"] + ["rerandom"] * 4


def test_mismatched_checkpoint_fails_up_front(tmp_path: Path) -> None:
    sd = sd_at(0)
    sd["fc.weight"] = torch.zeros(3, 9)
    torch.save(sd, tmp_path / "e_0.pt")
    with pytest.raises(LayerfastError, match=r"fc.weight \[3, 9\] in the checkpoint"):
        make_variants(Tiny(), UNITS, CheckpointDir(tmp_path))


def test_lightning_checkpoints_resolve(tmp_path: Path) -> None:
    for tau in (0, 4):
        sd = {f"model.{k}": v for k, v in sd_at(tau).items()}
        torch.save({"state_dict": sd, "epoch": tau, "global_step": 10}, tmp_path / f"e={tau}.ckpt")
    vs = make_variants(Tiny(), UNITS, CheckpointDir(tmp_path), reset=("reinit",))
    (v,) = [v for v in vs if v.unit == "fc" and v.checkpoint == 4]
    assert_same(v.overrides(), {k: sd_at(4)[k] for k in FC.keys})


def test_joint(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    ck = CheckpointDir(tmp_path)
    vs = make_variants(model, UNITS, ck, reset=(), joint=[(["fc", "conv"], 1)])
    (v,) = vs[1:]
    assert v.unit == "fc+conv" and v.kind == "joint" and v.checkpoint == 1
    assert v.keys == FC.keys + CONV.keys
    assert_same(v.overrides(), {k: sd_at(1)[k] for k in FC.keys + CONV.keys})
    with pytest.raises(LayerfastError, match="no unit named 'nope'"):
        make_variants(model, UNITS, ck, reset=(), joint=[["fc", "nope"]])


def test_interp_formula(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    ck = CheckpointDir(tmp_path)
    vs = make_variants(
        model, UNITS, ck, reset=(), seeds=(1, 2),
        interp=[("conv", 1, 0.25, 0.0), ("conv", 1, 0.25, 0.5)],
    )  # fmt: skip
    plain, noisy1, noisy2 = vs[1:]
    assert (plain.alpha, plain.sigma, plain.seed) == (0.25, 0.0, None)
    assert [noisy1.seed, noisy2.seed] == [1, 2]
    t, f = sd_at(1), sd_at(5)
    got = plain.overrides()
    for k in CONV.keys:
        want = (0.75 * t[k].double() + 0.25 * f[k].double()).float()
        assert torch.equal(got[k], want), k
    n1, n1b, n2 = noisy1.overrides(), noisy1.overrides(), noisy2.overrides()
    assert_same(n1, n1b)
    noise = n1["conv.weight"].double() - got["conv.weight"].double()
    assert 0.2 < noise.std() < 1.0
    assert not torch.equal(n1["conv.weight"], n2["conv.weight"])
    for k in ("bn.running_mean", "bn.running_var"):  # buffers get no noise
        assert torch.equal(n1[k], got[k])
    ends = make_variants(
        model, [FC], ck, reset=(), interp=[("fc", 1, 0.0, 0.0), ("fc", 1, 1.0, 0.0)]
    )
    assert_same(ends[1].overrides(), {k: sd_at(1)[k] for k in FC.keys})
    assert_same(ends[2].overrides(), {k: sd_at(5)[k] for k in FC.keys})


class TiedPair(nn.Module):
    """`dec.weight = enc.weight`: one tensor under two state-dict names."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x.flatten(1))))


def test_rerandom_of_a_unit_holding_both_names_of_a_tied_tensor_draws_it_once() -> None:
    """Each module drew its own value for the shared tensor, and the engine then refused the
    variant ('gives the tied tensor enc.weight two different values'): a joint unit over tied
    modules could not be re-randomized at all. The canonical name's draw stands for both."""
    from layerfast.units import make_units

    model = TiedPair()
    (unit,) = make_units(model, patterns="re:enc|dec")
    assert {"enc.weight", "dec.weight"} <= set(unit.keys)
    draw = rerandom_draw(model, unit, seed=3)
    assert torch.equal(draw["enc.weight"], draw["dec.weight"])
    alone = rerandom_draw(model, Unit("enc", ("enc",), ("enc.weight", "enc.bias")), seed=3)
    # the biases are each module's own, and enc's draw of the shared weight is the one kept
    assert not torch.equal(draw["enc.bias"], draw["dec.bias"])
    assert torch.equal(draw["enc.weight"], rerandom_draw(model, unit, seed=3)["dec.weight"])
    assert alone["enc.weight"].shape == draw["enc.weight"].shape


def test_analyze_re_randomizes_a_joint_unit_of_tied_modules(tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    from layerfast.analysis import analyze

    (tmp_path / "tiedpair_mod.py").write_text(
        "from tests.units_variants.test_variants import TiedPair\n"
        "def make(num_classes, in_shape):\n    return TiedPair()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    g = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz", x=g.standard_normal((40, 6)).astype(np.float32), y=np.arange(40) % 6
    )
    model = TiedPair()
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(model.state_dict(), ck / "epoch_0.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    torch.save(model.state_dict(), ck / "epoch_1.pt")
    res = analyze(
        "tiedpair_mod:make",
        ck,
        data=str(tmp_path / "d.npz"),
        units="re:enc|dec",
        seeds=2,
        out=tmp_path / "out",
        device="cpu",
        progress=False,
        figures=False,
    )
    t = res.table
    assert len(t[t["kind"] == "rerandom"]) == 2


def test_rerandom_of_a_parametrized_layer_is_refused_with_what_to_do() -> None:
    """weight_norm keeps the weight as parametrizations.weight.original0/1: reset_parameters()
    would write into the computed weight and be lost. Refused in the user's terms, not as
    'original0 not owned by any of the unit's modules'."""
    from torch.nn.utils.parametrizations import weight_norm

    from layerfast.units import make_units

    model = nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    unit = next(u for u in make_units(model) if u.name == "0")
    with pytest.raises(
        LayerfastError,
        match=r"module 0 of unit '0': its weight is parametrized"
        r".*--reset reinit,fullmodel",
    ):
        rerandom_draw(model, unit, seed=1)
    assert rerandom_draw(model, next(u for u in make_units(model) if u.name == "2"), seed=1)

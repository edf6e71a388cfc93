"""Audit of the variants (DESIGN.md §3) against what they claim, and of the engine's results for
each kind against a naive loop written here from the contract alone: load the final model, set
the unit's tensors, one full forward over the data, count. fp32 results are equal exactly
(error, top-5, agreement), the loss to rounding.

The expectations are built independently of `layerfast.units` / `layerfast.variants` wherever
the contract fixes them: which keys a unit resets under each BN policy, what τ holds, the
re-randomization's documented seed derivation, the interpolation formula.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.units import Unit, make_units
from layerfast.variants import make_variants


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def _tiny_run(path: Path, labels=(0, 1, 2)) -> nn.Module:
    """Linear -> BatchNorm1d -> Linear saved at each τ with different weights, running statistics
    and num_batches_tracked; returns the final model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    for tau in labels:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.normal_()
            net[1].running_var.uniform_(0.5, 2.0)
            net[1].num_batches_tracked.fill_(10 * tau + 3)
        torch.save(net.state_dict(), path / f"epoch_{tau}.pt")
    return net


BN_UNIT = Unit(
    "bn", ("1",), ("1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")
)


# ---- interp ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "alpha, sigma", [(math.nan, 0.0), (math.inf, 0.0), (-math.inf, 0.0), (0.5, math.inf)]
)
def test_interp_refuses_non_finite_alpha_and_sigma(alpha, sigma, tmp_path: Path) -> None:
    """α = NaN (or ±inf) and σ = inf were accepted: the variant's weights were NaN/inf and the
    engine reported their (chance-level) error as a result of the interpolation."""
    net = _tiny_run(tmp_path)
    fc = Unit("0", ("0",), ("0.weight", "0.bias"))
    with pytest.raises(LayerfastError, match="interp: (alpha|sigma) must be a finite number"):
        make_variants(net, [fc], CheckpointDir(tmp_path), reset=(), interp=[("0", 0, alpha, sigma)])


def test_interp_leaves_integer_buffers_at_the_final_model(tmp_path: Path) -> None:
    """An integer or bool buffer in the unit (num_batches_tracked, a user's index buffer) cannot
    be interpolated; it took θ^τ's value, so even α = 1 did not give back the final model.
    It stays at the final model, whatever α and σ."""
    net = _tiny_run(tmp_path)
    final = net.state_dict()
    ck = CheckpointDir(tmp_path)
    for alpha, sigma in ((1.0, 0.0), (0.0, 0.0), (0.5, 0.3)):
        vs = make_variants(net, [BN_UNIT], ck, reset=(), interp=[("bn", 0, alpha, sigma)])
        got = vs[1].overrides()
        assert got["1.num_batches_tracked"].dtype == torch.int64
        assert torch.equal(got["1.num_batches_tracked"], final["1.num_batches_tracked"]), alpha
        if alpha == 1.0:  # the end point is the final model, key for key
            for k, t in got.items():
                assert torch.equal(t, final[k]), k


class TiedPair(nn.Module):
    """`dec.weight = enc.weight`: one tensor under two state-dict names."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x.flatten(1))))


def test_interp_noise_on_a_tied_tensor_is_one_draw(tmp_path: Path) -> None:
    """A unit holding both names of a tied tensor got independent noise under each name, and the
    engine then refused the variant ('gives the tied tensor enc.weight two different values'):
    the same defect re-randomization had. The noise is drawn once, under the canonical name."""
    from layerfast.engine import Evaluator

    torch.manual_seed(0)
    model = TiedPair()
    torch.save(model.state_dict(), tmp_path / "e_0.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.save(model.state_dict(), tmp_path / "e_1.pt")
    (unit,) = make_units(model, patterns="re:enc|dec")
    ck = CheckpointDir(tmp_path)
    vs = make_variants(model, [unit], ck, reset=(), seeds=(1,), interp=[(unit.name, 0, 0.5, 0.1)])
    got = vs[1].overrides()
    assert torch.equal(got["enc.weight"], got["dec.weight"])
    plain = make_variants(model, [unit], ck, reset=(), interp=[(unit.name, 0, 0.5, 0.0)])
    assert not torch.equal(got["enc.weight"], plain[1].overrides()["enc.weight"])  # noisy
    x = torch.randn(16, 6)
    y = torch.arange(16) % 6
    res = Evaluator(model, vs, device="cpu", precision="fp32").run([(x, y)])
    assert res.n == 16


# ---- nothing to evaluate -----------------------------------------------------------------------
def test_reinit_with_no_checkpoints_chosen_is_an_error(tmp_path: Path) -> None:
    """`checkpoints=[]` with reinit/fullmodel asked for built no reinit or fullmodel variant, and
    `analyze(checkpoints=[])` wrote a results table holding the baseline alone, as if the run
    had succeeded (the CLI refuses `--checkpoints ''`)."""
    net = _tiny_run(tmp_path)
    ck = CheckpointDir(tmp_path)
    fc = Unit("0", ("0",), ("0.weight", "0.bias"))
    for reset in (("reinit",), ("fullmodel",), ("reinit", "rerandom")):
        with pytest.raises(LayerfastError, match="no checkpoints to reset to"):
            make_variants(net, [fc], ck, reset=reset, checkpoints=[])
    with pytest.raises(LayerfastError, match="no checkpoints to reset to"):
        make_variants(net, [fc], ck, reset=(), checkpoints=[], joint=[["0"]])
    assert len(make_variants(net, [fc], ck, reset=("rerandom",), checkpoints=[])) == 2


def test_rerandom_with_no_seeds_is_an_error(tmp_path: Path) -> None:
    """`seeds=()` with rerandom asked for built no rerandom variant, silently."""
    net = _tiny_run(tmp_path)
    fc = Unit("0", ("0",), ("0.weight", "0.bias"))
    with pytest.raises(LayerfastError, match="rerandom needs at least one seed"):
        make_variants(net, [fc], None, reset=("rerandom",), seeds=())
    with pytest.raises(LayerfastError, match="interp 0 with sigma > 0 needs at least one seed"):
        make_variants(
            net, [fc], CheckpointDir(tmp_path), reset=(), seeds=(), interp=[("0", 0, 0.5, 0.1)]
        )


def test_analyze_with_an_empty_checkpoint_list_is_an_error(ckpts: Path, tmp_path: Path) -> None:
    from layerfast.analysis import analyze

    with pytest.raises(LayerfastError, match="no checkpoints to reset to"):
        analyze(
            "fcn3x256",
            ckpts,
            reset="reinit",
            checkpoints=[],
            device="cpu",
            out=tmp_path / "o",
            progress=False,
            figures=False,
        )
    assert not (tmp_path / "o").exists()


# ---- the engine against a naive loop written from the contract ---------------------------------
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of `digits`, normalised as every analysis feeds it, in one tensor."""
    from layerfast.data import open_data, to_device

    src = open_data("digits", split="test")
    xs, ys = [], []
    for x, y in src.batches(1000):
        x, y = to_device(x, y, src, torch.device("cpu"), dtype=torch.float32)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


class Naive:
    """The final model, its state, and one full forward per variant: DESIGN §5's numbers."""

    def __init__(self, model: nn.Module, final: dict[str, torch.Tensor]) -> None:
        self.model = model.eval()
        self.final = {k: v.clone() for k, v in final.items()}
        self.x, self.y = _digits()
        self.model.load_state_dict(self.final)
        self.base = self.logits({}).argmax(1)

    @torch.no_grad()
    def logits(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.load_state_dict({**self.final, **tensors})
        out = self.model(self.x)
        self.model.load_state_dict(self.final)
        return out

    def row(self, tensors: dict[str, torch.Tensor]) -> tuple[float, float, float, float]:
        lg = self.logits(tensors)
        n, y = len(self.y), self.y
        pred = lg.argmax(1)
        top5 = ((lg > lg.gather(1, y[:, None])).sum(1) < 5).sum().item()
        return (
            (n - (pred == y).sum().item()) / n,
            (n - top5) / n,
            F.cross_entropy(lg.double(), y).item(),
            (pred == self.base).sum().item() / n,
        )


def assert_row_equals(row, want: tuple[float, float, float, float], what: str) -> None:
    err, top5, loss, agree = want
    assert row["error"] == err, (what, row["error"], err)
    assert row["top5_error"] == top5, (what, row["top5_error"], top5)
    assert row["agreement"] == agree, (what, row["agreement"], agree)
    assert row["loss"] == pytest.approx(loss, rel=1e-6), what


def _rerandom_linear(like: nn.Module, seed: int, unit: str, module: str) -> dict:
    """DESIGN §3 / variants docstring: the module's own reset_parameters() under the CPU
    generator seeded with the documented derivation of (seed, unit, module)."""
    from layerfast.variants import derive_seed

    m = type(like)(like.in_features, like.out_features)
    torch.manual_seed(derive_seed("layerfast-rerandom", seed, unit, module))
    m.reset_parameters()
    return {f"{module}.weight": m.weight.detach(), f"{module}.bias": m.bias.detach()}


@pytest.mark.parametrize("fanout", [False, True])
def test_fcn_every_kind_equals_the_naive_loop(fanout: bool, ckpts: Path, tmp_path: Path) -> None:
    from layerfast.analysis import analyze
    from layerfast.metrics import COLUMNS
    from layerfast.models import build_model

    with torch.random.fork_rng():
        res = analyze(
            "fcn3x256",
            ckpts,
            seeds=[1, 2],
            device="cpu",
            precision="fp32",
            fanout=fanout,
            out=tmp_path / "o",
            progress=False,
            figures=False,
        )
    t = res.table
    assert list(t.columns) == list(COLUMNS)
    ck = {
        int(p.stem.split("_")[1]): torch.load(p, weights_only=True)
        for p in ckpts.glob("epoch_*.pt")
    }
    final = ck[max(ck)]
    model, _ = build_model("fcn3x256", 10, (1, 8, 8))
    naive = Naive(model, final)
    base_err = naive.row({})[0]
    seen = set()
    for _, r in t.iterrows():
        unit, kind = r["unit"], r["kind"]
        keys = [f"{unit}.weight", f"{unit}.bias"]
        if kind == "baseline":
            want = {}
        elif kind == "reinit":
            want = {k: ck[int(r["checkpoint"])][k] for k in keys}
        elif kind == "fullmodel":
            want = dict(ck[int(r["checkpoint"])])
        else:
            assert kind == "rerandom"
            want = _rerandom_linear(model.get_submodule(unit), int(r["seed"]), unit, unit)
        assert_row_equals(r, naive.row(want), f"{kind} {unit} {r['checkpoint']} {r['seed']}")
        # the table's own bookkeeping (DESIGN §5)
        assert r["n"] == 360 and r["delta_error"] == pytest.approx(r["error"] - base_err, abs=1e-12)
        assert pd.isna(r["checkpoint"]) == (kind in ("baseline", "rerandom"))
        assert pd.isna(r["seed"]) == (kind != "rerandom")
        assert (r["verdict"] != "") == (kind in ("reinit", "rerandom"))
        if kind in ("reinit", "rerandom"):
            assert r["verdict"] == ("robust" if r["delta_error"] <= 0.05 else "critical")
        seen.add(kind)
    assert seen == {"baseline", "reinit", "rerandom", "fullmodel"}
    assert len(t) == 1 + 4 * (4 + 2) + 4


class BNNet(nn.Module):
    """Two conv+BN and one linear+BN1d feeding a head: what `--bn` decides about."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 32)
        self.bnf = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.relu(self.bnf(self.fc(x.flatten(1)))))


FED = {"conv1": "bn1", "conv2": "bn2", "fc": "bnf"}  # BN fed directly by each conv/linear


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory: pytest.TempPathFactory):
    """A BNNet factory importable as `bnnet_audit:make` and checkpoints τ = 0, 1, 2 whose
    parameters, running statistics and num_batches_tracked all differ."""
    root = tmp_path_factory.mktemp("bnrun")
    (root / "bnnet_audit.py").write_text(
        "from tests.units_variants.test_variants_audit import BNNet\n"
        "def make(num_classes, in_shape):\n    return BNNet(num_classes)\n"
    )
    ck = root / "ck"
    ck.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = BNNet()
    sds = {}
    for tau in (0, 1, 2):
        with torch.no_grad():
            if tau:
                for p in m.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
                for name, b in m.named_buffers():
                    if name.endswith("running_mean"):
                        b.copy_(0.5 * torch.randn(b.shape, generator=g))
                    elif name.endswith("running_var"):
                        b.uniform_(0.5, 2.0, generator=g)
                    else:
                        b.fill_(100 * tau)
        sds[tau] = {k: v.clone() for k, v in m.state_dict().items()}
        torch.save(sds[tau], ck / f"epoch_{tau}.pt")
    old = list(sys.path)
    sys.path[:0] = [str(root), str(Path(__file__).resolve().parents[2])]
    yield ck, sds
    sys.path[:] = old
    sys.modules.pop("bnnet_audit", None)


def _module_keys(m: str, stats: bool = True) -> list[str]:
    keys = [f"{m}.weight", f"{m}.bias"]
    return (
        keys + [f"{m}.running_mean", f"{m}.running_var"] if m.startswith("bn") and stats else keys
    )


@pytest.mark.parametrize("bn", ["with-layer", "keep", "separate"])
def test_bn_policies_equal_the_naive_loop(bn: str, bn_run, tmp_path: Path) -> None:
    """reinit: the unit's parameters := τ, and under `with-layer` the BN it feeds, parameters
    AND running statistics, := τ; under `keep` every BN stays final; `separate` makes each BN
    its own unit. rerandom: the BN it resets is back at init (1, 0, mean 0, var 1). fullmodel:
    every key but num_batches_tracked := τ, BN layers excepted under `keep`. Each row equals
    the naive loop's numbers exactly."""
    from layerfast.analysis import analyze
    from layerfast.variants import derive_seed

    ck, sds = bn_run
    with torch.random.fork_rng():
        res = analyze(
            "bnnet_audit:make",
            ck,
            data="digits",
            bn=bn,
            seeds=[1, 2],
            device="cpu",
            precision="fp32",
            out=tmp_path / "o",
            progress=False,
            figures=False,
        )
    model = BNNet()
    naive = Naive(model, sds[2])
    want_units = ["conv1", "conv2", "fc", "head"]
    if bn == "separate":
        want_units = ["conv1", "bn1", "conv2", "bn2", "fc", "bnf", "head"]
    assert [u.name for u in res.units] == want_units
    for _, r in res.table.iterrows():
        unit, kind = r["unit"], r["kind"]
        mods = [unit] + ([FED[unit]] if bn == "with-layer" and unit in FED else [])
        if kind == "baseline":
            want = {}
        elif kind == "reinit":
            tau = sds[int(r["checkpoint"])]
            want = {k: tau[k] for m in mods for k in _module_keys(m)}
        elif kind == "fullmodel":
            want = {
                k: v
                for k, v in sds[int(r["checkpoint"])].items()
                if "num_batches" not in k and not (bn == "keep" and k.startswith("bn"))
            }
        else:
            want = {}
            for m in mods:
                fresh = type(model.get_submodule(m))(*_ctor_args(model.get_submodule(m)))
                torch.manual_seed(derive_seed("layerfast-rerandom", int(r["seed"]), unit, m))
                fresh.reset_parameters()
                want.update(
                    {f"{m}.{k}": v for k, v in fresh.state_dict().items() if "num_batches" not in k}
                )
        assert_row_equals(r, naive.row(want), f"{bn}: {kind} {unit} {r['checkpoint']}")


def _ctor_args(m: nn.Module) -> tuple:
    if isinstance(m, nn.Conv2d):
        return (m.in_channels, m.out_channels, m.kernel_size, 1, m.padding)
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    return (m.num_features,)


def test_joint_reset_via_units_patterns_equals_the_naive_loop(bn_run, tmp_path: Path) -> None:
    """DESIGN §3: modules one `--units` pattern matches form one unit, reset together (with the
    BN layers they feed, under `with-layer`): a joint reset."""
    from layerfast.analysis import analyze
    from layerfast.variants import derive_seed

    ck, sds = bn_run
    with torch.random.fork_rng():
        res = analyze(
            "bnnet_audit:make",
            ck,
            data="digits",
            units="re:^conv[12]$,head",
            seeds=[3],
            reset="reinit,rerandom",
            device="cpu",
            precision="fp32",
            out=tmp_path / "o",
            progress=False,
            figures=False,
        )
    model = BNNet()
    naive = Naive(model, sds[2])
    members = {"re:^conv[12]$": ["conv1", "bn1", "conv2", "bn2"], "head": ["head"]}
    rows = res.table[res.table["kind"] != "baseline"]
    assert set(rows["unit"]) == set(members) and len(rows) == 2 * (3 + 1)
    for _, r in rows.iterrows():
        mods = members[r["unit"]]
        if r["kind"] == "reinit":
            tau = sds[int(r["checkpoint"])]
            want = {k: tau[k] for m in mods for k in _module_keys(m)}
        else:
            want = {}
            for m in mods:
                fresh = type(model.get_submodule(m))(*_ctor_args(model.get_submodule(m)))
                torch.manual_seed(derive_seed("layerfast-rerandom", 3, r["unit"], m))
                fresh.reset_parameters()
                want.update(
                    {f"{m}.{k}": v for k, v in fresh.state_dict().items() if "num_batches" not in k}
                )
        assert_row_equals(r, naive.row(want), f"{r['kind']} {r['unit']} {r['checkpoint']}")


def test_interp_equals_the_formula_and_the_naive_loop(bn_run) -> None:
    """θ = (1−α)·θ^τ + α·θ^final on the unit's keys, + σ·N(0, 1) on its floating parameters only
    (never BN statistics, never num_batches_tracked), reproducible per seed, other seeds other
    noise; evaluated by `Evaluator` exactly as the naive loop; the model is the final model
    again afterwards, tensor for tensor."""
    from layerfast.data import open_data
    from layerfast.engine import Evaluator

    ck, sds = bn_run
    model = BNNet()
    model.load_state_dict(sds[2])
    units = make_units(model)
    unit = next(u for u in units if u.name == "conv2")
    spec = [("conv2", 0, 0.3, 0.0), ("conv2", 1, 1.7, 0.0), ("conv2", 1, 0.5, 0.05)]
    vs = make_variants(model, units, CheckpointDir(ck), reset=(), seeds=(1, 2), interp=spec)
    plain0, plain1, noisy1, noisy2 = vs[1:]
    keys = _module_keys("conv2") + _module_keys("bn2")
    assert set(unit.keys) == set(keys)
    for v, (tau, alpha) in ((plain0, (0, 0.3)), (plain1, (1, 1.7))):
        got = v.overrides()
        assert set(got) == set(keys)
        for k in keys:
            want = ((1 - alpha) * sds[tau][k].double() + alpha * sds[2][k].double()).float()
            assert torch.equal(got[k], want), (alpha, k)
    mid = {k: ((0.5 * sds[1][k].double() + 0.5 * sds[2][k].double()).float()) for k in keys}
    n1, n1_again, n2 = noisy1.overrides(), noisy1.overrides(), noisy2.overrides()
    for k in keys:
        assert torch.equal(n1[k], n1_again[k]), k  # reproducible
        if "running" in k:  # no noise on statistics
            assert torch.equal(n1[k], mid[k]) and torch.equal(n2[k], mid[k]), k
        else:
            noise = (n1[k].double() - mid[k].double()).flatten()
            assert 0.02 < float(noise.std()) < 0.1 and not torch.equal(n1[k], n2[k]), k

    before = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    src = open_data("digits", split="test")
    with torch.random.fork_rng():
        res = Evaluator(model, vs, device="cpu", precision="fp32").run(src)
    for k, t in model.state_dict(keep_vars=True).items():
        assert t is before[k][0] and torch.equal(t, before[k][1]), k
    naive = Naive(BNNet(), sds[2])
    for i, v in enumerate(vs):
        err, top5, loss, agree = naive.row(v.overrides())
        c = res.counts[i]
        assert (res.n - c[0].item()) / res.n == err and (res.n - c[1].item()) / res.n == top5
        assert c[3].item() / res.n == agree and c[2].item() / res.n == pytest.approx(loss, rel=1e-6)


def test_joint_entries_are_read_as_written(tmp_path: Path) -> None:
    """A joint entry given as one string (`"0+2"`, the name the results give the unit) was read
    character by character ('no unit named '+''), and `(names, numpy.int64(1))` as a list of
    names ('no unit named "['0', '2']"'). The string is refused saying what to write; any
    integer τ is a τ."""
    import numpy as np

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    for tau in (0, 1):
        torch.save(net.state_dict(), tmp_path / f"e_{tau}.pt")
    units, ck = make_units(net), CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError, match=r"a list of unit names.*not the string '0\+2'"):
        make_variants(net, units, ck, reset=(), joint=["0+2"])
    vs = make_variants(net, units, ck, reset=(), joint=[(["0", "2"], np.int64(1))])
    assert [v.label for v in vs[1:]] == ["joint 0+2 @1"]


class _NumpyLinear(nn.Linear):
    """A user layer whose init draws from numpy's and Python's global generators."""

    def reset_parameters(self) -> None:
        import random

        import numpy as np

        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(np.random.randn(*self.weight.shape)).float())
            self.bias.fill_(random.gauss(0.0, 1.0))


def test_rerandom_draws_from_numpy_init_are_reproducible_per_seed() -> None:
    """The draw seeded torch's generator only: a `reset_parameters` drawing from numpy or
    `random` gave another "seed 1" draw on every call (and on a resumed run), and moved the
    caller's numpy and `random` states."""
    import random

    import numpy as np

    from layerfast.variants import rerandom_draw

    net = nn.Sequential(_NumpyLinear(4, 3))
    (unit,) = make_units(net)
    np.random.seed(0)
    random.seed(0)
    expected = (np.random.rand(), random.random())
    np.random.seed(0)
    random.seed(0)
    first = rerandom_draw(net, unit, 1)
    assert (np.random.rand(), random.random()) == expected  # the caller's states untouched
    again, other = rerandom_draw(net, unit, 1), rerandom_draw(net, unit, 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["0.weight"], other["0.weight"])
    assert not torch.equal(first["0.bias"], other["0.bias"])

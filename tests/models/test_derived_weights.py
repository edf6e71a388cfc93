"""User layers whose weight is not a parameter: pruning and the old-style `weight_norm` /
`spectral_norm` (a forward pre-hook computes `weight` from other tensors before each call), and
lazy modules (no shape until a first forward). Found by a units/variants zoo; each case failed
before its fix:
- rerandom drew into the recomputed `weight` and left `weight_orig` / `weight_g` / `weight_v`
  at the final model: only the bias was redrawn, with no word said;
- reinit of an old-style spectral_norm layer kept the final model's `weight_u` / `weight_v`, so
  its effective weight was not checkpoint τ's;
- a model with `nn.LazyLinear` ended `analyze` in a traceback (exit 1).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import layerfast
from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.models import build_model
from layerfast.units import make_units
from layerfast.variants import make_variants


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is as fast and does not fight the other tests."""


def _pruned(lin: nn.Linear) -> nn.Linear:
    return prune.l1_unstructured(lin, "weight", amount=0.5)


def _old_weight_norm(lin: nn.Linear) -> nn.Linear:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for the parametrization
        return nn.utils.weight_norm(lin)


WRAPS: dict[str, Callable[[nn.Linear], nn.Linear]] = {
    "prune": _pruned,
    "old_weight_norm": _old_weight_norm,
    "old_spectral_norm": nn.utils.spectral_norm,
}


def _net(wrap: Callable[[nn.Linear], nn.Linear]) -> nn.Sequential:
    return nn.Sequential(wrap(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("name", list(WRAPS))
def test_rerandom_of_a_layer_whose_weight_a_pre_hook_derives_is_refused(name: str) -> None:
    torch.manual_seed(0)
    m = _net(WRAPS[name])
    units = [u for u in make_units(m) if u.name == "0"]
    with pytest.raises(LayerfastError, match=r"cannot re-randomize module 0 of unit '0': a "
                                             r"forward pre-hook derives its weight"):
        make_variants(m, units, None, reset="rerandom", seeds=(1, 2))
    others = [u for u in make_units(m) if u.name == "2"]  # the plain layer still redraws
    assert len(make_variants(m, others, None, reset="rerandom", seeds=(1,))) == 2


@pytest.mark.parametrize(("name", "buffers"), [("prune", ["0.weight_mask"]),
                                               ("old_weight_norm", []),
                                               ("old_spectral_norm", ["0.weight_u", "0.weight_v"])])
def test_the_buffers_that_decide_a_derived_weight_are_the_units(name: str,
                                                                 buffers: list[str]) -> None:
    torch.manual_seed(0)
    (unit,) = [u for u in make_units(_net(WRAPS[name])) if u.name == "0"]
    params = {"prune": ["0.weight_orig"], "old_weight_norm": ["0.weight_g", "0.weight_v"],
              "old_spectral_norm": ["0.weight_orig"]}[name]
    assert sorted(unit.keys) == sorted(["0.bias", *params, *buffers])


class Tempered(nn.Linear):
    """A constant as a plain attribute, an unrelated buffer, and a pre-hook that only checks
    the input: nothing here is derived, and the layer redraws like any Linear."""

    def __init__(self) -> None:
        super().__init__(16, 16)
        self.temp = torch.tensor(2.0)
        self.register_buffer("calls", torch.zeros(()))
        self.register_forward_pre_hook(lambda mod, args: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / self.temp


def test_a_benign_pre_hook_and_a_constant_are_not_a_derived_weight() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(Tempered(), nn.ReLU(), nn.Linear(16, 3))
    (unit,) = [u for u in make_units(m) if u.name == "0"]
    assert sorted(unit.keys) == ["0.bias", "0.weight"]
    assert len(make_variants(m, [unit], None, reset="rerandom", seeds=(1, 2))) == 3


def test_reinit_of_an_old_spectral_norm_layer_is_that_checkpoints_layer(tmp_path: Path) -> None:
    """The power iteration's u and v decide the weight in eval: with the final model's, the
    'reinit to τ = 0' layer was 6× smaller than τ = 0's."""
    torch.manual_seed(0)
    m = _net(nn.utils.spectral_norm)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for tau in range(3):  # train mode: every forward updates u and v
        torch.save(m.state_dict(), tmp_path / f"epoch_{tau}.pt")
        for _ in range(20):
            opt.zero_grad()
            m(torch.randn(32, 16)).square().mean().backward()
            opt.step()
    ck = CheckpointDir(tmp_path)
    m.eval().load_state_dict(ck.tensors(2))
    with torch.no_grad():
        m(torch.zeros(1, 16))  # the derived weight again a leaf (deepcopy refuses a non-leaf)
    units = [u for u in make_units(m) if u.name == "0"]
    (var,) = [v for v in make_variants(m, units, ck, reset="reinit", checkpoints=[0])
              if v.kind == "reinit"]
    reset = copy.deepcopy(m)
    reset.load_state_dict(var.overrides(), strict=False)
    at0 = _net(nn.utils.spectral_norm).eval()
    at0.load_state_dict(ck.tensors(0))
    x = torch.randn(4, 16)
    with torch.no_grad():  # an eval forward computes each one's weight from its u, v
        reset(x)
        at0(x)
    torch.testing.assert_close(reset[0].weight, at0[0].weight)


LAZY = """
import torch
from torch import nn


class Lazy(nn.Module):
    def __init__(self, num_classes=5, in_shape=None):
        super().__init__()
        self.l1 = nn.LazyLinear(16)
        self.bn = nn.LazyBatchNorm1d()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.l1(x.flatten(1)))))


def bad(num_classes=5, in_shape=None):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(8), nn.Linear(9, num_classes))


def frozen_bn(num_classes=5, in_shape=None):
    m = Lazy(num_classes)
    m.bn.eval()  # a factory that freezes a submodule in eval mode
    return m
"""


def test_a_model_with_lazy_modules_is_analysed(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "lazymods.py").write_text(LAZY)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model, _ = build_model("lazymods:Lazy", 5, (1, 8, 8))
    assert model.training and model.l1.weight.shape == (16, 64)
    assert int(model.bn.num_batches_tracked) == 0  # shapes from an eval forward: no statistics
    frozen, _ = build_model("lazymods:frozen_bn", 5, (1, 8, 8))
    assert frozen.training and not frozen.bn.training  # each module's own mode comes back
    (tmp_path / "ck").mkdir()
    for tau in (0, 1):
        torch.save(model.state_dict(), tmp_path / "ck" / f"epoch_{tau}.pt")
        with torch.no_grad():
            model.l1.weight.mul_(1.5)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=g.standard_normal((20, 1, 8, 8)).astype(np.float32),
             y=g.integers(0, 5, 20))  # fmt: skip
    res = layerfast.analyze("lazymods:Lazy", tmp_path / "ck", data=str(tmp_path / "x.npz"),
                            out=tmp_path / "o", device="cpu", progress=False, figures=False)
    assert set(res.table["unit"]) == {"*", "l1", "fc"} and res.table["error"].notna().all()
    with pytest.raises(LayerfastError, match=r"cannot build lazymods:bad: its lazy modules take "
                                             r"their shapes from a forward of inputs \(1, 8, 8\)"):
        build_model("lazymods:bad", 5, (1, 8, 8))

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
from pathlib import Path

import pytest
import torch
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
        analyze("fcn3x256", ckpts, reset="reinit", checkpoints=[], device="cpu",
                out=tmp_path / "o", progress=False, figures=False)  # fmt: skip
    assert not (tmp_path / "o").exists()

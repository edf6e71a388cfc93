"""Units review: granularities, `--units` patterns and `--bn` policies on user models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.units import make_units
from layerfast.variants import make_variants


class SharedNorm(nn.Module):
    """One BatchNorm used twice, registered under two names (`norm2 = bn`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 5)
        self.norm2 = self.bn
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.fc1(x)))
        return self.head(torch.relu(self.norm2(self.fc2(h))))


def _shared_norm_run(tmp_path: Path) -> SharedNorm:
    for tau in (0, 1):
        torch.manual_seed(tau)
        m = SharedNorm()
        with torch.no_grad():
            m.bn.running_mean.normal_()
            m.bn.running_var.uniform_(0.5, 2)
            m.bn.weight.normal_()
        torch.save(m.state_dict(), tmp_path / f"epoch_{tau}.pt")
    return SharedNorm()


def test_fullmodel_under_bn_keep_leaves_a_norm_with_two_names_at_final(tmp_path: Path) -> None:
    """DESIGN §3: `--bn keep` leaves normalization layers at the final model in `fullmodel`
    too. A BN registered under a second name (`self.norm2 = self.bn`) has its tensors in the
    state dict under both names; the keep filter knew only the first, so fullmodel loaded
    `norm2.*` from checkpoint τ and reset the (one, shared) BN after all."""
    model = _shared_norm_run(tmp_path)
    units = make_units(model, bn="keep")
    vs = make_variants(model, units, CheckpointDir(tmp_path), reset="fullmodel", checkpoints=[0])
    (v,) = [v for v in vs if v.kind == "fullmodel"]
    norm = [k for k in v.keys if k.split(".")[0] in ("bn", "norm2")]
    assert norm == [], norm
    assert {"fc1.weight", "fc2.weight", "head.weight"} <= set(v.keys)


class RootScale(nn.Module):
    """Parameters registered on the model itself: the unit `(root)`."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def test_no_match_error_names_the_root_unit_as_root() -> None:
    """The examples of module names in the no-match error showed the model's own parameters
    by their module name "" (`look like: , fc`): the name a pattern selects them by is
    `(root)`."""
    with pytest.raises(LayerfastError, match="matches no module") as err:
        make_units(RootScale(), patterns=["scale"])
    msg = str(err.value)
    assert "look like: (root), fc)" in msg, msg
    assert [u.name for u in make_units(RootScale(), patterns=["(root)"])] == ["(root)"]


def test_fullmodel_under_bn_keep_leaves_a_parametrized_norm_weight_at_final(
    tmp_path: Path,
) -> None:
    """A normalization layer with a parametrized weight (`weight_norm` on a LayerNorm) keeps
    it as `<norm>.parametrizations.weight.original*`: `--bn keep` left no unit holding those
    keys, yet fullmodel loaded them from checkpoint τ (the bias stayed at final, the weight
    did not)."""

    def net() -> nn.Module:
        m = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
        nn.utils.parametrizations.weight_norm(m[1], "weight", dim=0)
        return m

    for tau in (0, 1):
        torch.manual_seed(tau)
        torch.save(net().state_dict(), tmp_path / f"epoch_{tau}.pt")
    model = net()
    units = make_units(model, bn="keep")
    assert all(not k.startswith("1.") for u in units for k in u.keys)
    vs = make_variants(model, units, CheckpointDir(tmp_path), reset="fullmodel", checkpoints=[0])
    (v,) = [v for v in vs if v.kind == "fullmodel"]
    assert [k for k in v.keys if k.startswith("1.")] == []
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} == set(v.keys)


def test_list_units_warns_about_tied_units_as_analyze_does(capsys) -> None:
    """`--list-units` is analyze's dry run: units sharing one tensor under two names (tied
    weights, `self.dec = nn.Sequential(self.enc, ...)`) were warned about by analyze only."""
    from torch import nn

    from layerfast.analysis import list_units

    class EncDec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(64, 16)
            self.dec = nn.Sequential(self.enc, nn.ReLU(), nn.Linear(16, 10))

        def forward(self, x):
            return self.dec(x.flatten(1))

    units = list_units(lambda: EncDec(), "digits", granularity="block")
    assert [u.name for u in units] == ["enc", "dec"]
    err = capsys.readouterr().err
    assert "units enc and dec share one tensor" in err and "tied weights" in err


def test_list_units_builds_the_model_for_the_manifests_class_count(tmp_path) -> None:
    """analyze builds the model for manifest.json's `num_classes`; the dry run built it for
    the data's, so a factory whose layers depend on the class count listed other units."""
    import json

    import torch
    from torch import nn

    from layerfast.analysis import list_units

    def per_class_heads(num_classes: int = 10) -> nn.Module:
        class Heads(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Linear(64, 8)
                self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(num_classes))

            def forward(self, x):
                h = self.body(x.flatten(1)).relu()
                return torch.cat([m(h) for m in self.heads], 1)
        return Heads()

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"checkpoints": [], "data": "digits", "num_classes": 3}))
    x, y = torch.randn(6, 64), torch.arange(6) % 10
    units = list_units(per_class_heads, (x, y, 10), ckpts=tmp_path)
    assert [u.name for u in units] == ["body", "heads.0", "heads.1", "heads.2"]
    assert len(list_units(per_class_heads, (x, y, 10))) == 11  # no ckpts: the data's 10

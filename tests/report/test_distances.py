"""distances(): hand-computed values, parameters only, float64, rerandom rows, missing τ0."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.distances import COLUMNS, distances
from layerfast.errors import LayerfastError
from layerfast.units import Unit
from layerfast.variants import make_variants


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1, dtype=dtype)
        self.bn = nn.BatchNorm1d(1, dtype=dtype)


FC = Unit("fc", ("fc", "bn"), ("fc.weight", "fc.bias", "bn.weight", "bn.bias",
                               "bn.running_mean", "bn.running_var"))  # fmt: skip


def state(w, b, bn_w=1.0, mean=0.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {
        "fc.weight": torch.tensor([w], dtype=dtype),
        "fc.bias": torch.tensor([b], dtype=dtype),
        "bn.weight": torch.tensor([bn_w], dtype=dtype),
        "bn.bias": torch.tensor([0.0], dtype=dtype),
        "bn.running_mean": torch.tensor([mean], dtype=dtype),
        "bn.running_var": torch.tensor([1.0], dtype=dtype),
        "bn.num_batches_tracked": torch.tensor(0),
    }


def test_hand_computed_values(tmp_path: Path) -> None:
    torch.save(state([1.0, 2.0], 2.0), tmp_path / "e_0.pt")
    # Δ = (0, 2, -3) on fc and -1 on bn.weight; running_mean moves by 100 but is a buffer
    torch.save(state([1.0, 4.0], -1.0, bn_w=0.0, mean=100.0), tmp_path / "e_1.pt")
    model = Net()
    model.load_state_dict(state([1.0, 4.0], -1.0, bn_w=0.0, mean=100.0))
    df = distances(model, [FC], CheckpointDir(tmp_path))
    assert list(df.columns) == COLUMNS
    assert list(df["checkpoint"]) == [0, 1]
    zero, one = df.iloc[0], df.iloc[1]
    assert (zero.l2, zero.l2_rel, zero.linf) == (0.0, 0.0, 0.0)
    norm0 = math.sqrt(1 + 4 + 4 + 1)  # fc.weight, fc.bias, bn.weight (bn.bias = 0)
    assert one.l2 == pytest.approx(math.sqrt(4 + 9 + 1), abs=1e-12)
    assert one.l2_rel == pytest.approx(math.sqrt(14) / norm0, abs=1e-12)
    assert one.linf == 3.0


def test_computed_in_float64(tmp_path: Path) -> None:
    big = 1e8
    torch.save(state([big, big], big, dtype=torch.float64), tmp_path / "e_0.pt")
    torch.save(state([big + 1, big], big, dtype=torch.float64), tmp_path / "e_1.pt")
    df = distances(Net(torch.float64), [FC], CheckpointDir(tmp_path), checkpoints=[1])
    assert df.iloc[0].l2 == 1.0 and df.iloc[0].linf == 1.0


def test_rerandom_rows_match_the_variants_draw(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    torch.save(model.state_dict(), tmp_path / "e_0.pt")
    torch.save(model.state_dict(), tmp_path / "e_3.pt")
    ck = CheckpointDir(tmp_path)
    vs = make_variants(model, [FC], ck, reset=("reinit", "rerandom"), seeds=(1, 2))
    by_variant = distances(model, [FC], ck, rerandom=vs)
    by_seed = distances(model, [FC], ck, rerandom=[1, 2])
    assert list(by_variant["checkpoint"]) == [0, 3, "rerandom:1", "rerandom:2"]
    assert by_variant.equals(by_seed)
    draw = vs[3].overrides()  # rerandom seed 1
    theta0 = model.state_dict()
    want = math.sqrt(
        sum(float(((draw[k].double() - theta0[k].double()) ** 2).sum()) for k in FC.keys[:4])
    )
    assert by_seed.iloc[2].l2 == pytest.approx(want, rel=1e-12)
    assert by_seed.iloc[2].l2 > 0 and by_seed.iloc[2].l2 != by_seed.iloc[3].l2


def test_missing_tau0(tmp_path: Path) -> None:
    torch.save(state([1.0, 2.0], 2.0), tmp_path / "e_4.pt")
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError, match="need τ=0; found labels 4"):
        distances(Net(), [FC], ck)
    empty = distances(Net(), [FC], ck, rerandom=[1], checkpoints=())
    assert list(empty.columns) == COLUMNS and len(empty) == 0
    assert len(distances(Net(), [FC], None, rerandom=[1], checkpoints=())) == 0


def test_zero_init_unit_has_nan_relative_distance(tmp_path: Path) -> None:
    sd = state([0.0, 0.0], 0.0, bn_w=0.0)
    torch.save(sd, tmp_path / "e_0.pt")
    torch.save(state([0.0, 1.0], 0.0, bn_w=0.0), tmp_path / "e_1.pt")
    row = distances(Net(), [FC], CheckpointDir(tmp_path)).iloc[1]
    assert row.l2 == 1.0 and math.isnan(row.l2_rel)


def test_a_nan_difference_is_nan_in_linf_too_not_zero(tmp_path: Path) -> None:
    # max(0.0, nan) is 0.0 in Python: a diverged (NaN) checkpoint used to read linf = 0 ("did
    # not move") next to l2 = NaN; the NaN in fc.weight must survive the later, finite tensors.
    torch.save(state([1.0, 2.0], 2.0), tmp_path / "e_0.pt")
    torch.save(state([float("nan"), 2.0], 5.0), tmp_path / "e_1.pt")
    row = distances(Net(), [FC], CheckpointDir(tmp_path), checkpoints=[1]).iloc[0]
    assert math.isnan(row.l2) and math.isnan(row.l2_rel) and math.isnan(row.linf)


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(2, 2, bias=False)
        self.dec = nn.Linear(2, 2, bias=False)
        self.dec.weight = self.enc.weight  # tied: one tensor under two state-dict names


def test_a_tied_parameter_counts_once_in_a_joint_unit(tmp_path: Path) -> None:
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.save({"enc.weight": w0, "dec.weight": w0}, tmp_path / "e_0.pt")
    torch.save({"enc.weight": w0 + 1, "dec.weight": w0 + 1}, tmp_path / "e_1.pt")
    joint = Unit("enc+dec", ("enc", "dec"), ("enc.weight", "dec.weight"))
    alone = Unit("enc", ("enc",), ("enc.weight",))
    df = distances(TiedNet(), [joint, alone], CheckpointDir(tmp_path), checkpoints=[1])
    # Δ is all ones (4 entries): ‖Δ‖ = 2 and ‖θ⁰‖ = √2, whichever names the unit reaches it by
    # (counted twice, the joint unit read 2·√2)
    assert list(df.l2) == [2.0, 2.0]
    assert list(df.l2_rel) == pytest.approx([2 / math.sqrt(2)] * 2)
    assert list(df.linf) == [1.0, 1.0]


@pytest.mark.parametrize(
    "kw", [{"checkpoints": [1.7]}, {"checkpoints": ["x"]}, {"checkpoints": [True]},
           {"checkpoints": (), "rerandom": [2.5]}],
)  # fmt: skip
def test_non_integer_labels_and_seeds_are_refused_not_truncated(tmp_path: Path, kw) -> None:
    # int(1.7) used to give the τ=1 row under label 1 (and seed 2.5 the draw of seed 2)
    torch.save(state([1.0, 2.0], 2.0), tmp_path / "e_0.pt")
    torch.save(state([1.0, 4.0], 2.0), tmp_path / "e_1.pt")
    with pytest.raises(LayerfastError, match="must be an integer"):
        distances(Net(), [FC], CheckpointDir(tmp_path), **kw)

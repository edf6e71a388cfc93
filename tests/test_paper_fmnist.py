"""The paper's FCN experiment on real data, on CPU (issue 6): FCN 3×256 trained on Fashion-MNIST
(Debian's `dataset-fashion-mnist`), analyzed with reinit, rerandom (3 seeds) and fullmodel.

Asserted: the exact invariants that must hold whatever the data shows —
- a reset to the final τ equals the baseline bit for bit;
- `fullmodel@τ` equals checkpoint τ's own test error recorded by the trainer (exact counts);
- the distance at τ0 is 0.
Whether Fashion-MNIST shows the paper's pattern (layer 1 critical at init, layers 2-4 robust,
re-randomization near chance) is a finding, printed and recorded in docs/reproduction.md, and
deliberately NOT asserted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
EPOCHS = 8


@pytest.mark.slow
def test_fcn_fashion_mnist_invariants(tmp_path):
    if not FMNIST.is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI must install dataset-fashion-mnist (see .ci/run)")
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    from layerfast.analysis import analyze
    from layerfast.train import train

    man = train("fcn3x256", "fashion-mnist", EPOCHS, tmp_path / "ckpts", lr=0.05, seed=0,
                device="cpu", progress=False)
    res = analyze("fcn3x256", tmp_path / "ckpts", data="fashion-mnist", seeds=3, device="cpu",
                  precision="fp32", out=tmp_path / "out", progress=False, figures=False)
    t = res.table
    n = int(t["n"].iloc[0])
    assert n == 10000
    base = t[t["kind"] == "baseline"].iloc[0]
    assert base["error"] < 0.2, "FCN 3x256 should train on Fashion-MNIST"
    final = max(c["epoch"] for c in man["checkpoints"])

    reinit = t[t["kind"] == "reinit"]
    units = list(dict.fromkeys(reinit["unit"]))
    assert units == ["fc1", "fc2", "fc3", "fc4"]
    for u in units:
        row = reinit[(reinit["unit"] == u) & (reinit["checkpoint"] == final)].iloc[0]
        assert row["error"] == base["error"] and row["loss"] == base["loss"], u
        assert row["agreement"] == 1.0

    full = t[t["kind"] == "fullmodel"]
    for c in man["checkpoints"]:
        row = full[full["checkpoint"] == c["epoch"]].iloc[0]
        assert n - round(row["error"] * n) == c["test_correct"], c

    d = res.distances
    at0 = d[d["checkpoint"].astype(str) == "0"]
    assert len(at0) == 4 and (at0["l2"] == 0).all() and (at0["linf"] == 0).all()

    # The finding (printed, not asserted): layer 1 at init vs layers 2-4; rerandom vs chance.
    print("\n" + res.summary())

"""The paper's FCN experiment on real data, on CPU (issue 6): FCN 3×256 trained on Fashion-MNIST
(Debian's `dataset-fashion-mnist`), analyzed with reinit, rerandom (3 seeds) and fullmodel.

Asserted: the exact invariants that must hold whatever the data shows —
- a reset to the final τ equals the baseline bit for bit;
- `fullmodel@τ` equals checkpoint τ's own test error recorded by the trainer (exact counts);
- the distance at τ0 is 0;
- every reset row's counts equal the naive loop's (reset, full forward, count) on the
  trained checkpoints, fp32.
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

    # Every reset row against the naive loop (reset, full forward, count) on the trained
    # checkpoints. The two checks above can hold without the engine's swap or prefix path
    # running at all (a variant equal to the final model is scored from the baseline's logits),
    # so this is what ties the reinit rows at τ < final to the trained weights.
    import torch

    from layerfast.data import open_data, to_device
    from layerfast.engine import naive_evaluate
    from layerfast.models import build_model

    src = open_data("fashion-mnist")
    model, _ = build_model("fcn3x256", 10, tuple(src.shape))
    sd = {c["epoch"]: torch.load(tmp_path / "ckpts" / c["file"], weights_only=True)
          for c in man["checkpoints"]}
    model.load_state_dict(sd[final])
    variants, rows = [], []
    for u in units:
        for tau in sorted(sd):
            variants.append({k: v for k, v in sd[tau].items() if k.startswith(f"{u}.")})
            rows.append(reinit[(reinit["unit"] == u) & (reinit["checkpoint"] == tau)].iloc[0])
    assert len(rows) == 4 * len(man["checkpoints"]) and all(len(v) == 2 for v in variants)
    counts = naive_evaluate(
        model, variants, lambda: (to_device(x, y, src, "cpu") for x, y in src.batches(1000)))
    for row, c in zip(rows, counts.tolist(), strict=True):
        assert (n - round(row["error"] * n), round(row["agreement"] * n)) == (c[0], c[3]), row

    d = res.distances
    at0 = d[d["checkpoint"].astype(str) == "0"]
    assert len(at0) == 4 and (at0["l2"] == 0).all() and (at0["linf"] == 0).all()

    # The finding (printed, not asserted): layer 1 at init vs layers 2-4; rerandom vs chance.
    print("\n" + res.summary())

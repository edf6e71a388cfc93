"""`layerfast demo`: the whole workflow on data that ships with layerfast, in about a minute on
two CPU cores — train the paper's FCN on the 8×8 `digits` set saving a checkpoint schedule,
analyze every layer (re-initialization to each τ, 3 re-randomizations, the full-model rows),
and write the report."""

from __future__ import annotations

from pathlib import Path

from layerfast.analysis import Analysis, analyze
from layerfast.train import train

EPOCHS = 30
LR = 0.05


def demo(out: str | Path = "layerfast-demo", progress: bool = True) -> Analysis:
    out = Path(out)
    ckpts = out / "checkpoints"
    train("fcn3x256", "digits", EPOCHS, ckpts, lr=LR, seed=0, device="cpu", progress=progress,
          overwrite=True)
    res = analyze("fcn3x256", ckpts, data="digits", seeds=3, device="cpu", precision="fp32",
                  out=out / "analysis", fresh=True, progress=progress)
    print(res.summary())
    print(f"\ndemo: checkpoints in {ckpts}/, results, heatmap.png and distances.png in {res.out}/")
    return res

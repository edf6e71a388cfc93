"""`layerfast demo`: the whole workflow on data that ships with layerfast, in about a minute on
two CPU cores — train the paper's FCN on the 8×8 `digits` set saving a checkpoint schedule,
analyze every layer (re-initialization to each τ, 3 re-randomizations, the full-model rows),
and write the report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from layerfast.analysis import Analysis, analyze
from layerfast.errors import LayerfastError, refused_paths_are_input
from layerfast.exclusive import exclusive
from layerfast.options import check_dir_path, flag
from layerfast.train import train

EPOCHS = 30
LR = 0.05


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the demo on one intra-op thread. Its matmuls are tiny (64→256→256→256→10, batch 128),
    so a second thread gains nothing, and on a busy machine OpenMP's spin-waiting barriers make
    two threads several times slower than one (measured: 6× on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@refused_paths_are_input
@exclusive
def demo(out: str | Path = "layerfast-demo", progress: bool = True) -> Analysis:
    """Train, analyze and report into `out`. Reruns start over (`overwrite`, `fresh`): the demo
    retrains, so progress from an earlier demo belongs to other weights and must not be resumed.
    fp32 on the CPU so that every machine prints the same table as the README."""
    progress = flag(progress, "progress")
    check_dir_path(out)
    if not str(out).strip():  # Path("") would put checkpoints/ and analysis/ in the cwd
        raise LayerfastError("--out is empty: name a directory for the demo's files")
    out = Path(out)
    # else train names out/checkpoints, not what is wrong
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        what = "a dangling symbolic link" if not out.exists() else "not a directory"
        raise LayerfastError(f"--out {out} is {what}: the demo writes checkpoints/ and "
                             "analysis/ into it; remove it or choose another --out")
    ckpts = out / "checkpoints"
    with _one_thread():
        train("fcn3x256", "digits", EPOCHS, ckpts, lr=LR, seed=0, device="cpu",
              progress=progress, overwrite=True)
        res = analyze("fcn3x256", ckpts, data="digits", seeds=3, device="cpu", precision="fp32",
                      out=out / "analysis", fresh=True, progress=progress)
    print(res.summary())
    print(f"\ndemo: report in {res.out}/ (results.csv, heatmap.png, distances.png, run.json); "
          f"checkpoints in {ckpts}/")
    return res

"""`digits`: the zero-setup dataset, shipped inside the package.

The 1,797 8x8 images (values 0..16) of the UCI Optical Recognition of Handwritten Digits set,
as embedded in scikit-learn (CC BY 4.0), were extracted once into `digits.npz` so layerfast
needs neither scikit-learn nor a download for `layerfast demo`. The split is stored in the file
(`perm` = `numpy.random.RandomState(0).permutation(1797)`: train = first 1437, test = last
360), so it can never drift with a NumPy or scikit-learn release.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from layerfast.data.source import ArrayReader, DataSource, make_source
from layerfast.errors import LayerfastError

PATH = Path(__file__).with_name("digits.npz")
N_TOTAL, N_TEST = 1797, 360
# Mean and std of x/16 over all 1797 images (computed once, see docs/data.md).
MEAN, STD = (0.3053,), (0.3760,)


def split_indices(perm: np.ndarray, split: str) -> np.ndarray:
    """Indices into the 1797 images for `split`, in the stored permuted order."""
    perm = perm.astype(np.int64)
    return perm[N_TOTAL - N_TEST :] if split == "test" else perm[: N_TOTAL - N_TEST]


def open_digits(split: str, max_samples: int | None) -> DataSource:
    if not PATH.is_file():
        raise LayerfastError(
            f"digits: {PATH} is missing from the installation; reinstall layerfast"
        )
    with np.load(PATH, allow_pickle=False) as f:
        x, y, perm = f["x"], f["y"], f["perm"]
    idx = split_indices(perm, split)
    xs = torch.from_numpy(np.ascontiguousarray(x[idx]))
    ys = torch.from_numpy(y[idx].astype(np.int64))
    return make_source(
        "digits", ArrayReader(xs, ys), total=len(idx), num_classes=10, shape=(1, 8, 8),
        mean=MEAN, std=STD, scale=16.0, max_samples=max_samples,
    )  # fmt: skip

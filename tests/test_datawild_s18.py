"""Data specs as researchers actually have them (DESIGN.md §4, docs/data.md): files written on
other machines and by other tools, folders with the junk real folders hold. Each case is fed
exactly as docs/data.md says or refused with one LayerfastError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.data import open_data
from layerfast.errors import LayerfastError

RNG = np.random.default_rng(18)


def _all(src):  # noqa: ANN001, ANN202 - a DataSource; (x, y) of every sample
    xs, ys = zip(*src.batches(7), strict=True)
    return torch.cat(xs), torch.cat(ys)


# --- npz ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
def test_npz_big_endian_float_x_is_fed_as_its_values(tmp_path: Path, dtype: str) -> None:
    """A big-endian float array (FITS files, data written on another machine or by MATLAB) is
    float data: it was refused with "has dtype >f4; use ... float32", a message that
    contradicts itself, because the dtype check compared byte orders too."""
    x = RNG.random((9, 2, 5)).astype(np.float32)
    y = np.arange(9) % 3
    np.savez(tmp_path / "be.npz", x=x.astype(dtype), y=y.astype(">i8"))
    src = open_data(tmp_path / "be.npz")
    X, Y = _all(src)
    want = torch.from_numpy(x.astype(dtype).astype(np.float32))[:, None]
    assert X.dtype == torch.float32 and torch.equal(X, want) and src.scale == 1.0
    assert Y.tolist() == y.tolist() and src.num_classes == 3


def test_npz_big_endian_float_nan_is_still_refused(tmp_path: Path) -> None:
    x = RNG.random((3, 4)).astype(">f4")
    x[1, 2] = np.nan
    np.savez(tmp_path / "be.npz", x=x, y=np.arange(3))
    with pytest.raises(LayerfastError, match=r"be\.npz.*NaN or Inf .*sample 1"):
        open_data(tmp_path / "be.npz")

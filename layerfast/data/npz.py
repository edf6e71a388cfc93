"""`PATH.npz`: arrays `x` [N,...] and `y` [N], for data that fits no other spec.

The file is loaded with `allow_pickle=False`, so object arrays (which would unpickle) are
refused. uint8 `x` is scaled to [0,1] on the device; float `x` is fed exactly as stored (the
user already normalised it), so no mean/std is applied to either.

Splits: `x_test`/`y_test` and `x_train`/`y_train` are used for `--split test|train` when the
file has them; otherwise `x`/`y` is the data whatever the split. An optional scalar
`num_classes` fixes the class count when the labels present do not cover every class.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from layerfast.data.source import (
    ArrayReader,
    DataSource,
    check_finite,
    check_labels,
    make_source,
    to_chw,
)
from layerfast.errors import LayerfastError

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise LayerfastError(f"npz: file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise LayerfastError(f"npz: cannot read {path}: {exc.strerror or exc}") from exc
    if head[:4] not in _ZIP_MAGICS:
        # np.load falls back to unpickling anything that is not zip/npy, so without this a text
        # file would be reported as "holds object arrays"
        what = "a single .npy array" if head == b"\x93NUMPY" else "not a zip archive"
        raise LayerfastError(
            f"npz: {path} is not a .npz file ({what}); write one with numpy.savez(path, x=..., "
            "y=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise LayerfastError(
                f"npz: {path} holds object arrays, which would need unpickling; store plain "
                "numeric arrays x and y"
            ) from exc
        raise LayerfastError(f"npz: cannot read {path}: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # zlib: corrupt deflate
        raise LayerfastError(
            f"npz: cannot read {path}: not a valid .npz or truncated ({exc})"
        ) from exc
    except MemoryError as exc:  # a header that declares more than the machine holds
        raise LayerfastError(f"npz: {path}: an array does not fit in memory ({exc})") from None


def open_npz(path: Path, split: str, max_samples: int | None) -> DataSource:
    return open_arrays(_load(path), f"npz: {path}", path.name, split, max_samples)


def open_arrays(arrays: dict[str, np.ndarray], where: str, name: str, split: str,
                max_samples: int | None) -> DataSource:
    """The DataSource of a .npz file's arrays; every check of the file's contents is here.
    `where` starts each message (`npz: PATH`), `name` names the source. Also how
    `layerfast.inputs` validates an in-memory `(x, y)` before writing it as a .npz: one set
    of rules, so the pair is accepted, refused and fed exactly as the saved file would be."""
    kx, ky = (f"x_{split}", f"y_{split}") if f"x_{split}" in arrays else ("x", "y")
    if kx not in arrays or ky not in arrays:
        raise LayerfastError(
            f"{where} must hold arrays 'x_{split}' and 'y_{split}', or 'x' and 'y'; it has "
            f"{sorted(arrays) or 'none'}"
        )
    x, y = arrays[kx], arrays[ky]
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise LayerfastError(
            f"{where}: '{kx}' has shape {x.shape} but '{ky}' has shape {y.shape}; "
            "need the same number of samples N and y of shape [N]"
        )
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.size != 1 or nc.dtype == np.bool_ or not np.issubdtype(nc.dtype, np.integer):
            raise LayerfastError(
                f"{where}: 'num_classes' must be one integer, got dtype {nc.dtype} and "
                f"shape {nc.shape}"
            )
        num_classes = int(nc.reshape(()))
        counted: tuple[str, ...] = ()
    else:
        # every y array, not only the split's: test labels that miss a class still get the
        # train split's count (docs/data.md), and a message names the arrays counted
        ys = {k: check_labels(f"{where}: '{k}'", arrays[k])
              for k in arrays if k == "y" or k.startswith("y_")}
        counted = tuple(k for k, t in ys.items() if len(t))
        num_classes = max(int(ys[k].max()) + 1 for k in counted) if counted else 0
    yt = check_labels(f"{where}: '{ky}'", y, num_classes if num_classes > 0 else None)
    if not x.dtype.isnative:
        # big-endian data (FITS files, arrays saved on another machine) holds the same values;
        # `x.dtype == np.float32` compares the byte order too, so '>f4' was refused as "not
        # float32", and torch.from_numpy takes only the native order
        x = x.astype(x.dtype.newbyteorder("="))
    if x.dtype == np.uint8:
        scale = 255.0
    elif x.dtype in (np.float32, np.float64, np.float16):
        with np.errstate(over="ignore"):  # a float64 beyond float32's range -> Inf, refused next
            x, scale = x.astype(np.float32, copy=False), 1.0
        # a float32 view with negative strides (an in-memory `x[::-1]`, layerfast.inputs) is
        # kept by astype(copy=False), and torch.from_numpy refuses it with a ValueError; a
        # loaded file's array is contiguous already, so this copies nothing there
        x = np.ascontiguousarray(x)
        # after the float32 cast, where a too-large float64 became Inf
        check_finite(f"{where}: '{kx}' (as float32)", torch.from_numpy(x))
    else:
        raise LayerfastError(
            f"{where}: '{kx}' has dtype {x.dtype}; use uint8 (scaled to [0,1]) or float32 "
            "(fed as is)"
        )
    x = np.ascontiguousarray(to_chw(name, x))
    return make_source(
        name, ArrayReader(torch.from_numpy(x), yt), total=len(yt), num_classes=num_classes,
        shape=tuple(x.shape[1:]), mean=None, std=None, scale=scale, max_samples=max_samples,
        classes_from_labels=counted,
    )  # fmt: skip

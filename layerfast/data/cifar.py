"""`cifar10:DIR`: the python pickle batches (`data_batch_1..5`, `test_batch`).

The batches are pickles, and an ordinary `pickle.load` runs whatever code the file names.
They are plain dicts of numpy arrays and lists, so they are read with an unpickler that
resolves only numpy's array-reconstruction globals and refuses everything else: a tampered
download fails with a message instead of executing.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerfast.data.source import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ArrayReader,
    DataSource,
    check_labels,
    make_source,
    need_dir,
)
from layerfast.errors import LayerfastError

# The only callables a CIFAR pickle needs, resolved from live objects (numpy moved them from
# numpy.core to numpy._core in 2.0; pickles written by either name them differently).
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # arrays in protocol-5 pickles
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes in protocol-2 pickles
    ("__builtin__", "bytes"): bytes,  # ... and empty bytes
    ("builtins", "bytes"): bytes,
}


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (as opposed to a truncated or garbled pickle)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(
                f"refusing to load global {module}.{name}: a CIFAR batch holds only numpy "
                "arrays and lists, and loading anything else could run arbitrary code"
            ) from None


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [N, 3072], labels [N]) from one CIFAR-10 pickle batch, safely."""
    try:
        raw = path.read_bytes()
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as exc:
        raise LayerfastError(f"cifar10: {path}: {exc}") from exc
    except Exception as exc:  # truncated or garbage files raise all sorts of errors
        raise LayerfastError(
            f"cifar10: cannot read {path}: not a CIFAR pickle batch or truncated "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise LayerfastError(f"cifar10: {path} holds a {type(obj).__name__}, not a batch dict")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in d or "labels" not in d:
        raise LayerfastError(
            f"cifar10: {path} lacks 'data' or 'labels' (keys: {sorted(map(str, d))})"
        )
    data, raw = d["data"], d["labels"]
    if not isinstance(raw, (list, tuple, np.ndarray)):  # None, 5, a dict: len() would raise
        raise LayerfastError(f"cifar10: {path}: 'labels' must be a list of class indices, "
                             f"got {type(raw).__name__}")
    try:
        labels = np.asarray(raw)
    except ValueError as exc:  # a ragged list of lists
        raise LayerfastError(f"cifar10: {path}: 'labels' is not a flat list ({exc})") from None
    if labels.size == 0:  # an empty list comes back as float64
        labels = labels.astype(np.int64)
    if labels.ndim != 1:
        raise LayerfastError(f"cifar10: {path}: 'labels' must be a flat list, has shape "
                             f"{labels.shape}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise LayerfastError(f"cifar10: {path}: 'data' must be a uint8 [N, 3072] array")
    if data.shape[1] != 3 * 32 * 32:
        raise LayerfastError(
            f"cifar10: {path}: 'data' rows have {data.shape[1]} values, expected 3072 (3x32x32)"
        )
    if len(labels) != len(data):
        raise LayerfastError(f"cifar10: {path}: {len(data)} images but {len(labels)} labels")
    # checked per batch file, so that a bad label names its file (docs/data.md)
    return data, check_labels(f"cifar10: {path}", labels, 10).numpy()


def batch_dir(directory: Path) -> Path:
    """DIR itself, or the `cifar-10-batches-py` folder the official tarball extracts to."""
    need_dir("cifar10", directory)
    nested = directory / "cifar-10-batches-py"
    if not (directory / "test_batch").exists() and nested.is_dir():
        return nested
    return directory


def open_cifar10(directory: Path, split: str, max_samples: int | None) -> DataSource:
    d = batch_dir(directory)
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise LayerfastError(
            f"cifar10: {', '.join(missing)} missing in {d} (expected the python batches "
            "data_batch_1..5 and test_batch)"
        )
    parts = [load_batch(d / n) for n in names]
    x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    y = check_labels("cifar10", np.concatenate([p[1] for p in parts]), 10)
    return make_source(
        "cifar10", ArrayReader(torch.from_numpy(x), y), total=len(y), num_classes=10,
        shape=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, scale=255.0,
        max_samples=max_samples,
    )  # fmt: skip

"""`DataSource`: what every spec becomes, and the checks every loader shares.

A spec module (idx, cifar, npz, ...) only has to produce a `Reader` -- something that yields
CPU batches for a sample range and returns all labels -- plus the normalisation constants.
Everything the rest of layerfast relies on (sequential order, the last partial batch kept,
`start` for resume, `max_samples`, clear errors for empty or badly labelled data) is enforced
here once, so no loader can get it subtly wrong on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from layerfast.errors import LayerfastError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


class Reader(Protocol):
    """The one thing a spec module implements: sequential CPU batches over `[start, stop)`."""

    def batches(self, batch_size: int, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield `(x, y)` for samples `start..stop-1` in order, the last batch possibly short."""
        ...

    def labels(self, stop: int) -> Tensor:
        """Labels of samples `0..stop-1` (int64), without decoding any image."""
        ...


class ArrayReader:
    """In-memory data (digits, idx, CIFAR, npz). Batches are views into one tensor: no copy on
    the host, the single copy is the host->device transfer in `to_device`."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x = x.contiguous()
        self.y = y.to(torch.int64).contiguous()

    def batches(self, batch_size: int, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            yield self.x[i:j], self.y[i:j]

    def labels(self, stop: int) -> Tensor:
        return self.y[:stop].clone()


@dataclass
class DataSource:
    """An opened dataset split: its shape and normalisation, and sequential CPU batches.

    Normalisation happens on the device (`to_device`): `x.float() / scale`, then
    `(x - mean) / std` per channel when `mean`/`std` are set. Keeping `x` uint8 until then makes
    the host->device copy 4x smaller than shipping floats.

    `classes_from_labels` says where `num_classes` came from: the label arrays whose largest
    label + 1 it is (a .npz's `y`, or every `y_*` it holds, not only the split's; a .beton's
    `label` field without a sidecar; `from_arrays`' `y`), or `()` where the data declares it
    (a fixed data set, an imagefolder's class folders, a .npz's `num_classes`, a .beton's
    sidecar, `from_arrays(num_classes=)`). A message about the class count says which: a
    count declared by the data is not fixed by adding a label.
    """

    name: str
    n: int
    num_classes: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    scale: float
    reader: Reader = field(repr=False, compare=False)
    classes_from_labels: tuple[str, ...] = ()

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """CPU batches `x` [b,C,H,W] (uint8, or float32 for float data) and `y` int64 [b], in
        sequential order from sample `start` (for resume); the last partial batch is kept.

        Batches may share memory with the dataset: treat them as read-only (`to_device` never
        writes into its input)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise LayerfastError(f"batch size must be a positive integer, got {batch_size!r}")
        if not isinstance(start, int) or not 0 <= start <= self.n:
            raise LayerfastError(f"{self.name}: start offset {start!r} is outside 0..{self.n}")
        if start == self.n:
            return iter(())
        return self.reader.batches(batch_size, start, self.n)

    def labels(self) -> Tensor:
        """All `n` labels (int64), without decoding images: for validation and planning."""
        return self.reader.labels(self.n)

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x: Tensor | np.ndarray,
        y: Tensor | np.ndarray,
        *,
        num_classes: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        scale: float = 1.0,
        max_samples: int | None = None,
    ) -> DataSource:
        """Wrap in-memory arrays `x` [N,C,H,W] and `y` [N] (for tests and research code)."""
        xt = torch.as_tensor(x)
        yt = check_labels(name, y, num_classes)
        if xt.dim() != 4:
            raise LayerfastError(f"{name}: x must be [N, C, H, W], got shape {tuple(xt.shape)}")
        if xt.shape[0] != yt.shape[0]:
            raise LayerfastError(
                f"{name}: x has {xt.shape[0]} samples but y has {yt.shape[0]} labels"
            )
        check_finite(f"{name}: x", xt)
        k = num_classes if num_classes is not None else int(yt.max()) + 1 if len(yt) else 0
        return make_source(
            name, ArrayReader(xt, yt), total=len(yt), num_classes=k,
            shape=tuple(xt.shape[1:]), mean=mean, std=std, scale=scale, max_samples=max_samples,
            classes_from_labels=("y",) if num_classes is None else (),
        )  # fmt: skip


def check_finite(what: str, x: Tensor, hint: str = "inputs must be finite") -> None:
    """Refuse NaN/Inf inputs, naming the samples: they make every prediction NaN, which an
    analysis would report as plain errors and training as a diverged learning rate, both
    pointing away from the data. Integer inputs are finite by construction."""
    if not x.is_floating_point() or x.numel() == 0:  # no samples: the caller says "empty"
        return
    finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(finite.all()):
        return
    bad = torch.nonzero(~finite).flatten().tolist()
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    raise LayerfastError(f"{what}: NaN or Inf values in {len(bad)} of {len(x)} samples "
                         f"(sample {shown}); {hint}")


def check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and (isinstance(max_samples, bool)  # True is not 1 sample
                                    or not isinstance(max_samples, int) or max_samples < 1):
        raise LayerfastError(f"--max-samples must be a positive integer, got {max_samples!r}")


def make_source(
    name: str,
    reader: Reader,
    *,
    total: int,
    num_classes: int,
    shape: tuple[int, ...],
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    scale: float,
    max_samples: int | None,
    classes_from_labels: tuple[str, ...] = (),
) -> DataSource:
    """Build a DataSource after the checks every spec shares (non-empty, sane shape/norm).
    `classes_from_labels`: the label arrays `num_classes` was counted from (`DataSource`)."""
    check_max_samples(max_samples)
    if total == 0:
        raise LayerfastError(f"{name}: the dataset is empty (0 samples)")
    if len(shape) != 3 or min(shape) < 1:
        raise LayerfastError(f"{name}: one sample must be (C, H, W), got {tuple(shape)}")
    if num_classes < 1:
        raise LayerfastError(f"{name}: no classes found")
    if (mean is None) != (std is None):
        raise LayerfastError(f"{name}: mean and std must both be given or both be None")
    if mean is not None and std is not None:
        if len(mean) != shape[0] or len(std) != shape[0]:
            raise LayerfastError(
                f"{name}: mean/std have {len(mean)}/{len(std)} entries for {shape[0]} channels"
            )
        if min(std) <= 0:
            raise LayerfastError(f"{name}: std must be positive, got {std}")
    n = total if max_samples is None else min(total, max_samples)
    c, h, w = (int(s) for s in shape)
    return DataSource(
        name=name, n=n, num_classes=int(num_classes), shape=(c, h, w),
        mean=None if mean is None else tuple(float(m) for m in mean),
        std=None if std is None else tuple(float(s) for s in std),
        scale=float(scale), reader=reader, classes_from_labels=tuple(classes_from_labels),
    )  # fmt: skip


def check_labels(name: str, y: Tensor | np.ndarray, num_classes: int | None = None) -> Tensor:
    """Labels as int64 [N]; refuses non-integer, negative or out-of-range labels up front, where
    the message can name the dataset (an index error deep in a loss kernel could not)."""
    arr = y.numpy() if isinstance(y, Tensor) else np.asarray(y)
    if arr.ndim != 1:
        raise LayerfastError(f"{name}: labels must be 1-D [N], got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise LayerfastError(f"{name}: labels must be integers, got dtype {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise LayerfastError(f"{name}: labels must be >= 0, found {int(arr.min())}")
    if arr.size and int(arr.max()) >= 2**63:  # uint64: the int64 cast below would wrap it to < 0
        raise LayerfastError(f"{name}: label {int(arr.max())} does not fit int64 (labels are "
                             "class indices 0..classes-1)")
    if arr.size and num_classes is not None and int(arr.max()) >= num_classes:
        raise LayerfastError(
            f"{name}: label {int(arr.max())} is out of range for {num_classes} classes"
        )
    return torch.from_numpy(arr.astype(np.int64, copy=False).copy())


def to_chw(name: str, x: np.ndarray) -> np.ndarray:
    """`x` [N,...] as [N,C,H,W], the one sample layout the models and the engine take.

    - [N,D] (flat feature vectors) -> [N,1,1,D]: one channel, a 1×D row. An FCN (or any model
      that flattens) sees the D values in their order; a conv net sees a 1-D signal with D
      positions, not D channels of a single pixel (where a 3×3 kernel would use only its
      centre tap). [N] is [N,1]: one feature.
    - [N,H,W] -> [N,1,H,W] (one channel: a grayscale image, whatever H and W).
    - [N,H,W,C] (C in 1,3 and dim 1 not) -> [N,C,H,W]; [N,C,H,W] is kept. 4-D arrays are NCHW
      unless the last axis looks like channels and the second does not: [N,32,32,3] is HWC,
      [N,3,32,32] and [N,1,28,28] are CHW.
    - More than 4 dims is refused: no one layout would be right for every model.
    """
    if x.ndim == 1:
        return x[:, None, None, None]
    if x.ndim == 2:
        return x[:, None, None, :]
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x
    raise LayerfastError(
        f"{name}: x must be [N], [N,D], [N,H,W], [N,C,H,W] or [N,H,W,C], got shape "
        f"{tuple(x.shape)}; reshape it to one of these"
    )


#: Archive suffixes a data directory is downloaded as (`cifar-10-python.tar.gz`).
_ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip", ".tar.xz", ".tar.bz2")


def need_dir(name: str, directory: Path, missing_hint: str = "") -> None:
    """`directory` is one, or one LayerfastError says what it is instead. An archive given as
    the folder (`cifar10:cifar-10-python.tar.gz`) is told to extract it; `missing_hint` (where
    to get the data) is added only when nothing is there: for a file, it pointed elsewhere."""
    if directory.is_dir():
        return
    if not directory.exists():
        raise LayerfastError(f"{name}: directory {directory} does not exist{missing_hint}")
    archive = directory.name.lower().endswith(_ARCHIVES)
    what = ("an archive: extract it and give the folder it holds" if archive
            else "a file, not a directory")
    raise LayerfastError(f"{name}: directory {directory} is {what}")

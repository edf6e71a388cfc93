"""`mnist:DIR` and `fashion-mnist[:DIR]`: LeCun's idx files, gzipped or not.

The idx header states the array's shape, so a truncated download is caught exactly (size
mismatch with the header) instead of surfacing as a reshape error or, worse, silently fewer
samples.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from layerfast.data.source import ArrayReader, DataSource, check_labels, make_source, need_dir
from layerfast.errors import LayerfastError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
#: torchvision's datasets download into ROOT/<class name>/raw/: `mnist:ROOT` names ROOT.
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE_MAGIC = b"\x00\x00\x08"  # two zero bytes, then type uint8


def find_file(name: str, directory: Path, prefix: str, kind: str, ndim: int) -> Path:
    """`{prefix}-{kind}-idx{ndim}-ubyte[.gz]`, also the `{kind}.idx` spelling some mirrors use.

    Missing, but present where torchvision's download puts it (`DIR/raw/`, `DIR/MNIST/raw/`
    for `torchvision.datasets.MNIST(root=DIR)`): the refusal names that folder as the spec to
    give, where it only said "no ... in DIR" of a folder that visibly holds MNIST."""
    stems = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / (stem + suffix)
            if p.is_file():
                return p
    for sub in (directory / "raw", directory / _TORCHVISION_DIRS[name] / "raw"):
        if any((sub / (stem + suffix)).is_file() for stem in stems for suffix in ("", ".gz")):
            raise LayerfastError(
                f"{name}: no {stems[0]} in {directory}, but {sub} has it (torchvision's "
                f"download layout): use the spec {name}:{sub}"
            )
    raise LayerfastError(
        f"{name}: no {stems[0]} (or {stems[0]}.gz) in {directory}; expected the idx files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (gzipped or not)"
    )


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(len(magic)) == magic


def read_idx(name: str, path: Path, ndim: int) -> np.ndarray:
    """Parse one idx file (uint8 payload) and check its size against the header exactly."""
    gz = path.suffix.lower() == ".gz"
    try:
        if gz and _starts_with(path, _IDX_UBYTE_MAGIC):
            # a browser that unpacked the download but kept its name: not "corrupt"
            raise LayerfastError(
                f"{name}: {path} is not gzip-compressed although its name ends in .gz (it is an "
                "uncompressed idx file): drop the .gz from its name"
            )
        if gz:
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise LayerfastError(f"{name}: cannot read {path}: corrupt or truncated ({exc})") from exc
    if len(data) < 4:
        raise LayerfastError(f"{name}: {path} is too short to be an idx file ({len(data)} bytes)")
    if data.startswith(_GZIP_MAGIC):  # read as idx it was "a bad idx magic number 0x1f8b0800"
        raise LayerfastError(
            f"{name}: {path} is gzip-compressed: name it {path.name}.gz, or gunzip it"
        )
    zero, dtype, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or nd != ndim:
        raise LayerfastError(
            f"{name}: {path} has a bad idx magic number 0x{data[:4].hex()} "
            f"(expected 0x0000080{ndim}: uint8, {ndim}-D)"
        )
    if dtype != _UBYTE:
        raise LayerfastError(
            f"{name}: {path} holds idx type 0x{dtype:02x}; only uint8 is supported"
        )
    head = 4 + 4 * ndim
    if len(data) < head:
        raise LayerfastError(f"{name}: {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    expected = head + math.prod(dims)  # Python ints: a wild header must not wrap around int64
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise LayerfastError(
            f"{name}: {path} is {what}: header says shape {dims} ({expected} bytes), "
            f"file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(dims)


def open_idx(name: str, directory: Path, split: str, max_samples: int | None) -> DataSource:
    hint = " (apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    need_dir(name, directory, hint)
    prefix = "t10k" if split == "test" else "train"
    x = read_idx(name, find_file(name, directory, prefix, "images", 3), 3)
    ypath = find_file(name, directory, prefix, "labels", 1)
    y = read_idx(name, ypath, 1)
    if len(x) != len(y):
        raise LayerfastError(
            f"{name}: {prefix} images and labels disagree: {len(x)} images, {len(y)} labels"
        )
    mean, std = NORMS[name]
    return make_source(
        name, ArrayReader(torch.from_numpy(x[:, None].copy()),
                          check_labels(f"{name}: {ypath}", y, 10)),  # name the file
        total=len(y), num_classes=10, shape=(1, *x.shape[1:]), mean=mean, std=std,
        scale=255.0, max_samples=max_samples,
    )  # fmt: skip

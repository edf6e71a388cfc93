"""Data specs as researchers actually have them (DESIGN.md §4, docs/data.md): files written on
other machines and by other tools, folders with the junk real folders hold. Each case is fed
exactly as docs/data.md says or refused with one LayerfastError naming the file."""

from __future__ import annotations

import gzip
import pickle
import struct
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


# --- imagefolder ----------------------------------------------------------------------------


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("junk", [".ipynb_checkpoints", "aaa_empty"])
def test_imagefolder_refuses_a_class_folder_without_images(tmp_path: Path, junk: str) -> None:
    """A class folder holding no image (Jupyter's hidden `.ipynb_checkpoints`, an emptied
    folder) became a class: every later class index shifted by one without a word (cat 0 ->
    1), so a model trained on the folder without it was scored against the wrong labels.
    torchvision's ImageFolder, whose class order docs/data.md promises, refuses it."""
    pytest.importorskip("PIL")
    _png(tmp_path / "cat" / "0.png")
    _png(tmp_path / "dog" / "0.png")
    (tmp_path / junk).mkdir()
    with pytest.raises(LayerfastError, match=rf"imagefolder: .*{junk}.* no images"):
        open_data(f"imagefolder:{tmp_path}")


def test_imagefolder_class_empty_in_one_split_keeps_its_index(tmp_path: Path) -> None:
    """A class with images in train/ only (its val/ folder empty or absent) is still a class:
    the split union of docs/data.md, not refused."""
    pytest.importorskip("PIL")
    for rel in ("train/ant/0.png", "train/bee/0.png", "train/cat/0.png", "val/ant/0.png",
                "val/cat/0.png"):  # fmt: skip
        _png(tmp_path / rel)
    (tmp_path / "val" / "bee").mkdir()
    src = open_data(f"imagefolder:{tmp_path}")
    assert src.labels().tolist() == [0, 2] and src.num_classes == 3
    (tmp_path / "val" / "dust").mkdir()  # in no split
    with pytest.raises(LayerfastError, match="dust"):
        open_data(f"imagefolder:{tmp_path}")


# --- label errors name the file -------------------------------------------------------------


def _idx(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
                     + arr.tobytes())  # fmt: skip


def test_idx_label_out_of_range_names_the_file(tmp_path: Path) -> None:
    """docs/data.md: every data error names the file; an idx label >= 10 said only
    "mnist: label 19 is out of range for 10 classes"."""
    _idx(tmp_path / "t10k-images-idx3-ubyte", RNG.integers(0, 256, (4, 3, 3), dtype=np.uint8))
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 4)
                                     + bytes([1, 2, 19, 3])))  # fmt: skip
    with pytest.raises(LayerfastError, match=r"t10k-labels-idx1-ubyte\.gz.*label 19"):
        open_data(f"mnist:{tmp_path}")


@pytest.mark.parametrize("labels", [[0, 1, 12], [0.0, 1.0, 2.0], [0, -1, 2]])
def test_cifar_bad_labels_name_the_batch_file(tmp_path: Path, labels: list) -> None:
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        bad = name == "data_batch_4"
        obj = {b"data": RNG.integers(0, 256, (3, 3072), dtype=np.uint8),
               b"labels": labels if bad else [0, 1, 2]}  # fmt: skip
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=2))
    assert open_data(f"cifar10:{tmp_path}").n == 3
    with pytest.raises(LayerfastError, match=r"data_batch_4.*label"):
        open_data(f"cifar10:{tmp_path}", split="train")


def test_imagefolder_symlink_loop_counts_each_image_once(tmp_path: Path) -> None:
    """Every sample exactly once (DESIGN.md §4): a symlink back to an ancestor folder
    (`cat/sub/up -> ..`) was followed until the path grew too long, so one image was read
    about 40 times, as that many samples."""
    pytest.importorskip("PIL")
    _png(tmp_path / "cat" / "0.png")
    _png(tmp_path / "dog" / "0.png")
    _png(tmp_path / "cat" / "sub" / "1.png")
    (tmp_path / "cat" / "sub" / "up").symlink_to("..")  # back to cat/
    (tmp_path / "dog" / "more").symlink_to(tmp_path / "extra")  # not a loop: followed
    _png(tmp_path / "extra" / "1.png")
    src = open_data(f"imagefolder:{tmp_path}")
    assert src.labels().tolist() == [0, 0, 1, 1, 2]  # classes cat, dog, extra

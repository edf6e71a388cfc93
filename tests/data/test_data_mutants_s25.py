"""Session 25 mutation round of the data path: each test kills a mutant that survived the
existing tests (spec spelling, npz/CIFAR readers, the shared checks of `layerfast.data.source`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.data import open_data
from layerfast.data.source import DataSource, check_labels
from layerfast.errors import LayerfastError
from tests.data.test_data import make_cifar, make_idx, write_idx
from tests.data.test_data_ffcv import require_ffcv


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as f:  # a path would get ".npz" appended to `D.NPZ`
        np.savez(f, **arrays)
    return path


def test_labels_are_a_copy_the_caller_may_write() -> None:
    """`labels()` hands out its own tensor: a caller that edits it must not corrupt the data."""
    src = open_data("digits")
    before = src.labels().clone()
    src.labels()[:] = 99
    assert torch.equal(src.labels(), before)
    assert torch.equal(torch.cat([y for _, y in src.batches(64)]), before)


def test_a_chw_npz_whose_width_is_three_stays_chw(tmp_path: Path) -> None:
    """[N,3,5,3] is CHW (its second axis looks like channels): not transposed as HWC."""
    x = np.arange(4 * 3 * 5 * 3, dtype=np.uint8).reshape(4, 3, 5, 3)
    src = open_data(str(_npz(tmp_path / "d.npz", x=x, y=np.arange(4))))
    assert src.shape == (3, 5, 3)
    assert torch.equal(next(src.batches(4))[0], torch.from_numpy(x))


def test_a_zero_std_is_refused() -> None:
    """std 0 would divide every input by zero on the device: refused up front."""
    x, y = np.zeros((2, 1, 2, 2), np.float32), np.array([0, 1])
    with pytest.raises(LayerfastError, match="std must be positive"):
        DataSource.from_arrays("m", x, y, mean=(0.0,), std=(0.0,))


def test_labels_beyond_int32_are_kept_exactly() -> None:
    """check_labels returns int64: a class index past 2**31 must not wrap."""
    y = check_labels("m", np.array([2**40, 1], dtype=np.uint64))
    assert y.dtype == torch.int64 and y.tolist() == [2**40, 1]


def test_a_scalar_y_in_an_npz_is_one_clear_error(tmp_path: Path) -> None:
    """A 0-d `y` was a TypeError (len() of unsized object) without the y.ndim check."""
    path = _npz(tmp_path / "d.npz", x=np.zeros((3, 4), np.uint8), y=np.array(5))
    with pytest.raises(LayerfastError, match="need the same number of samples N"):
        open_data(str(path))


def test_cifar_prefers_the_batches_in_dir_over_a_nested_copy(tmp_path: Path) -> None:
    """DIR/test_batch is read when present, even beside a DIR/cifar-10-batches-py folder."""
    x, _ = make_cifar(tmp_path, n=5)
    make_cifar(tmp_path / "cifar-10-batches-py", n=7)
    src = open_data(f"cifar10:{tmp_path}")
    assert src.n == 5 and torch.equal(next(src.batches(8))[0], torch.from_numpy(x))


def test_spec_suffix_and_name_are_case_and_space_insensitive(tmp_path: Path) -> None:
    """`D.NPZ` is a .npz; ` digits ` and ` x.npz ` (as pasted) open what they name."""
    path = _npz(tmp_path / "D.NPZ", x=np.zeros((3, 4), np.uint8), y=np.arange(3))
    assert open_data(str(path)).n == 3
    assert open_data(f" {path} ").n == 3
    assert open_data(" digits ").n == 360


def test_absolute_spec_reads_the_name_in_any_case(tmp_path: Path, monkeypatch) -> None:
    """`CIFAR10:data` opens `cifar10:data`, so the manifest must record its folder absolute."""
    from layerfast.data.spec import absolute_spec

    monkeypatch.chdir(tmp_path)
    assert absolute_spec("CIFAR10:data") == f"CIFAR10:{tmp_path.resolve() / 'data'}"


def _foreign_beton(path: Path, image_field: object, images: list[np.ndarray]) -> Path:
    """A .beton written without layerfast's sidecar (as FFCV's own recipes write them)."""
    from ffcv.fields import IntField

    from layerfast.data.ffcv_writer import SafeDatasetWriter

    class DS:
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return images[i], i % 2

    fields = {"image": image_field, "label": IntField()}
    SafeDatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(DS())
    return path


def test_a_converted_chw_beton_is_never_read_as_hwc(tmp_path: Path) -> None:
    """`convert` writes CHW and says so in its sidecar: a (2, 4, 3) sample (width 3, like HWC's
    channel axis) comes back as it went in, not transposed."""
    require_ffcv()
    from layerfast.data.beton import convert as write_beton

    x = np.arange(5 * 2 * 4 * 3, dtype=np.uint8).reshape(5, 2, 4, 3)
    source = DataSource.from_arrays("m", x, np.arange(5) % 2, scale=255.0)
    src = open_data(str(write_beton(source, "m", "test", tmp_path / "m.beton")))
    assert src.shape == (2, 4, 3)
    assert torch.equal(torch.cat([b for b, _ in src.batches(2)]), torch.from_numpy(x))


def test_a_two_d_ndarray_beton_gets_one_leading_channel(tmp_path: Path) -> None:
    """(H, W) images are (1, H, W), also when H is 3 (a (3, 5, 1) reading kept 3 as C)."""
    require_ffcv()
    from ffcv.fields import NDArrayField

    imgs = np.random.default_rng(3).integers(0, 256, (4, 3, 5), dtype=np.uint8)
    path = _foreign_beton(tmp_path / "g.beton", NDArrayField(np.dtype("uint8"), (3, 5)), list(imgs))
    src = open_data(str(path))
    assert src.shape == (1, 3, 5)
    assert torch.equal(torch.cat([b for b, _ in src.batches(3)]), torch.from_numpy(imgs)[:, None])


def test_a_float_ndarray_beton_without_sidecar_is_fed_as_is(tmp_path: Path) -> None:
    """float32 images hold values already scaled (as a float .npz): scale 1, not 1/255."""
    require_ffcv()
    from ffcv.fields import NDArrayField

    imgs = np.random.default_rng(4).standard_normal((3, 1, 2, 2)).astype(np.float32)
    path = _foreign_beton(
        tmp_path / "f.beton", NDArrayField(np.dtype("float32"), (1, 2, 2)), list(imgs)
    )
    assert open_data(str(path)).scale == 1.0


def test_rgb_images_of_one_height_but_several_widths_are_centre_cropped(tmp_path: Path) -> None:
    """Images of differing sizes -- in width alone too -- get the 224x224 centre-crop decoder."""
    require_ffcv()
    from ffcv.fields import RGBImageField

    rng = np.random.default_rng(5)
    imgs = [rng.integers(0, 256, (6, w, 3), dtype=np.uint8) for w in (5, 7, 5)]
    path = _foreign_beton(tmp_path / "r.beton", RGBImageField(write_mode="raw"), imgs)
    assert open_data(str(path)).shape == (3, 224, 224)


def test_a_label_equal_to_the_sidecars_class_count_is_refused(tmp_path: Path) -> None:
    """Labels are 0..num_classes-1: digits' label 9 under a sidecar saying 9 classes."""
    require_ffcv()
    import json

    from layerfast.data import convert
    from layerfast.data.beton import sidecar_path

    to = convert("digits", tmp_path / "d.beton")
    side = sidecar_path(to)
    side.write_text(json.dumps(dict(json.loads(side.read_text()), num_classes=9)))
    with pytest.raises(LayerfastError, match="label 9 >= num_classes 9"):
        open_data(str(to))


def test_imagefolder_reads_grayscale_and_rgba_images_as_rgb(tmp_path: Path) -> None:
    """torchvision's loader converts every image to RGB: a grayscale or RGBA PNG among JPEGs is
    three channels, not a "cannot decode"."""
    from PIL import Image

    gray = np.random.default_rng(6).integers(0, 256, (256, 256), dtype=np.uint8)
    for cls, img in (("a", Image.fromarray(gray, "L")),
                     ("b", Image.fromarray(np.dstack([gray] * 4), "RGBA"))):  # fmt: skip
        (tmp_path / cls).mkdir()
        img.save(tmp_path / cls / "x.png")
    x, y = next(open_data(f"imagefolder:{tmp_path}").batches(2))
    want = torch.from_numpy(gray[16:240, 16:240].copy())
    assert y.tolist() == [0, 1]
    assert all(torch.equal(x[i, c], want) for i in range(2) for c in range(3))


def test_an_idx_header_must_start_with_two_zero_bytes(tmp_path: Path) -> None:
    """0x01000803 is not an idx magic (the first two bytes are zero), though type and rank fit."""
    x, _ = make_idx(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x[:, 0], magic=b"\x01\x00\x08\x03")
    with pytest.raises(LayerfastError, match="bad idx magic number 0x01000803"):
        open_data(f"mnist:{tmp_path}")

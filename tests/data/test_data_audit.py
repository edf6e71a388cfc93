"""Audit of the data path's *values* against independent references (docs/data.md).

Each test rebuilds what a spec should yield with a reference that shares no code with
layerfast: torchvision's ImageFolder + Resize(256)/CenterCrop(224) for `imagefolder`, a plain
numpy parse for idx files, a Python-2-style pickle (the byte layout of the official CIFAR-10
batches) for `cifar10`, float64 arithmetic for `to_device`, the real Fashion-MNIST train set
for its normalisation constants.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.data import DataSource, open_data, to_device

FASHION = Path("/usr/share/datasets/fashion-mnist")
RNG = np.random.default_rng(2024)


def _all(src: DataSource, bs: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*src.batches(bs, start), strict=True)
    return torch.cat(xs), torch.cat(ys)


# --- to_device ---------------------------------------------------------------------------


def _reference(x: torch.Tensor, src: DataSource) -> torch.Tensor:
    """(x / scale - mean) / std in float64, the documented definition."""
    out = x.double() / src.scale
    if src.mean is not None:
        c = len(src.mean)
        mean = torch.tensor(src.mean, dtype=torch.float64).view(c, 1, 1)
        std = torch.tensor(src.std, dtype=torch.float64).view(c, 1, 1)
        out = (out - mean) / std
    return out


@pytest.mark.parametrize("spec", ["synthetic:cifar:40", "digits", "u8"])
def test_to_device_float64_is_float64_accurate(spec, tmp_path):
    """float64 output used to be computed with float32 constants (and, without mean/std, a
    float32 multiply), so it was only float32-accurate (~4e-7 off)."""
    if spec == "u8":
        np.savez(tmp_path / "u.npz", x=RNG.integers(0, 256, (40, 3, 4, 4), dtype=np.uint8),
                 y=np.arange(40) % 3)  # fmt: skip
        spec = str(tmp_path / "u.npz")
    src = open_data(spec)
    x, y = next(src.batches(40))
    xd, _ = to_device(x, y, src, "cpu", torch.float64)
    assert xd.dtype == torch.float64
    torch.testing.assert_close(xd, _reference(x, src), atol=1e-12, rtol=1e-12)
    x32, _ = to_device(x, y, src, "cpu", torch.float32)  # float32 unchanged: one fused op
    torch.testing.assert_close(x32.double(), _reference(x, src), atol=1e-6, rtol=1e-6)


def test_to_device_float_input_fed_as_is_and_channels_last(tmp_path):
    x = RNG.standard_normal((6, 3, 5, 4)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(6) % 2)
    src = open_data(str(tmp_path / "f.npz"))
    xb, yb = next(src.batches(6))
    for dtype in (torch.float32, torch.float64):
        xd, _ = to_device(xb, yb, src, "cpu", dtype, channels_last=True)
        assert xd.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xd, torch.from_numpy(x).to(dtype))


# --- idx -----------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _parse_idx(data: bytes) -> np.ndarray:
    """An independent idx parser: big-endian int32 dims after the 4-byte magic."""
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data[4 + 4 * nd :], np.uint8).reshape(dims).copy()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_values_match_an_independent_parse(tmp_path, gz):
    # 300 samples and a 29x31 (non-square) image: every header field > 255, so a
    # little-endian or swapped H/W read cannot go unnoticed
    x = RNG.integers(0, 256, (300, 29, 31), dtype=np.uint8)
    y = RNG.integers(0, 10, 300, dtype=np.uint8)
    for prefix in ("t10k", "train"):
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            data = _idx_bytes(arr if prefix == "t10k" else arr[::-1].copy())
            p = tmp_path / f"{prefix}-{kind}-ubyte"
            if gz:
                p.with_name(p.name + ".gz").write_bytes(gzip.compress(data))
            else:
                p.write_bytes(data)
    ref_x = _parse_idx(_idx_bytes(x))
    for name in ("mnist", "fashion-mnist"):
        src = open_data(f"{name}:{tmp_path}")
        assert (src.n, src.shape, src.num_classes, src.scale) == (300, (1, 29, 31), 10, 255.0)
        X, Y = _all(src, 64)
        assert torch.equal(X[:, 0], torch.from_numpy(ref_x))
        assert Y.dtype == torch.int64 and Y.tolist() == y.tolist()
        tr = open_data(f"{name}:{tmp_path}", split="train")
        assert torch.equal(_all(tr, 128)[0][:, 0], torch.from_numpy(ref_x[::-1].copy()))
        assert torch.equal(_all(src, 7, start=293)[0], X[293:])
        assert torch.equal(_all(open_data(f"{name}:{tmp_path}", max_samples=77), 10)[0], X[:77])
    assert open_data(f"mnist:{tmp_path}").mean == (0.1307,)
    assert open_data(f"fashion-mnist:{tmp_path}").std == (0.3530,)


@pytest.mark.skipif(not FASHION.is_dir() and not os.environ.get("CI"), reason="no Fashion-MNIST")
def test_fashion_mnist_constants_are_its_train_statistics():
    """(0.2860, 0.3530) are the mean/std of x/255 over the 60,000 training images; the test
    split's pixels and labels equal a plain parse of the gzipped idx files."""
    tr = open_data("fashion-mnist", split="train")
    X = _all(tr, 8192)[0].double() / 255
    assert abs(float(X.mean()) - tr.mean[0]) < 5e-5 and abs(float(X.std()) - tr.std[0]) < 5e-5
    te = open_data("fashion-mnist")
    xs = _parse_idx(gzip.decompress((FASHION / "t10k-images-idx3-ubyte.gz").read_bytes()))
    ys = _parse_idx(gzip.decompress((FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    X, Y = _all(te, 999)  # 10000 = 10*999 + 10: the last partial batch counts
    assert torch.equal(X[:, 0], torch.from_numpy(xs)) and Y.tolist() == ys.tolist()


# --- CIFAR-10 ------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING) and numpy's globals
    under `numpy.core`: the byte layout of the official CIFAR-10 python batches."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _binstr(self, b: bytes) -> None:
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(b)

    def save_bytes(self, obj: bytes) -> None:
        self._binstr(obj)

    def save_str(self, obj: str) -> None:
        self._binstr(obj.encode("latin1"))

    def save_global(self, obj, name=None) -> None:  # noqa: ANN001
        mod = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{mod}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[type] = save_global


def _py2_batch(x: np.ndarray, y: list[int]) -> bytes:
    f = io.BytesIO()
    obj = {"batch_label": "batch", "labels": y, "data": x.reshape(len(x), 3072),
           "filenames": [f"img_{i}.png" for i in range(len(x))]}  # fmt: skip
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def test_cifar_python2_batches(tmp_path):
    """Rows are CHW planes (1024 R, 1024 G, 1024 B); test = test_batch, train = data_batch_1..5
    in that order; labels from the 'labels' list; keys are Python 2 byte strings."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    test_x = RNG.integers(0, 256, (9, 3, 32, 32), dtype=np.uint8)
    test_y = RNG.integers(0, 10, 9).tolist()
    (d / "test_batch").write_bytes(_py2_batch(test_x, test_y))
    parts = []
    for i in range(1, 6):
        xi, yi = RNG.integers(0, 256, (i + 1, 3, 32, 32), dtype=np.uint8), [i] * (i + 1)
        (d / f"data_batch_{i}").write_bytes(_py2_batch(xi, yi))
        parts.append((xi, yi))
    src = open_data(f"cifar10:{tmp_path}")  # the parent of cifar-10-batches-py
    X, Y = _all(src, 4)
    assert torch.equal(X, torch.from_numpy(test_x)) and Y.tolist() == test_y
    # pixel (c, h, w) is byte c*1024 + h*32 + w of the row
    row = test_x.reshape(9, 3072)
    assert int(X[2, 1, 5, 7]) == int(row[2, 1024 + 5 * 32 + 7])
    tr = open_data(f"cifar10:{d}", split="train")
    X, Y = _all(tr, 3)
    assert torch.equal(X, torch.from_numpy(np.concatenate([p[0] for p in parts])))
    assert Y.tolist() == [lab for p in parts for lab in p[1]]


# --- imagefolder ---------------------------------------------------------------------------


def _save(img, path: Path) -> None:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_imagefolder_matches_torchvision_imagefolder(tmp_path):
    """Pixels and labels equal torchvision's ImageFolder with Resize(256) + CenterCrop(224) +
    PILToTensor, on every image mode PIL converts to RGB (L, LA, RGBA, CMYK JPEG, palette with
    transparency, 1-bit, 16-bit, int32, float TIFF), non-square and tiny images, sizes whose
    crop offset is a .5 (banker's rounding), an EXIF-rotated JPEG (not rotated, like
    torchvision), nested sub-folders, upper-case extensions and case-sensitive class order."""
    Image = pytest.importorskip("PIL.Image")
    tv = pytest.importorskip("torchvision")
    from torchvision import transforms as T

    val = tmp_path / "val"
    classes = ["b", "a", "C", "_z"]
    sizes = [(300, 261), (256, 257), (257, 256), (225, 481), (481, 225), (33, 17), (17, 33),
             (3, 300), (255, 255), (299, 300), (290, 258)]  # fmt: skip
    modes = ["RGB", "L", "LA", "RGBA", "CMYK", "P", "1", "I;16", "I", "F"]
    k = 0
    for w, h in sizes:
        for mode in modes:
            arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if mode == "I;16":
                img = Image.fromarray(RNG.integers(0, 65536, (h, w)).astype(np.uint16))
            elif mode == "I":
                img = Image.fromarray(RNG.integers(-9, 70000, (h, w)).astype(np.int32))
            elif mode == "F":
                img = Image.fromarray(RNG.uniform(-5, 300, (h, w)).astype(np.float32))
            elif mode == "P":
                img = Image.fromarray(arr).convert("P", palette=Image.ADAPTIVE)
                img.info["transparency"] = 3
            else:
                img = Image.fromarray(arr).convert(mode)
            ext = {"CMYK": "jpg", "I": "tif", "F": "tiff"}.get(mode, "png")
            if mode == "RGB":
                ext = ("jpg", "JPEG", "bmp", "webp", "ppm")[k % 5]
            sub = "deep/er/" if k % 7 == 0 else ""
            _save(img, val / classes[k % 4] / f"{sub}{k:03d}_{mode.replace(';', '')}.{ext}")
            k += 1
    exif = Image.fromarray(RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    tags = exif.getexif()
    tags[0x0112] = 6  # "rotate 90° CW to display"
    (val / "a").mkdir(exist_ok=True)
    exif.save(val / "a" / "exif.jpg", exif=tags)
    (val / "a" / "notes.txt").write_text("not an image")

    ref = tv.datasets.ImageFolder(
        str(val), transform=T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    )
    src = open_data(f"imagefolder:{tmp_path}")
    assert src.n == len(ref) and src.num_classes == len(ref.classes) == 4
    X, Y = _all(src, 16)
    assert Y.tolist() == [t for _, t in ref.samples] == src.labels().tolist()
    for i in range(len(ref)):
        x, _ = ref[i]
        assert torch.equal(X[i], x), ref.samples[i][0]


def test_imagefolder_split_union_keeps_indices(tmp_path):
    """With split folders the classes are the sorted union: a class absent from val/ keeps
    the later classes' indices equal to the training split's."""
    Image = pytest.importorskip("PIL.Image")
    for rel in ("train/ant/0.png", "train/bee/0.png", "train/cat/0.png", "val/ant/0.png",
                "val/cat/0.png", "val/cat/1.png"):  # fmt: skip
        img = Image.fromarray(RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8))
        _save(img, tmp_path / rel)
    test = open_data(f"imagefolder:{tmp_path}")
    train = open_data(f"imagefolder:{tmp_path}", split="train")
    assert test.labels().tolist() == [0, 2, 2] and train.labels().tolist() == [0, 1, 2]
    assert test.num_classes == train.num_classes == 3


# --- synthetic -----------------------------------------------------------------------------


def test_synthetic_same_bytes_for_any_batching_and_cap():
    full = open_data("synthetic:cifar:200")
    X, Y = _all(full, 200)
    for bs, start in ((1, 199), (63, 0), (65, 1), (64, 64), (200, 130)):
        Xs, Ys = _all(full, bs, start)
        assert torch.equal(Xs, X[start:]) and torch.equal(Ys, Y[start:])
    capped = open_data("synthetic:cifar:200", max_samples=70)
    Xc, Yc = _all(capped, 33)
    assert torch.equal(Xc, X[:70]) and torch.equal(Yc, Y[:70])
    assert torch.equal(capped.labels(), Y[:70])
    # block b is PCG64(SeedSequence([seed, b]))'s raw stream, as documented
    bits = np.random.PCG64(np.random.SeedSequence([0, 1]))
    raw = bits.random_raw((64 * 3072 + 7) // 8).view(np.uint8)[: 64 * 3072]
    assert torch.equal(X[64:128].reshape(-1), torch.from_numpy(raw))

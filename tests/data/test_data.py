"""Data specs -> DataSource -> batches -> to_device (DESIGN.md §4; FFCV in test_data_ffcv.py).

Every spec is checked on small generated files for the one property the engine's single data
pass relies on: every sample exactly once, in order, last partial batch included, with `start`
(resume) and `max_samples`; and every kind of broken input gives one clear LayerfastError.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.data import DataSource, open_data, to_device
from layerfast.data import digits as digits_mod
from layerfast.errors import LayerfastError

FASHION = Path("/usr/share/datasets/fashion-mnist")
RNG = np.random.default_rng(1234)


def write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: bytes | None = None) -> None:
    head = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    data = head + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx(d: Path, n: int = 23, gz: bool = False, prefix: str = "t10k"):
    d.mkdir(parents=True, exist_ok=True)
    x = RNG.integers(0, 256, (n, 5, 4), dtype=np.uint8)
    y = RNG.integers(0, 10, n, dtype=np.uint8)
    write_idx(d / f"{prefix}-images-idx3-ubyte", x, gz)
    write_idx(d / f"{prefix}-labels-idx1-ubyte", y, gz)
    return x[:, None], y


def write_cifar(path: Path, x: np.ndarray, y, protocol: int = 2) -> None:
    obj = {b"batch_label": b"b", b"data": x.reshape(len(x), 3072), b"labels": list(map(int, y))}
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar(d: Path, n: int = 17):
    d.mkdir(parents=True, exist_ok=True)
    x = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    y = RNG.integers(0, 10, n)
    write_cifar(d / "test_batch", x, y)
    for i in range(1, 6):
        write_cifar(d / f"data_batch_{i}", x[:3], y[:3], protocol=pickle.HIGHEST_PROTOCOL)
    return x, y


def collect(src: DataSource, bs: int, start: int = 0):
    xs, ys = zip(*src.batches(bs, start), strict=True)
    assert all(len(x) == bs for x in xs[:-1]) and 1 <= len(xs[-1]) <= bs
    for x, y in zip(xs, ys, strict=True):
        assert x.is_contiguous() and x.dim() == 4 and y.dtype == torch.int64 and y.dim() == 1
        assert tuple(x.shape[1:]) == src.shape and len(x) == len(y)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(params=["idx", "idx-gz", "cifar", "npz-u8", "npz-f32", "npz-hwc", "npz-hw",
                        "npz-flat", "npz-1d"])
def case(request, tmp_path):
    """(spec, expected x [N,C,H,W], expected y) for one file-backed spec."""
    kind = request.param
    if kind.startswith("idx"):
        x, y = make_idx(tmp_path / "m", gz=kind == "idx-gz")
        return f"mnist:{tmp_path / 'm'}", x, y
    if kind == "cifar":
        x, y = make_cifar(tmp_path / "c")
        return f"cifar10:{tmp_path / 'c'}", x, y
    y = RNG.integers(0, 4, 29)
    if kind == "npz-f32":
        x = RNG.standard_normal((29, 2, 3, 5)).astype(np.float32)
        stored = x
    elif kind == "npz-hwc":
        x = RNG.integers(0, 256, (29, 3, 6, 5), dtype=np.uint8)
        stored = x.transpose(0, 2, 3, 1)
    elif kind == "npz-hw":
        x = RNG.integers(0, 256, (29, 1, 6, 5), dtype=np.uint8)
        stored = x[:, 0]
    elif kind == "npz-flat":  # [N,D] feature vectors: one channel, a 1×D row
        x = RNG.integers(0, 256, (29, 1, 1, 7), dtype=np.uint8)
        stored = x[:, 0, 0]
    elif kind == "npz-1d":  # [N]: one feature
        x = RNG.standard_normal((29, 1, 1, 1)).astype(np.float32)
        stored = x[:, 0, 0, 0]
    else:
        x = stored = RNG.integers(0, 256, (29, 1, 6, 5), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=stored, y=y)
    return str(tmp_path / "d.npz"), x, y


@pytest.mark.parametrize("bs", [1, 4, 10, 1000])
def test_every_sample_once(case, bs):
    spec, x, y = case
    src = open_data(spec)
    assert src.n == len(y) and src.shape == x.shape[1:]
    X, Y = collect(src, bs)
    assert torch.equal(X, torch.from_numpy(np.ascontiguousarray(x)))
    assert torch.equal(Y, torch.from_numpy(y.astype(np.int64)))
    assert torch.equal(src.labels(), Y)
    assert X.dtype == (torch.float32 if x.dtype == np.float32 else torch.uint8)


def test_start_and_max_samples(case):
    spec, x, y = case
    src = open_data(spec)
    X, Y = collect(src, 3, start=5)
    assert torch.equal(X, torch.from_numpy(np.ascontiguousarray(x[5:])))
    assert list(src.batches(3, start=src.n)) == []
    with pytest.raises(LayerfastError, match="start offset"):
        list(src.batches(3, start=src.n + 1))
    with pytest.raises(LayerfastError, match="batch size"):
        list(src.batches(0))
    small = open_data(spec, max_samples=7)
    assert small.n == 7 and small.labels().tolist() == y[:7].tolist()
    X, _ = collect(small, 4)
    assert torch.equal(X, torch.from_numpy(np.ascontiguousarray(x[:7])))
    assert open_data(spec, max_samples=10**6).n == len(y)


def test_norm_constants(tmp_path):
    make_idx(tmp_path / "m")
    make_cifar(tmp_path / "c")
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 3, 3), np.float32), y=[0, 1])
    np.savez(tmp_path / "u.npz", x=np.zeros((2, 3, 3), np.uint8), y=[0, 1])
    m = open_data(f"mnist:{tmp_path / 'm'}")
    assert (m.mean, m.std, m.scale, m.num_classes) == ((0.1307,), (0.3081,), 255.0, 10)
    c = open_data(f"cifar10:{tmp_path / 'c'}")
    assert c.mean == (0.4914, 0.4822, 0.4465) and c.std == (0.2470, 0.2435, 0.2616)
    f, u = open_data(str(tmp_path / "f.npz")), open_data(str(tmp_path / "u.npz"))
    assert (f.mean, f.std, f.scale, u.mean, u.scale) == (None, None, 1.0, None, 255.0)
    s = open_data("synthetic:cifar")
    assert (s.mean, s.std, s.n, s.num_classes, s.shape) == (c.mean, c.std, 10000, 10, (3, 32, 32))
    i = open_data("synthetic:imagenet:5")
    assert (i.mean, i.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (i.n, i.num_classes, i.shape) == (5, 1000, (3, 224, 224))


def test_digits_split():
    test, train = open_data("digits"), open_data("digits", split="train")
    assert (test.n, train.n, test.num_classes, test.shape) == (360, 1437, 10, (1, 8, 8))
    assert test.scale == 16.0
    with np.load(digits_mod.PATH) as f:
        x, y, perm = f["x"], f["y"], f["perm"]
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.uint8 and int(x.max()) == 16
    ti, tr = digits_mod.split_indices(perm, "test"), digits_mod.split_indices(perm, "train")
    assert not set(ti) & set(tr) and sorted([*ti, *tr]) == list(range(1797))
    X, Y = collect(test, 7)
    assert torch.equal(X, torch.from_numpy(x[ti])) and Y.tolist() == y[ti].tolist()
    assert torch.equal(train.labels(), torch.from_numpy(y[tr].astype(np.int64)))
    full = x.astype(np.float64) / 16  # the hardcoded constants are the full set's statistics
    assert abs(full.mean() - test.mean[0]) < 1e-4 and abs(full.std() - test.std[0]) < 1e-4
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_synthetic_deterministic_and_lazy():
    a, b = open_data("synthetic:imagenet:150"), open_data("synthetic:imagenet:150")
    Xa, Ya = collect(a, 64)
    Xb, Yb = collect(b, 37)
    assert torch.equal(Xa, Xb) and torch.equal(Ya, Yb) and torch.equal(a.labels(), Ya)
    Xs, _ = collect(b, 10, start=61)
    assert torch.equal(Xs, Xa[61:])
    assert not hasattr(a.reader, "x")  # generated per batch, never held whole
    tr = open_data("synthetic:imagenet:150", split="train")
    assert not torch.equal(collect(tr, 150)[0], Xa)
    assert 0 <= int(Ya.min()) and int(Ya.max()) < 1000 and len(set(Ya.tolist())) > 50
    assert open_data("synthetic:cifar", max_samples=3).n == 3


def test_cifar_nested_dir_and_train(tmp_path):
    x, y = make_cifar(tmp_path / "cifar-10-batches-py")
    src = open_data(f"cifar10:{tmp_path}")
    assert torch.equal(collect(src, 5)[0], torch.from_numpy(x))
    assert open_data(f"cifar10:{tmp_path}", split="train").n == 15
    # The official batches were pickled with numpy 1.x names (numpy.core.multiarray).
    p = tmp_path / "cifar-10-batches-py" / "test_batch"
    p.write_bytes(p.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray\n_reconstruct" in p.read_bytes()
    assert torch.equal(collect(open_data(f"cifar10:{tmp_path}"), 5)[0], torch.from_numpy(x))


def test_cifar_refuses_code(tmp_path):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(LayerfastError, match="refusing to load global.*system"):
        open_data(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_idx_train_and_dotted_names(tmp_path):
    x, y = make_idx(tmp_path, n=11, prefix="train")
    os.rename(tmp_path / "train-images-idx3-ubyte", tmp_path / "train-images.idx3-ubyte")
    src = open_data(f"mnist:{tmp_path}", split="train")
    assert torch.equal(collect(src, 4)[0], torch.from_numpy(x))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("truncated", "truncated: header says shape"),
        ("bad-magic", "bad idx magic"),
        ("count", "disagree: 23 images, 22 labels"),
        ("gzip", "corrupt or truncated"),
        ("missing", "no t10k-labels-idx1-ubyte"),
        ("empty", "empty"),
    ],
)
def test_idx_errors(tmp_path, breakage, message):
    x, y = make_idx(tmp_path)
    img, lab = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    if breakage == "truncated":
        img.write_bytes(img.read_bytes()[:-7])
    elif breakage == "bad-magic":
        write_idx(img, x[:, 0], magic=b"\x00\x00\x08\x01")
    elif breakage == "count":
        write_idx(lab, y[:-1])
    elif breakage == "gzip":
        lab.unlink()
        (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(y.tobytes())[:-9])
    elif breakage == "missing":
        lab.unlink()
    else:
        write_idx(img, x[:0, 0])
        write_idx(lab, y[:0])
    with pytest.raises(LayerfastError, match=message):
        open_data(f"mnist:{tmp_path}")


def _npz(tmp_path, **arrays) -> str:
    np.savez(tmp_path / "a.npz", **arrays)
    return str(tmp_path / "a.npz")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((3, 2, 2), np.uint8)},
         "must hold arrays 'x_test' and 'y_test', or 'x' and 'y'"),
        ({"x_train": np.zeros((3, 2, 2), np.uint8), "y_train": [0, 1, 2]}, "'x_test' and 'y_test'"),
        ({"x": np.zeros((3, 2, 2), np.uint8), "y": [0, 1]}, "need the same number of samples"),
        ({"x": np.zeros((3, 2, 2), np.uint8), "y": [0, -1, 2]}, "labels must be >= 0"),
        ({"x": np.zeros((3, 2, 2), np.uint8), "y": [0.5, 1, 2]},
         r"npz: /\S+/a\.npz: 'y': labels must be integers"),
        ({"x_test": np.zeros((3, 2, 2), np.uint8), "y_test": [0, 1, 2], "y_train": [0.5]},
         r"npz: /\S+/a\.npz: 'y_train': labels must be integers"),
        ({"x": np.zeros((0, 2, 2), np.uint8), "y": np.zeros(0, np.int64)}, "empty"),
        ({"x": np.zeros((2, 2, 2), np.int32), "y": [0, 1]}, "dtype int32"),
        ({"x": np.zeros((2, 1, 2, 2, 2), np.uint8), "y": [0, 1]}, r"\[N,D\], \[N,H,W\]"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": [0, 3], "num_classes": 2}, "out of range"),
        ({"x": np.array([None, 1], dtype=object), "y": [0, 1]}, "object arrays"),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    with pytest.raises(LayerfastError, match=message):
        open_data(_npz(tmp_path, **arrays))


def test_npz_splits_and_num_classes(tmp_path):
    spec = _npz(tmp_path, x_test=np.ones((2, 3, 3), np.uint8), y_test=[0, 1],
                x_train=np.zeros((4, 3, 3), np.uint8), y_train=[0, 1, 2, 4])  # fmt: skip
    te, tr = open_data(spec), open_data(spec, split="train")
    assert (te.n, tr.n, te.num_classes, tr.num_classes) == (2, 4, 5, 5)
    assert int(collect(te, 2)[0].sum()) == 18
    spec = _npz(tmp_path, x=np.zeros((2, 3, 3), np.uint8), y=[0, 1], num_classes=7)
    assert open_data(spec).num_classes == 7 and open_data(spec, split="train").n == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown data spec 'nope'.*valid specs: digits, fashion-mnist"),
        ("mnist", "mnist needs a directory"),
        ("digits:x", "digits takes no argument"),
        ("synthetic:mnist", "unknown kind 'mnist'"),
        ("synthetic:cifar:many", "not an integer"),
        ("mnist:/no/such/dir", "directory /no/such/dir does not exist"),
        ("cifar10:/no/such/dir", "directory /no/such/dir does not exist"),
        ("imagefolder:/no/such/dir", "does not exist|needs pillow"),
        ("/no/such/file.npz", "file /no/such/file.npz does not exist"),
        ("/no/such/file.beton", "file /no/such/file.beton does not exist"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(LayerfastError, match=message):
        open_data(spec)


def test_argument_errors(tmp_path):
    with pytest.raises(LayerfastError, match="split must be 'test' or 'train'"):
        open_data("digits", split="val")
    with pytest.raises(LayerfastError, match="--max-samples must be a positive integer, got 0"):
        open_data("digits", max_samples=0)
    with pytest.raises(LayerfastError, match="bare directory; did you mean imagefolder"):
        open_data(str(tmp_path))


def test_cifar_errors(tmp_path):
    x, y = make_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(LayerfastError, match="data_batch_3 missing"):
        open_data(f"cifar10:{tmp_path}", split="train")
    good = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(LayerfastError, match="not a CIFAR pickle batch or truncated"):
        open_data(f"cifar10:{tmp_path}")
    write_cifar(tmp_path / "test_batch", x, [*y[:-1], 10])
    with pytest.raises(LayerfastError, match="label 10 is out of range for 10 classes"):
        open_data(f"cifar10:{tmp_path}")
    write_cifar(tmp_path / "test_batch", x, [*y[:-1], -1])
    with pytest.raises(LayerfastError, match="labels must be >= 0"):
        open_data(f"cifar10:{tmp_path}")
    write_cifar(tmp_path / "test_batch", x[:0], [])
    with pytest.raises(LayerfastError, match="empty"):
        open_data(f"cifar10:{tmp_path}")
    # labels that are not a flat list were a TypeError / ValueError traceback
    for bad, match in [(None, "must be a list of class indices, got NoneType"),
                       (5, "got int"), ({"a": 1}, "got dict"),
                       ([[1, 2], [3]] * (len(x) // 2), "not a flat list"),
                       ([[1, 2]] * len(x), r"flat list, has shape")]:  # fmt: skip
        obj = {b"data": x.reshape(len(x), 3072), b"labels": bad}
        (tmp_path / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(LayerfastError, match=match):
            open_data(f"cifar10:{tmp_path}")


def test_beton_without_ffcv(tmp_path, monkeypatch):
    (tmp_path / "d.beton").write_bytes(b"x" * 100)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` raise ImportError
    with pytest.raises(LayerfastError, match=r"pip install layerfast\[ffcv\]"):
        open_data(str(tmp_path / "d.beton"))
    from layerfast.data import convert

    with pytest.raises(LayerfastError, match=r"pip install layerfast\[ffcv\]"):
        convert("digits", tmp_path / "o.beton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_to_device_matches_reference(dtype, channels_last):
    src = open_data("synthetic:cifar", max_samples=9)
    x, y = next(src.batches(9))
    x0 = x.clone()
    xd, yd = to_device(x, y.to(torch.int32), src, "cpu", dtype, channels_last)
    mean = torch.tensor(src.mean).view(-1, 1, 1)
    std = torch.tensor(src.std).view(-1, 1, 1)
    ref = (x.double() / src.scale - mean) / std
    assert xd.dtype == dtype and yd.dtype == torch.int64 and torch.equal(yd, y)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(xd.double(), ref, atol=tol, rtol=tol)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert xd.is_contiguous(memory_format=fmt)
    assert torch.equal(x, x0)  # input untouched


def test_flat_npz_analysis_equals_the_image_analysis(ckpts, tmp_path):
    """DESIGN §4's `x` [N,...] includes flat vectors: digits' test images, normalised and stored
    as float32 [360, 64], give an FCN analysis with the same errors as `--data digits`."""
    import layerfast

    digits = open_data("digits")
    xs = torch.cat([to_device(x, y, digits, "cpu")[0] for x, y in digits.batches(128)])
    np.savez(tmp_path / "flat.npz", x=xs.reshape(len(xs), 64).numpy(), y=digits.labels().numpy())
    flat = open_data(str(tmp_path / "flat.npz"))
    assert (flat.shape, flat.n, flat.scale, flat.mean) == ((1, 1, 64), 360, 1.0, None)
    kw = dict(device="cpu", progress=False, figures=False, seeds=1)
    a = layerfast.analyze("fcn3x256", ckpts, data="digits", out=tmp_path / "a", **kw).table
    b = layerfast.analyze("fcn3x256", ckpts, data=str(tmp_path / "flat.npz"), out=tmp_path / "b",
                          **kw).table
    assert len(a) == len(b) > 10
    assert a["error"].tolist() == b["error"].tolist()
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def test_to_device_without_mean(tmp_path):
    u = open_data(_npz(tmp_path, x=np.full((2, 2, 2), 51, np.uint8), y=[0, 1]))
    xd, _ = to_device(*next(u.batches(2)), u, "cpu")
    torch.testing.assert_close(xd, torch.full((2, 1, 2, 2), 0.2))
    xf = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    np.savez(tmp_path / "f.npz", x=xf, y=[0, 1])
    f = open_data(str(tmp_path / "f.npz"))
    x, y = next(f.batches(2))
    xd, _ = to_device(x, y, f, "cpu")
    assert torch.equal(xd, torch.from_numpy(xf)) and xd.data_ptr() != x.data_ptr()
    with pytest.raises(LayerfastError, match="labels must be integers"):
        to_device(x, y.float(), f, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_cuda():
    src = open_data("synthetic:cifar", max_samples=64)
    x, y = next(src.batches(64))
    xd, yd = to_device(x, y, src, "cuda", torch.bfloat16, channels_last=True)
    xc, _ = to_device(x, y, src, "cpu", torch.float32)
    torch.testing.assert_close(xd.float().cpu(), xc, atol=2e-2, rtol=1e-2)
    assert yd.device.type == "cuda" and yd.dtype == torch.int64


def test_from_arrays():
    src = DataSource.from_arrays("t", np.zeros((5, 1, 2, 2), np.uint8), [0, 1, 2, 0, 1], scale=255)
    assert (src.n, src.num_classes, src.shape) == (5, 3, (1, 2, 2))
    with pytest.raises(LayerfastError, match="x has 5 samples but y has 2"):
        DataSource.from_arrays("t", np.zeros((5, 1, 2, 2)), [0, 1])


@pytest.mark.skipif(not FASHION.is_dir() and not os.environ.get("CI"), reason="no Fashion-MNIST")
def test_real_fashion_mnist():
    src = open_data("fashion-mnist")
    assert (src.n, src.num_classes, src.shape) == (10000, 10, (1, 28, 28))
    assert np.bincount(src.labels().numpy()).tolist() == [1000] * 10
    X, Y = collect(src, 4096)
    assert X.shape == (10000, 1, 28, 28) and torch.equal(Y, src.labels())
    xd, _ = to_device(X, Y, src, "cpu")
    assert abs(float(xd.mean())) < 0.05 and abs(float(xd.std()) - 1) < 0.05
    assert open_data("fashion-mnist", split="train").n == 60000


def _png_tree(root: Path, layout: dict[str, list[tuple[int, int]]]) -> None:
    from PIL import Image

    for rel, sizes in layout.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / rel / f"img{i}.png")


def test_imagefolder(tmp_path):
    pytest.importorskip("PIL")
    _png_tree(tmp_path, {"train/cat": [(300, 260)], "train/dog": [(256, 256)],
                         "val/cat": [(300, 260), (250, 400)], "val/emu": [(224, 500)]})  # fmt: skip
    src = open_data(f"imagefolder:{tmp_path}")  # test -> val/ when there is no test/
    assert (src.n, src.num_classes, src.shape, src.scale) == (3, 3, (3, 224, 224), 255.0)
    assert src.mean == (0.485, 0.456, 0.406) and src.labels().tolist() == [0, 0, 2]  # union
    X, Y = collect(src, 2)
    X1, _ = collect(src, 1, start=1)
    assert torch.equal(X[1:], X1) and Y.tolist() == [0, 0, 2]
    assert open_data(f"imagefolder:{tmp_path}", split="train").labels().tolist() == [0, 1]
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    ref = tv.Compose([tv.Resize(256), tv.CenterCrop(224), tv.PILToTensor()])
    files = sorted((tmp_path / "val").rglob("*.png"))
    want = torch.stack([ref(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(X, want)  # the same pixels torchvision's eval transform gives


def test_imagefolder_split_folders_in_any_case(tmp_path):
    """`Train/` and `Val/` were read as two classes named after the splits, both splits' images
    mixed, without a word (found by a differential test of the data layer)."""
    pytest.importorskip("PIL")
    _png_tree(tmp_path, {"Train/cat": [(224, 224)], "Train/dog": [(224, 224)],
                         "Val/cat": [(224, 224)], "Val/dog": [(224, 224)] * 2})  # fmt: skip
    test = open_data(f"imagefolder:{tmp_path}")
    assert (test.n, test.num_classes, test.labels().tolist()) == (3, 2, [0, 1, 1])
    assert open_data(f"imagefolder:{tmp_path}", split="train").labels().tolist() == [0, 1]


def test_imagefolder_errors(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    _png_tree(tmp_path / "flat", {"a": [(8, 8)], "b": [(9, 7)]})
    assert open_data(f"imagefolder:{tmp_path / 'flat'}", split="train").n == 2
    (tmp_path / "flat" / "b" / "img0.png").write_bytes(b"not a png")
    with pytest.raises(LayerfastError, match="cannot decode .*img0.png"):
        collect(open_data(f"imagefolder:{tmp_path / 'flat'}"), 2)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(LayerfastError, match="empty"):
        open_data(f"imagefolder:{tmp_path / 'empty'}")
    _png_tree(tmp_path / "split", {"train/a": [(8, 8)]})
    with pytest.raises(LayerfastError, match="no test or val or validation/"):
        open_data(f"imagefolder:{tmp_path / 'split'}")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(LayerfastError, match="imagefolder needs pillow: pip install pillow"):
        open_data(f"imagefolder:{tmp_path / 'flat'}")


def test_data_paths_names_what_each_spec_reads(tmp_path, monkeypatch) -> None:
    """The resume fingerprint hashes these: every spec that reads user files must name them."""
    from layerfast.data.idx import FASHION_MNIST_DIR
    from layerfast.data.spec import data_paths

    monkeypatch.chdir(tmp_path)
    assert data_paths("digits") == [] and data_paths("synthetic:cifar:64") == []
    assert data_paths(" d.NPZ ") == [tmp_path / "d.NPZ"] and data_paths("x.beton") == [tmp_path / "x.beton"]
    assert data_paths("fashion-mnist") == [Path(FASHION_MNIST_DIR).resolve()]
    for name in ("mnist", "fashion-mnist", "cifar10", "imagefolder"):
        assert data_paths(f"{name}:sub/dir") == [tmp_path / "sub" / "dir"]


def test_absolute_spec_makes_only_paths_absolute(tmp_path, monkeypatch) -> None:
    from layerfast.data.spec import absolute_spec

    monkeypatch.chdir(tmp_path)
    assert absolute_spec("x.npz") == str(tmp_path.resolve() / "x.npz")
    assert absolute_spec(" runs/a.beton ") == str(tmp_path.resolve() / "runs" / "a.beton")
    assert absolute_spec("cifar10:data") == f"cifar10:{tmp_path.resolve() / 'data'}"
    assert absolute_spec("imagefolder:/abs/dir") == "imagefolder:/abs/dir"
    for same in ("digits", "fashion-mnist", "synthetic:cifar:40", "fashion-mnist:/usr/x"):
        assert absolute_spec(same) == same


def test_a_corrupt_or_oversized_npz_is_one_clear_error(tmp_path):
    """A flipped byte inside a compressed member was a zlib.error traceback, and a header
    declaring 10**13 samples numpy's _ArrayMemoryError."""
    import zipfile

    x, y = np.random.default_rng(0).random((64, 8, 8)), np.arange(64) % 3
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    raw = bytearray((tmp_path / "c.npz").read_bytes())
    raw[300:340] = b"\xff" * 40
    (tmp_path / "c.npz").write_bytes(bytes(raw))
    with pytest.raises(LayerfastError, match=r"npz: cannot read .*c.npz"):
        open_data(str(tmp_path / "c.npz"))
    import io

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": "<f4", "fortran_order": False, "shape": (10**13, 1, 8, 8)})
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as z:
        z.writestr("x.npy", head.getvalue())
        z.writestr("y.npy", head.getvalue())
    with pytest.raises(LayerfastError, match=r"big.npz: an array does not fit in memory"):
        open_data(str(tmp_path / "big.npz"))


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagefolder"])
def test_a_data_directory_that_is_a_file_says_so(tmp_path, name):
    """`mnist:FILE` said the directory 'does not exist', though the path was there (a file)."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(LayerfastError, match=r"f is a file, not a directory"):
        open_data(f"{name}:{tmp_path / 'f'}")


def test_synthetic_labels_cost_8_bytes_each_at_the_peak():
    """synthetic:imagenet:1000000000 (the documented limit) was killed by the kernel: the labels
    took three 8-byte copies at once (raw draws, the modulo, the int64 cast), 24 GB. In place,
    the same labels cost 8 bytes each."""
    import tracemalloc

    from layerfast.data.synthetic import _LABEL_STREAM, SyntheticReader, _raw

    n = 2_000_000
    tracemalloc.start()
    try:
        r = SyntheticReader((3, 8, 8), 1000, n, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 9 * n, peak
    raw = _raw(3, _LABEL_STREAM, 8 * n).view(np.uint64)  # the same labels as before
    assert torch.equal(r.y, torch.from_numpy((raw % np.uint64(1000)).astype(np.int64)))

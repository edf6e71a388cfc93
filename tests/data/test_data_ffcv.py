"""FFCV: `convert(spec, to)` then reading the .beton back gives exactly the source's batches.

CI installs FFCV (see docs/data.md), so there these tests must run: they are skipped only
when `import ffcv` fails and the `CI` environment variable is unset; with CI set, a missing
FFCV fails every test here instead of hiding behind a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.data import convert, open_data
from layerfast.data.beton import sidecar_path
from layerfast.errors import LayerfastError

_threads = torch.get_num_threads()
try:
    import ffcv  # noqa: F401

    FFCV_ERROR = None
except ImportError as exc:
    FFCV_ERROR = str(exc)
torch.set_num_threads(_threads)  # importing ffcv sets it to 1: keep the session's other tests fast

pytestmark = pytest.mark.ffcv
if FFCV_ERROR is None:
    from layerfast.data.ffcv_writer import SafeDatasetWriter


def require_ffcv() -> None:
    """Skip without FFCV, except in CI, where a missing FFCV must fail (the optional extra is
    still tested there)."""
    if FFCV_ERROR is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but FFCV does not import ({FFCV_ERROR}); "
                        "CI must run: pip install ffcv==1.0.2 pillow", pytrace=False)  # fmt: skip
        pytest.skip(f"FFCV not installed ({FFCV_ERROR})")


@pytest.fixture(autouse=True)
def _need_ffcv():
    require_ffcv()


def collect(src, bs: int, start: int = 0):
    xs, ys = zip(*src.batches(bs, start), strict=True)
    assert all(len(x) == bs for x in xs[:-1]) and 1 <= len(xs[-1]) <= bs
    return torch.cat(xs), torch.cat(ys)


def same(a, b) -> None:
    assert (a.n, a.num_classes, a.shape) == (b.n, b.num_classes, b.shape)
    assert (a.mean, a.std, a.scale) == (b.mean, b.std, b.scale)


def test_digits_roundtrip(tmp_path):
    to = convert("digits", tmp_path / "sub" / "digits.beton")
    assert torch.get_num_threads() == _threads  # FFCV's Loader/import changes are undone
    assert to == tmp_path / "sub" / "digits.beton" and sidecar_path(to).is_file()
    assert sorted(p.name for p in to.parent.iterdir()) == ["digits.beton", "digits.beton.json"]
    src, ref = open_data(str(to)), open_data("digits")
    same(src, ref)
    X, Y = collect(src, 7)  # 360 = 51*7 + 3: the last partial batch must come back
    X0, Y0 = collect(ref, 360)
    assert X.dtype == torch.uint8 and torch.equal(X, X0) and torch.equal(Y, Y0)
    assert torch.equal(src.labels(), Y0)
    Xs, Ys = collect(src, 100, start=250)
    assert torch.equal(Xs, X0[250:]) and torch.equal(Ys, Y0[250:])
    small = open_data(str(to), max_samples=13)
    assert small.n == 13 and torch.equal(collect(small, 5)[0], X0[:13])
    assert torch.get_num_threads() == _threads


def test_train_split_float_and_rgb(tmp_path):
    to = convert("digits", tmp_path / "train.beton", split="train")
    assert open_data(str(to)).n == 1437
    x = np.random.default_rng(0).standard_normal((21, 3, 4, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(21) % 3)
    to = convert(str(tmp_path / "f.npz"), tmp_path / "f.beton")
    src = open_data(str(to))
    same(src, open_data(str(tmp_path / "f.npz")))
    X, Y = collect(src, 8)
    assert X.dtype == torch.float32 and torch.equal(X, torch.from_numpy(x))
    assert Y.tolist() == (np.arange(21) % 3).tolist()
    to = convert("synthetic:cifar:50", tmp_path / "s.beton")
    src, ref = open_data(str(to)), open_data("synthetic:cifar:50")
    same(src, ref)
    assert torch.equal(collect(src, 16)[0], collect(ref, 50)[0])


def test_foreign_rgb_beton(tmp_path):
    """A beton written by FFCV's own recipe (RGBImageField, no sidecar) is read as ImageNet-style
    RGB: HWC decoded to CHW, ImageNet mean/std."""
    from ffcv.fields import IntField, RGBImageField

    imgs = np.random.default_rng(1).integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)

    class DS:
        def __len__(self):
            return 11

        def __getitem__(self, i):
            return i % 4, imgs[i]  # in field order

    path = tmp_path / "rgb.beton"
    fields = {"label": IntField(), "image": RGBImageField(write_mode="raw")}  # label first
    SafeDatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(DS())
    src = open_data(str(path))
    assert (src.n, src.shape, src.num_classes, src.scale) == (11, (3, 6, 5), 4, 255.0)
    assert src.mean == (0.485, 0.456, 0.406)
    X, Y = collect(src, 4)
    assert torch.equal(X, torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert Y.tolist() == [i % 4 for i in range(11)]


@pytest.mark.parametrize("stored", [(6, 5, 3), (6, 5, 1), (3, 6, 5), (1, 6, 5), (6, 5)])
def test_foreign_ndarray_beton_hwc_or_chw(tmp_path, stored):
    """NDArrayField images from other tools (FFCV's CIFAR recipe stores HWC arrays): HWC is
    recognised by the npz rule (last axis 1 or 3, first not) and transposed; CHW is kept."""
    from ffcv.fields import IntField, NDArrayField

    imgs = np.random.default_rng(2).integers(0, 256, (7, *stored), dtype=np.uint8)

    class DS:
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return imgs[i], i % 3

    path = tmp_path / "nd.beton"
    fields = {"image": NDArrayField(np.dtype("uint8"), stored), "label": IntField()}
    SafeDatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(DS())
    src = open_data(str(path))
    want = torch.from_numpy(imgs)
    if len(stored) == 2:
        want = want[:, None]
    elif stored[2] in (1, 3) and stored[0] not in (1, 3):
        want = want.permute(0, 3, 1, 2)
    assert src.shape == tuple(want.shape[1:]) and src.scale == 255.0
    X, Y = collect(src, 3)
    assert torch.equal(X, want) and Y.tolist() == [i % 3 for i in range(7)]


@pytest.mark.parametrize("cut", ["garbage", "tiny", "half", "1", "24", "header"])
def test_corrupt_beton(tmp_path, cut):
    good = convert("digits", tmp_path / "good.beton").read_bytes()
    data = {
        "garbage": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
        "tiny": good[:10],
        "half": good[: len(good) // 2],
        "1": good[:-1],
        "24": good[:-24],  # exactly one allocation-table entry missing
        "header": good[:2000],
    }[cut]
    bad = tmp_path / "bad.beton"
    bad.write_bytes(data)
    with pytest.raises(LayerfastError, match="not a valid FFCV .beton|is corrupt"):
        open_data(str(bad))


def test_beton_errors(tmp_path):
    from ffcv.fields import IntField, NDArrayField

    class DS:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return np.zeros((2, 2), np.uint8), i

    path = tmp_path / "img.beton"
    fields = {"img": NDArrayField(np.dtype("uint8"), (2, 2)), "label": IntField()}
    SafeDatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(DS())
    with pytest.raises(LayerfastError, match="has no field 'image'"):
        open_data(str(path))
    DS.__getitem__ = lambda self, i: (np.zeros((2, 2), np.uint8), i - 1)
    fields = {"image": NDArrayField(np.dtype("uint8"), (2, 2)), "label": IntField()}
    SafeDatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(DS())
    with pytest.raises(LayerfastError, match="labels must be >= 0, found -1"):
        open_data(str(path))
    with pytest.raises(LayerfastError, match="must end in .beton"):
        convert("digits", tmp_path / "out.npz")
    with pytest.raises(LayerfastError, match="unknown data spec"):
        convert("nope", tmp_path / "out.beton")
    assert not (tmp_path / "out.beton").exists()
    to = convert("digits", tmp_path / "d.beton")
    side = sidecar_path(to)
    side.write_text(side.read_text().replace('"n": 360', '"n": 361'))
    with pytest.raises(LayerfastError, match="describes a different file"):
        open_data(str(to))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"scale": 0}, r"scale must be a finite number > 0, got 0"),
        ({"scale": -16.0}, r"scale must be a finite number > 0"),
        ({"mean": [float("nan")]}, r"mean must be null or a list of finite numbers"),
        ({"mean": "x"}, r"mean must be null or a list"),
        ({"num_classes": "x"}, r"num_classes must be a positive integer, got 'x'"),
        ({"num_classes": True}, r"num_classes must be a positive integer"),
        ({"format": "other"}, r"not a layerfast sidecar \(format 'other'"),
        ({"mean": None, "std": None, "drop": "mean"}, r"missing mean"),
    ],
)
def test_a_bad_sidecar_is_one_clear_error(tmp_path, edit, match):
    """A scale of 0 or a NaN mean in PATH.beton.json made every input Inf/NaN and the analysis
    exited 0 near chance; a missing key or a wrong type was a traceback."""
    import json

    to = convert("digits", tmp_path / "d.beton")
    side = sidecar_path(to)
    meta = json.loads(side.read_text())
    edit = dict(edit)
    drop = edit.pop("drop", None)
    meta.update(edit)
    meta.pop(drop, None)
    side.write_text(json.dumps(meta))
    with pytest.raises(LayerfastError, match=match):
        open_data(str(to))


def test_convert_leaves_nothing_on_failure(tmp_path):
    """A sample that fails mid-conversion (a corrupt image after a good one) leaves no file, and
    not the folder `out` it created for the target either."""
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    (tmp_path / "imgs" / "a" / "1.png").write_bytes(b"broken")
    out = tmp_path / "out"
    with pytest.raises(LayerfastError, match="cannot decode"):
        convert(f"imagefolder:{tmp_path / 'imgs'}", out / "m.beton")
    assert not out.exists()
    out.mkdir()  # a folder that was there before stays, empty
    with pytest.raises(LayerfastError, match="cannot decode"):
        convert(f"imagefolder:{tmp_path / 'imgs'}", out / "m.beton")
    assert list(out.iterdir()) == []


def test_fashion_mnist_beton(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and not os.environ.get("CI"):
        pytest.skip("no Fashion-MNIST")
    to = convert("fashion-mnist", tmp_path / "fm.beton")
    src, ref = open_data(str(to)), open_data("fashion-mnist")
    same(src, ref)
    X, Y = collect(src, 999)  # 10000 = 10*999 + 10
    assert torch.equal(X, collect(ref, 10000)[0]) and torch.equal(Y, ref.labels())


def test_writer_worker_failure_raises(tmp_path):
    """FFCV's own writer waits forever when a worker dies; ours raises."""
    from ffcv.fields import IntField

    class Broken:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            raise RuntimeError("sample read failed")

    w = SafeDatasetWriter(str(tmp_path / "b.beton"), {"label": IntField()}, num_workers=2)
    with pytest.raises(LayerfastError, match="writer process failed"):
        w.from_indexed_dataset(Broken())


def test_imagefolder_roundtrip(tmp_path):
    """`convert imagefolder:DIR` stores the 224×224 eval crops: reading the beton gives the
    spec's pixels, labels and ImageNet normalisation, grayscale and RGBA sources included."""
    from PIL import Image

    rng = np.random.default_rng(5)
    for i, (cls, mode, size) in enumerate([("b", "L", (300, 260)), ("a", "RGBA", (260, 300)),
                                           ("a", "RGB", (256, 256)), ("c", "P", (70, 40))]):  # fmt: skip
        (tmp_path / "imgs" / "val" / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(tmp_path / "imgs" / "val" / cls / f"{i}.png")
    spec = f"imagefolder:{tmp_path / 'imgs'}"
    to = convert(spec, tmp_path / "if.beton")
    src, ref = open_data(str(to)), open_data(spec)
    same(src, ref)
    X, Y = collect(src, 3)
    X0, Y0 = collect(ref, 4)
    assert X.shape == (4, 3, 224, 224) and torch.equal(X, X0) and Y.tolist() == Y0.tolist()
    assert Y.tolist() == [0, 0, 1, 2]


def test_convert_refuses_a_target_it_cannot_write_before_decoding(tmp_path):
    """`--to` a directory was an IsADirectoryError traceback that left an orphan sidecar; under
    a file, a FileExistsError; in /sys, a PermissionError."""
    (tmp_path / "x.beton").mkdir()
    with pytest.raises(LayerfastError, match=r"x.beton exists and is not a file"):
        convert("digits", tmp_path / "x.beton")
    assert not sidecar_path(tmp_path / "x.beton").exists()
    (tmp_path / "f").write_text("hi")
    with pytest.raises(LayerfastError, match=r"f is not a directory"):
        convert("digits", tmp_path / "f" / "sub" / "x.beton")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "d.beton.json").mkdir()
    with pytest.raises(LayerfastError, match=r"d.beton.json exists and is not a file"):
        convert("digits", tmp_path / "ro" / "d.beton")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d.beton.json", "f", "ro", "x.beton"]

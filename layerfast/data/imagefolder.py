"""`imagefolder:DIR`: DIR/<split>/<class>/*.jpg (or DIR/<class>/... without split folders).

One eval transform, the standard ImageNet one, reproduced exactly as torchvision does it on a
PIL image so torchvision-trained models see the pixels they expect: convert("RGB"), Resize(256)
(shorter side to 256, bilinear, the longer side `int(256 * long / short)`), CenterCrop(224).
Class indices follow torchvision's ImageFolder (sorted folder names); files are found the same
way (sorted, recursive, its extension list). Images decode lazily per batch on a thread pool
(PIL releases the GIL while decoding and resizing), so memory stays at one batch. Pillow is
imported only here: other specs never need it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from layerfast.data.source import IMAGENET_MEAN, IMAGENET_STD, DataSource, make_source, need_dir
from layerfast.errors import LayerfastError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
RESIZE, CROP = 256, 224
SPLIT_DIRS = {"test": ("test", "val", "validation"), "train": ("train",)}


def _pil():  # noqa: ANN202 - the PIL module
    try:
        from PIL import Image
    except ImportError:
        raise LayerfastError("imagefolder needs pillow: pip install pillow") from None
    return Image


def eval_transform(img) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """RGB, Resize(256) bilinear on the shorter side, CenterCrop(224) -> uint8 [3, 224, 224]."""
    Image = _pil()
    img = img.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(RESIZE * long / short)
    new_w, new_h = (RESIZE, new_long) if w <= h else (new_long, RESIZE)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - CROP) / 2.0)), int(round((new_w - CROP) / 2.0))
    img = img.crop((left, top, left + CROP, top + CROP))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _is_image(fname: str) -> bool:
    """An image file name: torchvision's extensions, not hidden. A hidden `._img.jpg` is the
    AppleDouble resource fork macOS writes beside every file it copies to a foreign volume
    (and into zips, under `__MACOSX/`): read as an image it refused the whole data set as
    "cannot decode"."""
    return not fname.startswith(".") and fname.lower().endswith(EXTENSIONS)


def _list_images(folder: Path) -> list[Path]:
    """Images below `folder`, sorted, following symlinks (as torchvision does) but not into
    a folder that is its own ancestor: a link such as `cat/loop -> ..` was walked until the
    path grew too long, reading each image dozens of times as separate samples. The folders
    above `folder` count as ancestors too: `cat/loop -> ..` leads to the split's root, and
    followed it read every other class's images again under cat's label."""
    walked: list[tuple[str, list[str]]] = []
    above = frozenset(map(str, Path(os.path.realpath(folder)).parents))
    ancestors: dict[str, frozenset[str]] = {str(folder): above}
    for root, dirs, fnames in os.walk(folder, followlinks=True):
        chain = ancestors.pop(root, frozenset()) | {os.path.realpath(root)}
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) not in chain]
        ancestors.update((os.path.join(root, d), chain) for d in dirs)
        walked.append((root, fnames))
    out: list[Path] = []
    for root, fnames in sorted(walked):
        out += [Path(root) / f for f in sorted(fnames) if _is_image(f)]
    return out


def _has_image(folder: Path) -> bool:
    """Whether `folder` holds an image anywhere below it (stops at the first one)."""
    for _, _, fnames in os.walk(folder, followlinks=True):
        if any(map(_is_image, fnames)):
            return True
    return False


def find_samples(directory: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and class names for `split`. With split folders, classes are the sorted
    union over all of them, so a class missing from test/ does not shift every later index."""
    need_dir("imagefolder", directory)
    split_names = {s for names in SPLIT_DIRS.values() for s in names}
    # in any case (`Train/`, `Val/`): read as class folders, a split folder's name became a
    # class and both splits' images were mixed, without a word
    present = [d for d in sorted(directory.iterdir())
               if d.is_dir() and d.name.lower() in split_names]
    if present:
        by_name: dict[str, list[Path]] = {}
        for d in present:
            by_name.setdefault(d.name.lower(), []).append(d)
        root = next((min(by_name[s], key=lambda d: d.name != s)  # the lowercase one first
                     for s in SPLIT_DIRS[split] if s in by_name), None)
        if root is None:
            raise LayerfastError(
                f"imagefolder: {directory} has split folders {[d.name for d in present]} but no "
                f"{' or '.join(SPLIT_DIRS[split])}/ for split {split!r}"
            )
        classes = sorted({c.name for d in present for c in d.iterdir() if c.is_dir()})
        others = [d for d in present if d != root]
    else:
        root, others = directory, []
        classes = sorted(c.name for c in directory.iterdir() if c.is_dir())
    if not classes:
        raise LayerfastError(f"imagefolder: no class folders in {root} (expected {root}/<class>/)")
    files: list[Path] = []
    labels: list[int] = []
    imageless: list[str] = []
    for k, c in enumerate(classes):
        found = _list_images(root / c) if (root / c).is_dir() else []
        files += found
        labels += [k] * len(found)
        if not found and not any((d / c).is_dir() and _has_image(d / c) for d in others):
            imageless.append(c)
    # A folder with no image in any split (Jupyter's hidden .ipynb_checkpoints, an emptied
    # class) would still take a class index and shift every later class by one, so a model
    # trained without it is scored against wrong labels. torchvision's ImageFolder, whose
    # class order this follows, refuses it too. (All folders empty: the caller says "empty".)
    if files and imageless:
        shown = ", ".join(imageless[:5]) + (", ..." if len(imageless) > 5 else "")
        raise LayerfastError(
            f"imagefolder: class folder(s) {shown} in {directory} hold no images "
            f"({', '.join(EXTENSIONS)}) in any split; as classes they would shift the indices "
            "of every later class (torchvision's ImageFolder refuses them too): remove them"
        )
    return files, labels, classes


class ImageFolderReader:
    def __init__(self, files: list[Path], labels: list[int], workers: int) -> None:
        self.files, self.y, self.workers = files, torch.tensor(labels, dtype=torch.int64), workers

    def _decode(self, path: Path) -> np.ndarray:
        Image = _pil()
        try:
            with Image.open(path) as img:
                return eval_transform(img)
        # PIL's plugins raise more than OSError on corrupt files: a PNG with a bad chunk
        # length is a SyntaxError, others struct.error, EOFError, IndexError, ...
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                struct.error, Image.DecompressionBombError) as exc:  # fmt: skip
            raise LayerfastError(f"imagefolder: cannot decode {path}: {exc}") from exc

    def batches(self, batch_size: int, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for i in range(start, stop, batch_size):
                j = min(i + batch_size, stop)
                x = np.empty((j - i, 3, CROP, CROP), dtype=np.uint8)
                for k, arr in enumerate(pool.map(self._decode, self.files[i:j])):
                    x[k] = arr
                yield torch.from_numpy(x), self.y[i:j]

    def labels(self, stop: int) -> Tensor:
        return self.y[:stop].clone()


def open_imagefolder(directory: Path, split: str, max_samples: int | None) -> DataSource:
    _pil()
    files, labels, classes = find_samples(directory, split)
    if not files:
        raise LayerfastError(
            f"imagefolder: {directory} has class folders but no images "
            f"({', '.join(EXTENSIONS)}) for split {split!r}: the dataset is empty"
        )
    workers = min(16, os.cpu_count() or 1)
    return make_source(
        f"imagefolder:{directory}", ImageFolderReader(files, labels, workers), total=len(files),
        num_classes=len(classes), shape=(3, CROP, CROP), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        scale=255.0, max_samples=max_samples,
    )  # fmt: skip

"""`PATH.beton` (FFCV) reading, and `convert(spec, to)` writing one.

Reading follows FFCV's ImageNet val pipeline: sequential order, `drop_last=False` (FFCV's
Loader drops the last partial batch by default, which would silently skip samples), decode on
the CPU, normalise later on the device. The file is validated against its own header before
FFCV touches it: FFCV reads through memory maps in compiled code, where a truncated file would
crash the process instead of raising.

`convert` stores images as `NDArrayField(dtype, (C, H, W))`, not JPEG/RGBImageField: it
round-trips bit for bit (grayscale included, no channel replication), decoding is a memcpy,
and it is what the spec produced (imagefolder: after Resize 256 + CenterCrop 224). Betons lack
user metadata, so normalisation and the class count go to a sidecar `PATH.beton.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from layerfast.data.source import IMAGENET_MEAN, IMAGENET_STD, DataSource, make_source
from layerfast.errors import LayerfastError, warn

SIDECAR_FORMAT = "layerfast-beton-1"
_TYPE_NAMES = {0: "float", 1: "int", 2: "rgb-image", 3: "bytes", 4: "ndarray", 5: "json",
               6: "torch-tensor"}  # fmt: skip
NO_FFCV = "reading and writing .beton files needs FFCV: pip install layerfast[ffcv]"


def require_ffcv() -> None:
    """Import FFCV or explain how to install it. Importing ffcv sets torch's thread count to 1
    (ffcv/pipeline/compiler.py), which would slow every later CPU op: it is restored."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
    except ImportError as exc:
        raise LayerfastError(f"{NO_FFCV} ({exc})") from None
    finally:
        _restore_threads(threads)


def _restore_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


#: The sidecar's `fingerprint` of its .beton: BLAKE2b over the size and the whole file up to
#: 64 MiB, above that over 64 blocks of 64 KiB spread from the first byte to the last, so an
#: open reads at most 64 MiB whatever the size. Whole below: FFCV pages are 2 MiB or more, and
#: a small dataset's few KiB of pixels sit in one of them, between blocks a sample misses.
_FINGERPRINT_NAME = "blake2b-v1"
_FINGERPRINT_WHOLE = 64 << 20
_FINGERPRINT_BLOCKS = 64
_FINGERPRINT_BLOCK = 1 << 16


def beton_fingerprint(path: str | os.PathLike[str]) -> str:
    """A content fingerprint of a .beton, kept in its sidecar and checked on read. `convert`
    moves the sidecar into place just before the .beton: killed between the two, a target
    that held other data of the same n and byte size kept its old .beton beside the new
    sidecar, whose mean/std and class count were then applied to the wrong data. n and size
    cannot tell them apart; the pixels can, read whole or, in a large file (whose pages are
    full of samples), sampled, so as not to read gigabytes per open."""
    h = hashlib.blake2b(digest_size=16)
    blocks, block = _FINGERPRINT_BLOCKS, _FINGERPRINT_BLOCK
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        if size <= _FINGERPRINT_WHOLE:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:
            for i in range(blocks):
                f.seek((size - block) * i // (blocks - 1))
                h.update(f.read(block))
    return f"{_FINGERPRINT_NAME}:{h.hexdigest()}"


def _open_reader(path: Path) -> Any:
    """FFCV's Reader after checking every offset in the file lies inside the file."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    size = path.stat().st_size
    bad = f"beton: {path} is not a valid FFCV .beton (corrupt or truncated)"
    if size < HeaderType.itemsize:
        raise LayerfastError(f"{bad}: only {size} bytes")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise LayerfastError(f"{bad}: format version {int(header['version'])}, FFCV 1.0 writes "
                             f"{CURRENT_VERSION}")  # fmt: skip
    nf = int(header["num_fields"])
    fields_end = HeaderType.itemsize + nf * FieldDescType.itemsize
    if not 1 <= nf <= 64 or fields_end > size:
        raise LayerfastError(f"{bad}: header claims {nf} fields")
    descs = np.fromfile(path, dtype=FieldDescType, count=nf, offset=HeaderType.itemsize)
    unknown = sorted({int(t) for t in descs["type_id"]} - set(_TYPE_NAMES))
    if unknown:
        raise LayerfastError(f"{bad}: unknown field type ids {unknown}")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # FFCV raises assorted errors on garbage
        raise LayerfastError(f"{bad}: {type(exc).__name__}: {exc}") from exc
    table_at = int(header["alloc_table_ptr"])
    meta_end = fields_end + int(reader.num_samples) * reader.metadata_type.itemsize
    if not meta_end <= table_at <= size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise LayerfastError(f"{bad}: allocation table at byte {table_at} of {size}")
    if len(reader.metadata) != reader.num_samples:
        raise LayerfastError(f"{bad}: metadata for {len(reader.metadata)} of "
                             f"{reader.num_samples} samples")  # fmt: skip
    table = reader.alloc_table
    if len(table) and (int((table["ptr"] + table["size"]).max()) > table_at
                       or int(table["ptr"].min()) < meta_end):  # fmt: skip
        raise LayerfastError(f"{bad}: sample data points outside the data region")
    return reader


def _field_index(reader: Any, name: str, path: Path) -> int:
    if name not in reader.field_names:
        raise LayerfastError(
            f"beton: {path} has no field {name!r} (fields: {reader.field_names}); layerfast "
            "reads fields 'image' and 'label'"
        )
    return reader.field_names.index(name)


def _check_ptrs(reader: Any, ptrs: np.ndarray, min_size: int, path: Path) -> None:
    table = np.sort(reader.alloc_table, order="ptr")
    if len(table) == 0:
        raise LayerfastError(f"beton: {path} is corrupt: it holds no image data")
    pos = np.minimum(np.searchsorted(table["ptr"], ptrs), len(table) - 1)
    if not (table["ptr"][pos] == ptrs).all() or int(table["size"][pos].min()) < min_size:
        raise LayerfastError(f"beton: {path} is corrupt: image data of some samples is missing")


class BetonReader:
    def __init__(self, path: Path, names: list[str], image_type: int, image_shape: tuple[int, ...],
                 labels: Tensor, crop: bool, hwc: bool = False) -> None:  # fmt: skip
        self.path, self.names, self.image_type = path, names, image_type
        self.image_shape, self.y, self.crop, self.hwc = image_shape, labels, crop, hwc

    def _pipelines(self, field_names: list[str]) -> dict[str, Any]:
        from ffcv.fields.decoders import (
            CenterCropRGBImageDecoder,
            IntDecoder,
            NDArrayDecoder,
            SimpleRGBImageDecoder,
        )
        from ffcv.transforms import ToTensor

        if self.image_type == 4:
            image = [NDArrayDecoder(), ToTensor()]
        elif self.crop:  # FFCV's ImageNet val decoder: centre crop 224/256, resize to 224
            image = [CenterCropRGBImageDecoder((224, 224), ratio=224 / 256), ToTensor()]
        else:
            image = [SimpleRGBImageDecoder(), ToTensor()]
        pipes: dict[str, Any] = {n: None for n in field_names}
        pipes.update(image=image, label=[IntDecoder(), ToTensor()])
        return pipes

    def batches(self, batch_size: int, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        from ffcv.loader import Loader, OrderOption

        names = self.names
        threads = torch.get_num_threads()  # FFCV's Loader sets torch's to its worker count
        loader = Loader(
            str(self.path), batch_size=batch_size, num_workers=min(8, os.cpu_count() or 1),
            order=OrderOption.SEQUENTIAL, drop_last=False, indices=np.arange(start, stop),
            pipelines=self._pipelines(names), os_cache=True,
        )  # fmt: skip
        order = [n for n in names if n in ("image", "label")]
        _restore_threads(threads)
        for out in loader:
            _restore_threads(threads)
            x, y = out[order.index("image")], out[order.index("label")]
            # FFCV recycles its output buffers a few batches later: hand out our own copy.
            if self.image_type == 2 or self.hwc:  # HWC -> CHW
                c, h, w = self.image_shape
                x = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)
            else:
                x = x.reshape(-1, *self.image_shape)
            yield (
                x.clone(memory_format=torch.contiguous_format),
                y.reshape(-1).to(torch.int64, copy=True),
            )

    def labels(self, stop: int) -> Tensor:
        return self.y[:stop].clone()


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _check_sidecar(meta: Any, side: Path) -> None:
    """The sidecar's fields, each with its own message: a scale of 0 or a NaN mean turned every
    input into Inf/NaN and the run still exited 0 (near chance), a missing key was a KeyError."""
    def bad(what: str) -> LayerfastError:
        return LayerfastError(f"beton: {side}: {what}; re-run layerfast convert")

    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise bad(f"not a layerfast sidecar (format {got!r}, expected {SIDECAR_FORMAT!r})")
    missing = [k for k in ("n", "bytes", "num_classes", "scale", "mean", "std") if k not in meta]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    nc = meta["num_classes"]
    if isinstance(nc, bool) or not isinstance(nc, int) or not 1 <= nc < 2**63:
        raise bad(f"num_classes must be a positive integer, got {nc!r}")
    if not _finite_number(meta["scale"]) or meta["scale"] <= 0:
        raise bad(f"scale must be a finite number > 0, got {meta['scale']!r}")
    for key in ("mean", "std"):
        v = meta[key]
        if v is not None and not (isinstance(v, list) and v and all(map(_finite_number, v))):
            raise bad(f"{key} must be null or a list of finite numbers, got {v!r}")
    if "fingerprint" in meta and not isinstance(meta["fingerprint"], str):
        raise bad(f"fingerprint must be a string, got {meta['fingerprint']!r}")


def _read_sidecar(path: Path, n: int) -> dict[str, Any] | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise LayerfastError(f"beton: cannot read {side}: {exc}") from None
    _check_sidecar(meta, side)
    # a sidecar from before session 22 has no fingerprint: n and size are all it can check
    if (meta.get("n") != n or meta.get("bytes") != path.stat().st_size
            or meta.get("fingerprint", None) not in (None, beton_fingerprint(path))):  # fmt: skip
        raise LayerfastError(
            f"beton: {side} describes a different file than {path}; re-run layerfast convert"
        )
    return meta


def open_beton(path: Path, split: str, max_samples: int | None, *,
               split_flag: str | None = "--split") -> DataSource:
    """Open a .beton (fields `image`, `label`). A beton holds one split, so `split` does not
    choose one; but where the sidecar says `convert` wrote the other split, that is said
    (a warning, kept in run.json): `analyze --data cifar-train.beton` measured the training
    set under the default `--split test`, and nothing said so."""
    if not path.is_file():
        raise LayerfastError(f"beton: file {path} does not exist")
    require_ffcv()
    reader = _open_reader(path)
    n = int(reader.num_samples)
    if n == 0:
        raise LayerfastError(f"beton: {path} holds no samples: the dataset is empty")
    ii, il = _field_index(reader, "image", path), _field_index(reader, "label", path)
    itype, ltype = (int(t) for t in reader.field_descriptors["type_id"][[ii, il]])
    if ltype != 1:
        raise LayerfastError(f"beton: {path}: 'label' must be an IntField, is {_TYPE_NAMES[ltype]}")
    meta = reader.metadata[f"f{ii}"]
    labels = reader.metadata[f"f{il}"].astype(np.int64)
    if labels.min() < 0:
        raise LayerfastError(f"beton: {path}: labels must be >= 0, found {int(labels.min())}")
    side = _read_sidecar(path, n)
    crop = hwc = False
    if itype == 4:
        h = reader.handlers["image"]
        shape = tuple(int(s) for s in h.shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 or h.dtype not in (np.uint8, np.float32):
            raise LayerfastError(f"beton: {path}: 'image' must be uint8 or float32 (C, H, W), "
                                 f"(H, W, C) or (H, W), is {h.dtype} {tuple(h.shape)}")  # fmt: skip
        # (H, W, C) as written by other tools (FFCV's CIFAR recipes store HWC arrays): the
        # same rule as for npz x — last axis 1 or 3 and the first not. `convert` writes CHW.
        hwc = side is None and shape[2] in (1, 3) and shape[0] not in (1, 3)
        if hwc:
            shape = (shape[2], shape[0], shape[1])
        _check_ptrs(reader, meta, h.element_size, path)
        scale: float = 255.0 if h.dtype == np.uint8 else 1.0
        mean = std = None
    elif itype == 2:
        _check_ptrs(reader, meta["data_ptr"], 1, path)
        hs, ws = meta["height"], meta["width"]
        crop = bool(hs.min() != hs.max() or ws.min() != ws.max())
        shape = (3, 224, 224) if crop else (3, int(hs[0]), int(ws[0]))
        scale, mean, std = 255.0, IMAGENET_MEAN, IMAGENET_STD
    else:
        raise LayerfastError(f"beton: {path}: 'image' must be an NDArrayField or RGBImageField, "
                             f"is {_TYPE_NAMES[itype]}")  # fmt: skip
    num_classes = int(labels.max()) + 1
    counted: tuple[str, ...] = ("label",)  # the class count's source (DataSource)
    if side is not None:
        _warn_other_split(path, side, split, split_flag)
        scale, num_classes, counted = float(side["scale"]), int(side["num_classes"]), ()
        mean, std = side["mean"], side["std"]
        if labels.max() >= num_classes:
            raise LayerfastError(f"beton: {path}: label {int(labels.max())} >= num_classes "
                                 f"{num_classes} from {sidecar_path(path)}")  # fmt: skip
    beton = BetonReader(
        path, list(reader.field_names), itype, shape, torch.from_numpy(labels), crop, hwc
    )
    return make_source(
        str(path), beton, total=n, num_classes=num_classes, shape=shape, mean=mean, std=std, scale=scale,
        max_samples=max_samples, classes_from_labels=counted,
    )  # fmt: skip


def _warn_other_split(path: Path, side: dict[str, Any], split: str,
                      split_flag: str | None) -> None:
    """Warn when the sidecar records that `path` holds the split other than `split` (a sidecar
    from before the field, or another value, says nothing). `split_flag`: the name of the
    argument that chose `split`, which the warning says cannot choose another (`--split`, or
    `open_data`'s own argument from Python); None where there is none: `train` and `bench`
    read the splits they need, and the warning told their users that a flag they lack "cannot
    choose another"."""
    held = side.get("split")
    if held in ("test", "train") and held != split:
        tail = f", {split_flag} cannot choose another" if split_flag else ""
        warn(f"{path} holds the {held} split of {side.get('source')!r} (its sidecar says so), "
             f"used here as the {split} split: a beton holds one split{tail}")


def check_target(to: Path, split: str | None = None) -> None:
    """Bad `--to` paths, before any data is decoded: the wrong suffix, a directory where the
    .beton or its sidecar goes, a file where a parent directory should be; and, given the
    `split` to write, a .beton whose sidecar says it holds the other split.

    That one was replaced without a word: `convert cifar10:DIR --split train --to cifar.beton`
    after the test split went to the same path destroyed a conversion that can take an hour
    (ImageNet). The same split again is a re-conversion, and goes ahead."""
    if to.suffix.lower() != ".beton":  # any case, as `--data` reads them
        raise LayerfastError(f"convert: the output must end in .beton, got {to}")
    for p in (to, sidecar_path(to)):
        if p.exists() and not p.is_file():
            raise LayerfastError(f"convert: {p} exists and is not a file")
    held = _held_split(to)
    if split in ("test", "train") and held is not None and held[0] != split:
        raise LayerfastError(
            f"convert: {to} holds the {held[0]} split of {held[1]!r} (its sidecar says so); "
            f"writing the {split} split there would replace it: remove it first, or choose "
            "another --to")
    parent = to.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LayerfastError(f"convert: {parent} is not a directory, so {to} cannot be written")


def warn_other_source(to: Path, spec: str, split: str) -> None:
    """Warn when `to`'s sidecar says it holds this `split` of another data set than `spec`
    (`data_key` tells two spellings of one data set from two data sets): converting digits
    onto an existing fashion-mnist.beton replaced it without a word. The same split is a
    re-conversion, so it goes ahead (the other split is refused: `check_target`)."""
    from layerfast.data.spec import data_key  # lazy: spec imports this module lazily too

    held = _held_split(to)
    if held is None or held[0] != split or not isinstance(held[1], str) or not held[1].strip():
        return
    try:
        same = data_key(held[1]) == data_key(spec)
    except (OSError, ValueError, RuntimeError):  # a path that cannot be resolved: say so
        same = False
    if not same:
        warn(f"convert: {to} holds the {split} split of {held[1]!r} (its sidecar says so); "
             f"it is replaced by the {split} split of {spec!r}")


def _held_split(to: Path) -> tuple[str, Any] | None:
    """(split, source) that an existing `to`'s sidecar records; None where there is no such
    pair, or the sidecar cannot be read (reading the beton says what is wrong with it)."""
    side = sidecar_path(to)
    if not (to.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    held = meta.get("split") if isinstance(meta, dict) else None
    return (held, meta.get("source")) if held in ("test", "train") else None


class _Staged:
    """Random access for FFCV's writer workers over a memmap staged by the main process: the
    workers then cannot fail (a failing worker makes FFCV's writer wait forever)."""

    def __init__(self, xpath: str, shape: tuple[int, ...], dtype: str, y: np.ndarray) -> None:
        self.xpath, self.shape, self.dtype, self.y = xpath, shape, dtype, y
        self._x: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if self._x is None:
            self._x = np.memmap(self.xpath, dtype=self.dtype, mode="r", shape=self.shape)
        return np.ascontiguousarray(self._x[i]), int(self.y[i])


def _make_parents(folder: Path, created: list[Path]) -> None:
    """`mkdir -p folder`, appending to `created` each folder whose own mkdir made it (as it is
    made, so a later failure still leaves the list right). Made one by one instead of
    listing what did not exist beforehand: `missing/../keep` does not exist while `missing`
    does not, though `keep` may (the user's folder, removed on failure), and a folder another
    process makes meanwhile is not this call's to remove."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):  # outermost first
        try:
            d.mkdir()
        except FileExistsError:  # reached another way (`..`), or made by someone else
            if not d.is_dir():
                raise
            continue
        created.append(d)


def _lock_path(to: Path) -> Path:
    return to.parent / f".{to.name}.lock"


#: The temporaries `convert` makes next to `to` (mkstemp: 8 random characters).
_TEMPORARY = r"\.{name}\.[a-z0-9_]{{8}}\.(stage|tmp|json\.tmp)"


def _lock_target(to: Path) -> Any:
    """Lock `to` against a second convert writing it, and delete what a killed convert left.

    `convert`'s temporaries are as big as the data (a staged copy of the pixels and the .beton
    being written: 7.5 GB each for ImageNet's validation set); one that was SIGKILLed (the OOM
    killer, a scheduler's kill -9) left them hidden next to `to` for good. Under the lock no
    other convert is writing them."""
    from layerfast.store import _acquire_lock

    lock = _acquire_lock(to.parent, _lock_path(to).name, target=to, flag="--to")
    if lock is not None:
        pattern = re.compile(_TEMPORARY.format(name=re.escape(to.name)))
        for p in to.parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
    return lock


def _unlock_target(to: Path, lock: Any) -> None:
    """Drop the lock and its file, so that the folder holds only the .beton and its sidecar."""
    if lock is None:
        return
    with contextlib.suppress(OSError):
        _lock_path(to).unlink()
    lock.close()


def convert(source: DataSource, spec: str, split: str, to: Path) -> Path:
    """Write `source` to `to` (a .beton) plus its sidecar; nothing half-written on failure:
    not the temporaries, and not the missing parent directories it created for `to`."""
    require_ffcv()
    from ffcv.fields import IntField, NDArrayField

    from layerfast.data.ffcv_writer import SafeDatasetWriter

    check_target(to, split)
    tmp: list[str] = []
    created: list[Path] = []  # the folders this call made, deepest last
    done = False
    lock = None
    try:
        _make_parents(to.parent, created)
        lock = _lock_target(to)
        fd, xpath = tempfile.mkstemp(prefix=f".{to.name}.", suffix=".stage", dir=to.parent)
        os.close(fd)
        tmp.append(xpath)
        shape = (source.n, *source.shape)
        dtype = "uint8"
        ys = np.empty(source.n, dtype=np.int64)
        x_map: np.memmap | None = None
        i = 0
        for x, y in source.batches(1024):
            if x_map is None:
                dtype = str(x.numpy().dtype)
                x_map = np.memmap(xpath, dtype=dtype, mode="w+", shape=shape)
            x_map[i : i + len(x)] = x.numpy()
            ys[i : i + len(y)] = y.numpy()
            i += len(x)
        assert x_map is not None and i == source.n
        x_map.flush()
        del x_map
        fd, bpath = tempfile.mkstemp(prefix=f".{to.name}.", suffix=".tmp", dir=to.parent)
        os.close(fd)
        tmp.append(bpath)
        fields = {"image": NDArrayField(np.dtype(dtype), source.shape), "label": IntField()}
        # FFCV gives each worker its own pages: small data gets one worker and 2 MiB pages
        # (digits: 48 KiB of pixels would otherwise become a 16 MiB file).
        sample_bytes = int(np.prod(source.shape)) * np.dtype(dtype).itemsize
        big = source.n * sample_bytes > 256 << 20
        page = max(1 << 21, 1 << (sample_bytes + 64).bit_length())
        workers = min(4, os.cpu_count() or 1) if big else 1
        writer = SafeDatasetWriter(bpath, fields, page_size=page, num_workers=workers)
        writer.from_indexed_dataset(_Staged(xpath, shape, dtype, ys), chunksize=256)
        meta = {"format": SIDECAR_FORMAT, "source": spec, "split": split, "name": source.name,
                "n": source.n, "bytes": os.path.getsize(bpath), "num_classes": source.num_classes,
                "shape": list(source.shape), "mean": source.mean, "std": source.std,
                "scale": source.scale}  # fmt: skip
        meta["fingerprint"] = beton_fingerprint(bpath)
        fd, spath = tempfile.mkstemp(prefix=f".{to.name}.", suffix=".json.tmp", dir=to.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1)
        tmp.append(spath)
        umask = os.umask(0)
        os.umask(umask)
        for p in (bpath, spath):  # mkstemp makes 0600 files; give the usual permissions
            os.chmod(p, 0o666 & ~umask)
        os.replace(spath, sidecar_path(to))
        try:
            os.replace(bpath, to)
        except OSError:  # no sidecar without its .beton; beside an old .beton the new one
            # stays, its fingerprint refusing the pair: removed, the old data read as a
            # foreign beton, without its own sidecar's mean/std
            if not to.exists():
                os.unlink(sidecar_path(to))
            raise
        done = True
    except OSError as exc:  # a read-only or full disk: one line, nothing left behind
        raise LayerfastError(f"convert: cannot write {to}: {exc.strerror or exc}") from None
    finally:
        for p in tmp:
            if os.path.exists(p):
                os.unlink(p)
        _unlock_target(to, lock)
        if not done:  # a bad image, Ctrl-C: an empty `out/sub/` is half-written too
            for d in reversed(created):
                with contextlib.suppress(OSError):  # not empty (another writer), or gone
                    d.rmdir()
    return to

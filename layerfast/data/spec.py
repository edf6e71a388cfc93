"""Parse a `--data` spec and open it. The one place that knows every spec's spelling.

Spec modules are imported lazily: `digits` must not pay for FFCV/numba, nor `mnist` for PIL.
"""

from __future__ import annotations

import contextlib
import json
import os
import reprlib
from pathlib import Path

from layerfast.data.source import DataSource, check_max_samples
from layerfast.errors import LayerfastError

SPLITS = ("test", "train")
VALID_SPECS = (
    "digits",
    "fashion-mnist[:DIR]",
    "mnist:DIR",
    "cifar10:DIR",
    "imagefolder:DIR",
    "PATH.beton",
    "PATH.npz",
    "synthetic:imagenet[:N]",
    "synthetic:cifar[:N]",
)


def _unknown(spec: str, why: str) -> LayerfastError:
    return LayerfastError(
        f"unknown data spec {spec!r}: {why}; valid specs: {', '.join(VALID_SPECS)}"
    )


def _dir(name: str, arg: str, spec: str) -> Path:
    if not arg:
        raise _unknown(spec, f"{name} needs a directory, as {name}:DIR")
    return Path(arg).expanduser()


def data_paths(spec: str) -> list[Path]:
    """The file or directory a spec reads, resolved ([] for `digits` and `synthetic:...`, which
    read nothing the user can change). For the resume fingerprint: data rewritten between an
    interrupted run and its rerun must not be resumed over."""
    spec = spec.strip()
    if spec.lower().endswith((".beton", ".npz")):
        return [Path(spec).expanduser().resolve()]
    name, _, arg = spec.partition(":")
    name = name.lower()
    if name == "fashion-mnist" and not arg:
        from layerfast.data.idx import FASHION_MNIST_DIR

        return [Path(FASHION_MNIST_DIR).resolve()]
    if name in ("mnist", "fashion-mnist", "cifar10", "imagefolder") and arg:
        return [Path(arg).expanduser().resolve()]
    return []


def absolute_spec(spec: str, base: str | os.PathLike[str] | None = None) -> str:
    """`spec` with the file or directory it names made absolute (`x.npz` -> `/home/u/x.npz`,
    `cifar10:data` -> `cifar10:/home/u/data`); specs that name no path come back as they are.
    What `layerfast train` records in manifest.json, because `layerfast analyze` without
    `--data` evaluates on the manifest's spec, from whatever directory it is run in. A relative
    path is taken from `base` when given (a hand-written manifest's own directory), else from
    the current directory."""
    spec = spec.strip()

    def resolve(path: str) -> str:
        p = Path(path).expanduser()
        return str((Path(base) / p if base is not None else p).resolve())

    if spec.lower().endswith((".beton", ".npz")):
        return resolve(spec)
    name, _, arg = spec.partition(":")
    if name.lower() in ("mnist", "fashion-mnist", "cifar10", "imagefolder") and arg:
        return f"{name}:{resolve(arg)}"
    return spec


def spec_text(spec: object) -> str:
    """`spec` as text (a path-like is its path), or the LayerfastError for what cannot be one
    (a dict, an array, an empty string): `open_data`'s first check, which in-memory
    checkpoints run before writing their files."""
    if isinstance(spec, os.PathLike):  # Path("x.npz"): a PATH spec, as `--data x.npz`
        spec = os.fspath(spec)
    if not isinstance(spec, str):  # was "unknown data spec '5': empty", a wrong reason
        # its repr cut short and on one line: an array's or a dict of tensors' repr is dozens
        # of lines of numbers
        shape = getattr(spec, "shape", None)
        shown = (f"of shape {tuple(shape)}" if isinstance(shape, tuple)  # torch.Size too
                 else " ".join(reprlib.repr(spec).split()))
        raise LayerfastError(f"a data spec is a string such as 'digits' or 'PATH.npz' "
                             f"(analyze and list_units also take an in-memory pair (x, y)); "
                             f"got {type(spec).__name__} {shown}")
    if not spec.strip():
        raise _unknown(spec, "empty")
    return spec


def check_split(split: object) -> None:
    """The LayerfastError for a split other than 'test' or 'train' (`open_data`'s check, which
    in-memory inputs run before writing their files)."""
    if split not in SPLITS:
        raise LayerfastError(f"split must be 'test' or 'train', got {split!r}")


#: How a warning of `open_data` names its own `split` argument (a Python caller's; `analyze`
#: and `convert` pass their flag's name, "--split", as their messages name options).
SPLIT_ARGUMENT = "the split argument"


def open_data(spec: str, split: str = "test", max_samples: int | None = None, *,
              split_flag: str | bool | None = SPLIT_ARGUMENT) -> DataSource:
    """Open dataset `spec` (see VALID_SPECS and docs/data.md) for `split` ('test' or 'train'),
    keeping only the first `max_samples` samples when given. `split_flag`: how a warning names
    the argument that chose `split` (a .beton holding the other split says it cannot choose
    another): this function's own by default, `"--split"` for analyze and convert, None (or
    False) for a command without one (train, bench), True for "--split" as before. From Python
    the warning named a `--split` flag, which `open_data` does not have."""
    if isinstance(split_flag, bool):
        split_flag = "--split" if split_flag else None
    spec = spec_text(spec)
    check_split(split)
    check_max_samples(max_samples)
    spec = spec.strip()
    low = spec.lower()
    if low.endswith(".beton"):
        from layerfast.data.beton import open_beton

        return open_beton(Path(spec).expanduser(), split, max_samples, split_flag=split_flag)
    if low.endswith(".npz"):
        from layerfast.data.npz import open_npz

        return open_npz(Path(spec).expanduser(), split, max_samples)
    name, _, arg = spec.partition(":")
    name = name.lower()
    if name == "digits":
        if arg:
            raise _unknown(spec, "digits takes no argument")
        from layerfast.data.digits import open_digits

        return open_digits(split, max_samples)
    if name in ("mnist", "fashion-mnist"):
        from layerfast.data.idx import FASHION_MNIST_DIR, open_idx

        directory = FASHION_MNIST_DIR if name == "fashion-mnist" and not arg else None
        return open_idx(name, directory or _dir(name, arg, spec), split, max_samples)
    if name == "cifar10":
        from layerfast.data.cifar import open_cifar10

        return open_cifar10(_dir(name, arg, spec), split, max_samples)
    if name == "imagefolder":
        from layerfast.data.imagefolder import open_imagefolder

        return open_imagefolder(_dir(name, arg, spec), split, max_samples)
    if name == "synthetic":
        from layerfast.data.synthetic import open_synthetic

        return open_synthetic(arg, split, max_samples)
    if Path(spec).expanduser().is_dir():
        raise _unknown(
            spec, "a bare directory; did you mean imagefolder:DIR, mnist:DIR or cifar10:DIR?"
        )
    raise _unknown(spec, f"no dataset named {name!r}")


def _data_name(spec: str) -> str:
    """The name a data set goes by whatever folder holds it: a `.beton`'s recorded source is
    matched by it (`cifar10:DIR` -> `cifar10`, `x.npz` -> its file name, `digits` as it is)."""
    spec = spec.strip()
    name = spec.partition(":")[0].lower()
    if spec.lower().endswith(".npz"):
        return Path(spec).name.lower()
    return name if name in ("mnist", "fashion-mnist", "cifar10", "imagefolder") else _pathless(spec)


def _pathless(spec: str) -> str:
    """A spec that names no path, as one text per data set: lower-cased (as `open_data` reads
    the name), and `synthetic:KIND` with its sample count written out as `open_synthetic`
    reads it (`synthetic:cifar` is `synthetic:cifar:10000`, `:01000` is `:1000`), and a name
    with an empty argument (`digits:`) as the name: compared as typed, one data set spelled
    twice was warned about as two (convert, analyze)."""
    low = spec.strip().lower()
    name, _, arg = low.partition(":")
    if name == "synthetic":
        from layerfast.data.synthetic import DEFAULT_N

        kind, _, count = arg.partition(":")
        with contextlib.suppress(ValueError):  # not a count: open_data refuses it
            return f"synthetic:{kind}:{int(count) if count else DEFAULT_N}"
    return name if not arg else low  # `digits:` opens `digits`: one data set, one text


def _beton_source(spec: str) -> str | None:
    """The source spec the sidecar of the .beton `spec` records, else None."""
    from layerfast.data.beton import sidecar_path  # lazy, as open_spec imports it

    if spec.lower().endswith(".beton"):
        with contextlib.suppress(OSError, ValueError, RecursionError, AttributeError):
            source = json.loads(sidecar_path(Path(spec)).read_text()).get("source")
            if isinstance(source, str) and source.strip():
                return source.strip()
    return None


def data_key(spec: str, base: Path | None = None) -> tuple[str, ...]:
    """What `spec` reads, for telling two spellings of one data set from two data sets: the
    resolved file or directory (fashion-mnist's default one too; for `cifar10:DIR` the folder
    of batches it reads, DIR or DIR/cifar-10-batches-py), else the spec's name; a
    .beton `convert` wrote stands for the data set its sidecar names (by name: its path was
    the converting shell's)."""
    spec = absolute_spec(spec, base)
    source = _beton_source(spec)
    if source is not None:
        return (_data_name(source),)
    name, paths = spec.partition(":")[0].lower(), data_paths(spec)
    if name == "cifar10" and paths:  # DIR or the DIR/cifar-10-batches-py it reads: one folder
        from layerfast.data.cifar import batch_dir

        with contextlib.suppress(LayerfastError, OSError):
            paths = [batch_dir(paths[0]).resolve()]
    return (name, str(paths[0])) if paths else (_pathless(spec),)


def same_data(spec: str, other: str, base: Path | None = None) -> bool:
    """Whether `spec` and `other` (a relative path in it taken from `base`) read the same data
    (`data_key`). A converted .beton beside a spec is matched by the data set's name on both
    sides: the .beton's key holds no path, so `cifar10:DIR` (or `x.npz`) against the .beton
    converted from it read as other data and was warned about."""
    a, b = absolute_spec(spec), absolute_spec(other, base)
    sa, sb = _beton_source(a), _beton_source(b)
    if (sa is None) != (sb is None):
        return _data_name(sa or a) == _data_name(sb or b)
    return data_key(a) == data_key(b)

"""Whole-number options as the Python API receives them: plain ints, numpy integers (a
notebook's values often are `np.int64`), never a bool, a float or a string's characters.

`analyze`, `make_variants` and `train` share these so that the same value means the same thing
(and fails with the same message) whichever entry point it is given to.
"""

from __future__ import annotations

import numbers
import operator
import os
from collections.abc import Iterable

from layerfast.errors import LayerfastError


def is_int(v: object) -> bool:
    """A whole number: an int, a numpy integer, a 0-d integer array or tensor (what indexing
    a tensor of labels gives); never a bool, a float or an array of several."""
    if isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool"):
        return False
    if getattr(v, "ndim", 0) != 0:  # tensor([5]) is a list of one seed, not a count of 5
        return False
    if isinstance(v, numbers.Integral):
        return True
    try:
        operator.index(v)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def integers(values: object, what: str) -> list[int]:
    """`values` as a list of plain ints; a float among them (2.5 was read as 2), a string or
    anything not iterable is one clear error naming `what`."""
    try:
        if isinstance(values, str | bytes) or not isinstance(values, Iterable):
            raise TypeError(values)
        out = list(values)
    except TypeError:  # not iterable, or says it is and is not (a 0-d array or tensor)
        raise LayerfastError(f"{what} must be integers (a list, a range); got "
                             f"{type(values).__name__} {values!r}") from None
    bad = [v for v in out if not is_int(v)]
    if bad:
        raise LayerfastError(f"{what} must be integers; got {bad[0]!r} ({type(bad[0]).__name__})")
    return [int(v) for v in out]


def count(value: object, flag: str) -> int | None:
    """An optional positive count (`None` stays `None`) as a plain int."""
    if value is None:
        return None
    if not is_int(value) or int(value) < 1:
        raise LayerfastError(f"{flag} must be a positive integer; got {value!r}")
    return int(value)


def check_dir_path(value: object, name: str = "out") -> None:
    """An output directory given as a str or `os.PathLike` (`Path`). Anything else (`out=5`,
    `out=b"run"`) is refused up front: `Path()` raised a bare TypeError only once the model,
    checkpoints and data had been read. `None`, where a default applies, is the caller's."""
    if not isinstance(value, str | os.PathLike) or isinstance(os.fspath(value), bytes):
        raise LayerfastError(f"{name} must be a directory path (str or Path), got {value!r}")


def flag(value: object, name: str) -> bool:
    """A yes/no option as a plain bool: a bool, a numpy or 0-d tensor bool, or the integers 0
    and 1. A string is refused: `fresh="no"` is truthy in Python and would silently discard a
    resumable run (and `figures="false"` would draw them)."""
    if isinstance(value, bool):
        return value
    if str(getattr(value, "dtype", "")) in ("bool", "torch.bool") and getattr(value, "ndim", 1) == 0:
        return bool(value)
    if is_int(value) and int(value) in (0, 1):  # type: ignore[call-overload]
        return bool(int(value))  # type: ignore[call-overload]
    raise LayerfastError(f"{name} must be True or False; got {type(value).__name__} {value!r}")


#: More re-randomizations per unit than any study needs (each is a variant of every unit): the
#: bound keeps a typo such as `--seeds 10000000` a clear error instead of a variant list that
#: exhausts memory.
MAX_SEEDS = 1000


def int_list(text: str, what: str) -> list[int]:
    """`"0,1,10"`, a comma-separated list as `--checkpoints` takes it (the CLI and
    `train(checkpoints="0,1")` read it here). An empty text or item (`""`, `"1,,2"`: a typo)
    is refused rather than dropped: an empty list would save only 0 and the last epoch, the
    opposite of the default schedule."""
    parts = text.split(",")
    try:
        if not all(p.strip() for p in parts):
            raise ValueError(text)
        return [int(p) for p in parts]
    except ValueError:
        raise LayerfastError(f"{what}: expected integers like 0,1,10; got {text!r}") from None

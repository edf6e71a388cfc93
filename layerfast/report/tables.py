"""Reading and writing the run's CSV files, atomically (DESIGN.md §5).

A run can be killed at any moment and resumed, and `layerfast report OUT` may redraw while a
user has the CSV open, so a file in the out dir is either the old complete version or the new
complete version, never half of one: everything is written to a temporary file in the same
directory (same filesystem, so the rename is atomic) and moved over the target with os.replace.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from layerfast.checkpoints.discover import new_file_mode
from layerfast.errors import LayerfastError
from layerfast.metrics import COLUMNS

__all__ = [
    "DISTANCE_COLUMNS",
    "atomic_path",
    "read_distances",
    "read_results",
    "tau_of",
    "unit_order",
    "write_csv",
]

#: Columns of `distances.csv`, in order.
DISTANCE_COLUMNS: tuple[str, ...] = ("unit", "checkpoint", "l2", "l2_rel", "linf")

_FLOATS = ("error", "error_lo", "error_hi", "top5_error", "loss", "agreement", "delta_error")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it over `path`, else delete it.

    The temporary name keeps the target's suffix (`.heatmap.png.abc123.png`) because
    matplotlib picks the output format from it. OSError (unwritable dir, full disk) becomes a
    LayerfastError naming the file, since an unwritable out dir is bad input, not a bug.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix or ".tmp"
        )
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600; results are for sharing (umask)
        os.close(fd)
    except OSError as exc:
        raise LayerfastError(f"cannot write {target}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        raise LayerfastError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write `df` to `path` atomically: no index, empty cells for NaN/NA, round-trip floats.

    Floats are written by pandas' default repr-style formatting, the shortest string that
    reads back to the same double (0.15 stays "0.15", not "0.14999999999999999"), so a
    resumed or redrawn run sees exactly the numbers the first run computed.
    """
    target = Path(path)
    with atomic_path(target) as tmp:
        df.to_csv(tmp, index=False, na_rep="", lineterminator="\n")
    return target


def unit_order(units: Iterable[str]) -> list[str]:
    """Units in order of first appearance: the engine emits variants in model order."""
    return list(dict.fromkeys(u for u in units if u != "*"))


def tau_of(label: object) -> int | None:
    """τ of a distances.csv checkpoint cell; None for rerandom rows (`rerandom:<seed>`)."""
    if isinstance(label, str) and label.startswith("rerandom"):
        return None
    try:
        return int(label)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise LayerfastError(
            f"distances: checkpoint {label!r} is neither a τ label nor 'rerandom:<seed>'"
        ) from exc


def _read(path: Path, what: str, columns: tuple[str, ...], dtype: dict[str, type]) -> pd.DataFrame:
    if not path.is_file():
        raise LayerfastError(f"{path} not found: {what}")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dtype)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise LayerfastError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayerfastError(f"{path} is missing column(s) {', '.join(missing)}")
    return df


def read_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a `results.csv` back into the dtypes `metrics.results_table` produces.

    checkpoint/seed become nullable Int64 and an empty verdict becomes "" (not NaN), so a
    table read from disk compares equal to the one that was written.
    """
    p = Path(path)
    df = _read(p, "expected the results of a layerfast run (results.csv)", COLUMNS, {"unit": str})
    try:
        for col in ("checkpoint", "seed"):
            df[col] = pd.to_numeric(df[col]).astype("Int64")
        for col in _FLOATS:
            df[col] = pd.to_numeric(df[col]).astype(np.float64)
        df["n"] = pd.to_numeric(df["n"]).astype(np.int64)
    except (ValueError, TypeError) as exc:
        raise LayerfastError(f"{p} has a malformed numeric column: {exc}") from exc
    for col in ("unit", "kind", "verdict"):
        df[col] = df[col].fillna("").astype(str).astype(object)
    return df[list(COLUMNS)]


def read_distances(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a `distances.csv`; `checkpoint` stays text-or-int ("0", "rerandom:1" -> 0, "rerandom:1")."""
    p = Path(path)
    df = _read(
        p,
        "expected per-unit weight distances (distances.csv)",
        DISTANCE_COLUMNS,
        {"unit": str, "checkpoint": str},
    )
    df["checkpoint"] = [
        int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v for v in df["checkpoint"]
    ]
    for col in ("l2", "l2_rel", "linf"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(np.float64)
    df["unit"] = df["unit"].astype(str).astype(object)
    return df[list(DISTANCE_COLUMNS)]

"""Reading and writing the run's CSV files, atomically (DESIGN.md §5).

A run can be killed at any moment and resumed, and `layerfast report OUT` may redraw while a
user has the CSV open, so a file in the out dir is either the old complete version or the new
complete version, never half of one: everything is written to a temporary file in the same
directory (same filesystem, so the rename is atomic) and moved over the target with os.replace.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

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

#: Largest distance `read_distances` accepts: far from float64's end, which matplotlib cannot
#: draw (1e308 overflowed the axis limits; from ~1e297, beside ordinary distances, the log
#: colour bar's tick locator overflowed). No checkpoint gives one: the model's float32 weights
#: stay below ~3.4e38, so a larger value is a damaged or foreign distances.csv.
MAX_DISTANCE = 1e250

#: What `metrics.results_table` appends after DESIGN's columns when a run has interp rows.
INTERP_COLUMNS = ("alpha", "sigma")
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


def _temporary_pattern(target: Path) -> re.Pattern[str]:
    """The names `atomic_path` gives `target`'s temporaries: mkstemp's `.<name>.` prefix, its
    8 random characters (lowercase letters, digits, `_`) and the suffix."""
    suffix = target.suffix or ".tmp"
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")


def remove_temporaries(folder: Path, names: Iterable[str]) -> None:
    """Delete the temporaries `atomic_path` left for `folder/name` (each of `names`).

    `atomic_path` removes its temporary on any exception, but not on SIGKILL (the OOM killer,
    a scheduler's `kill -9`): a rerun would then finish beside a hidden `.distances.png.*.png`
    forever. Only call this while holding the folder's lock (the analysis's out dir lock), so
    no other run is writing them."""
    patterns = [_temporary_pattern(folder / name) for name in names]
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for p in entries:
        if any(pat.fullmatch(p.name) for pat in patterns) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.unlink()


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


#: Longest unit name shown in a figure's row labels or the terminal summary, in characters:
#: ~8 in at the figures' largest label font.
MAX_LABEL_CHARS = 90
# C0/C1 control characters and the Unicode line/paragraph separators
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(name: str) -> str:
    """`name` on one line: a control character or line break written as its escape (`\\n`,
    `\\t`, `\\x1b`). A module may be named `"a\\nb"` (a ModuleDict key); printed raw it broke
    the `--list-units` and summary columns over two lines (and a figure's label). For display
    only: results.csv, run.json and `--units` keep the name itself."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], name)


def fit_labels(rows: Sequence[str], ellipsis: str = "…") -> list[str]:
    """Unit names of at most `MAX_LABEL_CHARS` characters for display: a longer one (a long
    `--units` regex, a deeply nested module) is cut in the middle, keeping its start and its
    end (where module names differ), with `ellipsis` between. Otherwise a figure's label
    column was as wide as the name (1,500 characters: a 139 in figure, past `MAX_FIGURE_IN`)
    and so was every line of the terminal summary. results.csv keeps the full names. Where two
    cut labels would read the same, the kept parts grow until they differ (or the names are
    shown whole). Each is `printable` first."""
    rows = [printable(r) for r in rows]
    out = list(rows)
    if all(len(r) <= MAX_LABEL_CHARS for r in out):
        return out
    for budget in range(MAX_LABEL_CHARS, max(map(len, out)) + 1, 10):
        head = (budget - len(ellipsis)) // 2
        tail = budget - len(ellipsis) - head
        out = [r if len(r) <= budget else f"{r[:head]}{ellipsis}{r[len(r) - tail:]}"
               for r in rows]
        if len(set(out)) == len(set(rows)):
            break
    else:
        out = list(rows)
    return out


def unit_order(units: Iterable[str]) -> list[str]:
    """Units in order of first appearance: the engine emits variants in model order.

    Callers pass the unit column of reinit/rerandom (or distances) rows only. "*" is kept: it
    marks baseline and fullmodel rows, but `--units '*'` also names a real unit so.
    """
    return list(dict.fromkeys(units))


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


def _read(path: Path, what: str, columns: tuple[str, ...], text: tuple[str, ...],
          optional: tuple[str, ...] = ()) -> pd.DataFrame:
    """The CSV with every column as text ("" -> NaN): values are parsed and checked per column
    by the callers, so that a bad cell gives one message naming its column and row. The
    `optional` columns are kept when the file has all of them; any other column is dropped."""
    if not path.is_file():
        if path.exists():  # a directory or a FIFO named like it: "not found" sent users looking
            raise LayerfastError(f"{path} is not a regular file: {what}")
        raise LayerfastError(f"{path} not found: {what}")
    try:
        df = pd.read_csv(
            path, keep_default_na=False, na_values=[""],
            dtype={c: str for c in (*columns, *optional)},
        )
    except OSError as exc:  # strerror alone: str(exc) repeats the path
        raise LayerfastError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, pd.errors.ParserError) as exc:
        raise LayerfastError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayerfastError(f"{path} is missing column(s) {', '.join(missing)}")
    found = [c for c in optional if c in df.columns]
    if found and len(found) < len(optional):  # kept together or not at all
        missing = [c for c in optional if c not in df.columns]
        raise LayerfastError(f"{path} has column(s) {', '.join(found)} but not "
                             f"{', '.join(missing)}")
    if found:
        columns = (*columns, *optional)
    df = df[list(columns)].copy()
    for col in text:
        df[col] = pd.Series([str(v) if isinstance(v, str) else "" for v in df[col]],
                            index=df.index, dtype=object)
    return df


def _bad(path: Path, col: str, rows: Any, values: pd.Series, why: str) -> LayerfastError:
    i = int(np.flatnonzero(np.asarray(rows))[0])
    cell = values.iloc[i]
    shown = "empty" if not isinstance(cell, str) or cell == "" else repr(cell)
    return LayerfastError(f"{path}: column '{col}', row {i + 1}: {shown} is not {why}")


def _numbers(path: Path, df: pd.DataFrame, col: str) -> np.ndarray:
    """Column `col` as float64 (empty -> NaN); any cell that is not a number is an error."""
    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce").astype(np.float64).to_numpy()
    bad = np.isnan(values) & raw.notna().to_numpy() & (raw.astype(str).str.lower() != "nan")
    if bad.any():
        raise _bad(path, col, bad, raw, "a number")
    return values


def _ints(path: Path, df: pd.DataFrame, col: str) -> list[int | None]:
    """Column `col` as Python ints (empty -> None), parsed from the text itself: through a
    float64, a seed above 2**53 (seeds go up to 2**63) would come back as another seed."""
    raw = df[col]
    out: list[int | None] = []
    for i, cell in enumerate(raw):
        if not isinstance(cell, str):
            out.append(None)
            continue
        try:
            v = int(cell)
        except ValueError:
            try:
                f = float(cell)
            except ValueError:
                f = math.nan
            v = int(f) if math.isfinite(f) and f.is_integer() else None
        if v is None or not -(2**63) <= v < 2**63:
            rows = np.zeros(len(raw), dtype=bool)
            rows[i] = True
            raise _bad(path, col, rows, raw, "a whole number")
        out.append(v)
    return out


def _checked(
    path: Path, df: pd.DataFrame, col: str, values: np.ndarray, bad: np.ndarray, why: str
) -> np.ndarray:
    if bad.any():
        raise _bad(path, col, bad, df[col], why)
    return values


def read_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a `results.csv` back into the dtypes `metrics.results_table` produces.

    checkpoint/seed become nullable Int64 and an empty verdict becomes "" (not NaN), so a
    table read from disk compares equal to the one that was written. Since the file may come
    from elsewhere (`layerfast report OUT`), every cell is checked against what results_table
    can write, and the first bad one is a LayerfastError naming its column and row (counted
    from 1 below the header): unit and kind non-empty; n a whole number >= 0; checkpoint and
    seed whole numbers >= 0 or empty, present where that kind of row has one (checkpoint on
    reinit, fullmodel, joint and interp rows; seed on rerandom rows and interp rows with
    σ > 0) and empty where it has none (other kinds, which Python API users may add, are not
    checked); interp rows' `alpha` and `sigma` finite, which other rows leave empty; error,
    its interval, top5_error and agreement in [0, 1], delta_error in [-1, 1], and error,
    its interval, agreement and delta_error present wherever n > 0; loss >= 0, inf or empty (a
    re-randomized unit can overflow it to inf); at least one row; and no variant (unit, kind,
    checkpoint, seed, alpha, sigma) listed twice.
    """
    p = Path(path)
    df = _read(
        p,
        "expected the results of a layerfast run (results.csv)",
        COLUMNS,
        ("unit", "kind", "verdict"),
        INTERP_COLUMNS,
    )
    if df.empty:  # analyze always writes the baseline row; a header alone is a cut file
        raise LayerfastError(f"{p} has a header but no rows (expected the results of a "
                             "layerfast run, at least its baseline row)")
    for col in ("unit", "kind"):
        _checked(p, df, col, df[col], (df[col] == "").to_numpy(), "a name")
    n_list = _ints(p, df, "n")
    n = np.array([-1 if v is None else v for v in n_list], dtype=np.int64)
    _checked(p, df, "n", n, n < 0, "a whole number >= 0")
    samples = n > 0
    out: dict[str, Any] = {}
    for col in ("checkpoint", "seed"):
        ints = _ints(p, df, col)
        # τ labels and seeds are never negative (checkpoints are epoch_NNN.pt, seeds in [0, 2^63))
        _checked(p, df, col, None, np.array([v is not None and v < 0 for v in ints], dtype=bool),
                 "a whole number >= 0 or empty")
        out[col] = pd.array([pd.NA if v is None else v for v in ints], dtype="Int64")
    kind = df["kind"].to_numpy()
    has = {col: ~np.asarray(out[col].isna(), dtype=bool) for col in ("checkpoint", "seed")}
    for col, kinds, needed in (
        ("checkpoint", ("reinit", "fullmodel", "joint", "interp"), True),
        ("checkpoint", ("baseline", "rerandom"), False),
        ("seed", ("rerandom",), True),
        ("seed", ("baseline", "reinit", "fullmodel", "joint"), False),
    ):
        wrong = np.isin(kind, kinds) & (has[col] != needed)
        why = "a checkpoint τ" if col == "checkpoint" else "a seed"
        _checked(p, df, col, None, wrong,
                 f"{why} ({'/'.join(kinds)} rows need one)" if needed
                 else f"empty ({'/'.join(kinds)} rows have no {col})")
    ranges = {
        "error": (0.0, 1.0, True),
        "error_lo": (0.0, 1.0, True),
        "error_hi": (0.0, 1.0, True),
        "top5_error": (0.0, 1.0, False),
        "agreement": (0.0, 1.0, True),
        "delta_error": (-1.0, 1.0, True),
    }
    for col in _FLOATS:
        v = _numbers(p, df, col)
        if col in ranges:
            lo, hi, required = ranges[col]
            empty = np.isnan(v)
            wrong = ~empty & ~((v >= lo) & (v <= hi))
            if required:
                wrong |= empty & samples
            why = f"in [{lo:g}, {hi:g}]" + (" (required where n > 0)" if required else "")
            _checked(p, df, col, v, wrong, why)
        out[col] = v
    # a mean cross-entropy is >= 0 (inf or NaN when a variant's logits overflow)
    _checked(p, df, "loss", out["loss"], out["loss"] < 0, "a mean cross-entropy (>= 0)")
    out["n"] = n
    for col in ("unit", "kind", "verdict"):
        out[col] = df[col]
    interp = (df["kind"] == "interp").to_numpy()
    if interp.any() and INTERP_COLUMNS[0] not in df.columns:
        raise _bad(p, "kind", interp, df["kind"], "a kind without alpha and sigma columns")
    extra = _interp_columns(p, df, interp) if INTERP_COLUMNS[0] in df.columns else {}
    if extra:  # noise is drawn from a seed: an interp row has one exactly when σ > 0
        noisy = interp & (np.nan_to_num(extra["sigma"]) > 0)
        _checked(p, df, "seed", None, noisy & ~has["seed"], "a seed (interp rows with sigma > 0)")
        _checked(p, df, "seed", None, interp & ~noisy & has["seed"],
                 "empty (interp rows with sigma 0 draw no noise)")
    out.update(extra)
    cols = [*COLUMNS, *extra]
    table = pd.DataFrame({c: out[c] for c in cols}, index=df.index)[cols]
    # analyze writes each variant once (it merges `--checkpoints 0,0`, `--seeds 1,1`); a
    # variant listed twice (two runs' files concatenated) made a summary and heatmap of
    # nonsense ("critical at tau 0,0-1,1", a spread over one seed counted twice)
    key = ["unit", "kind", "checkpoint", "seed", *extra]
    twice = table.duplicated(subset=key).to_numpy()
    _checked(p, df, "unit", None, twice, "a new variant (this unit, kind, checkpoint and seed "
             "are listed twice)")
    return table


def _interp_columns(path: Path, df: pd.DataFrame, interp: np.ndarray) -> dict[str, np.ndarray]:
    """`alpha` and `sigma`, which results_table appends when a run has interp rows: kept, so
    `layerfast report` still tells those rows apart. On interp rows a finite number (σ >= 0),
    elsewhere empty."""
    out = {}
    for col in INTERP_COLUMNS:
        v = _numbers(path, df, col)
        empty = np.isnan(v)
        wrong = interp & (empty | ~np.isfinite(v) | ((v < 0) if col == "sigma" else False))
        _checked(path, df, col, v, wrong,
                 "a finite number" + (" >= 0" if col == "sigma" else "") + " (an interp row)")
        out[col] = _checked(path, df, col, v, ~interp & ~empty, "empty (not an interp row)")
    return out


def read_distances(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a `distances.csv`; `checkpoint` stays text-or-int ("0", "rerandom:1" -> 0, "rerandom:1").

    Like `read_results`, a bad cell is one LayerfastError naming its column and row: unit
    non-empty, checkpoint a τ (>= 0) or `rerandom:<seed>`, distances numbers in [0, `MAX_DISTANCE`] or empty
    (l2_rel is NaN for a zero-initialized unit, see layerfast.distances).
    """
    p = Path(path)
    df = _read(
        p,
        "expected per-unit weight distances (distances.csv)",
        DISTANCE_COLUMNS,
        ("unit", "checkpoint"),
    )
    _checked(p, df, "unit", None, (df["unit"] == "").to_numpy(), "a name")
    checkpoints: list[object] = []
    for v in df["checkpoint"]:
        # ASCII digits only: τ labels are never negative (read_results refuses "-3" too), and
        # "²" passed str.isdigit() but not int(), a ValueError traceback instead of this check
        if re.fullmatch(r"[0-9]+", v):
            checkpoints.append(int(v))
        else:
            checkpoints.append(v)
    taus_ok = np.array([isinstance(v, int) or re.fullmatch(r"rerandom:\d+", v) is not None
                        for v in checkpoints], dtype=bool)  # fmt: skip
    _checked(p, df, "checkpoint", None, ~taus_ok,
             "a τ label (a whole number >= 0) or 'rerandom:<seed>'")
    out: dict[str, object] = {"unit": df["unit"], "checkpoint": checkpoints}
    for col in ("l2", "l2_rel", "linf"):
        v = _numbers(p, df, col)
        out[col] = _checked(p, df, col, v, (v < 0) | np.isinf(v) | (v > MAX_DISTANCE),
                            f"a finite distance (>= 0, at most {MAX_DISTANCE:g})")
    return pd.DataFrame(out, index=df.index)[list(DISTANCE_COLUMNS)]

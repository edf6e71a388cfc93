"""analyze's options that need no file, device or data, parsed and checked (`parse_flags`)
before anything is read or written: each bad value is one message naming its flag.
`layerfast analyze` and its dry run `--list-units` share them, as does the Python API.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from layerfast.errors import LayerfastError, warn
from layerfast.options import MAX_SEEDS, count, int_list, integers, is_int

RESETS = ("reinit", "rerandom", "fullmodel")
#: Every kind `--reset` accepts: the default three, and `interp` (it needs `--alphas`).
KINDS = (*RESETS, "interp")
#: Default seconds between progress saves (see `_checkpoint_every`).
CHECKPOINT_EVERY = 5.0


def _parse_checkpoints(checkpoints: str | Iterable[int]) -> str | list[int]:
    """'all', or the labels sorted without repeats: `0,0,4` and `4,0` ask for what `0,4` asks
    for, so run.json, the resume fingerprint and the rows (ordered by τ, as with 'all') must not
    tell them apart. An empty item (`1,,2`, `0,`: a typo) is refused, as `train --checkpoints`
    refuses it (`options.int_list`): it was dropped without a word."""
    if isinstance(checkpoints, str):
        if checkpoints.strip() == "all":
            return "all"
        try:
            labels = int_list(checkpoints, "--checkpoints")
        except LayerfastError:
            raise LayerfastError(f"--checkpoints takes 'all' or labels like 0,1,10; "
                                 f"got {checkpoints!r}") from None
        return sorted(set(labels))
    if is_int(checkpoints):  # one label
        return [int(checkpoints)]
    return sorted(set(integers(checkpoints, "checkpoints")))


def _parse_list(value: str | Sequence[str] | None, flag: str = "the option") -> list[str]:
    """A comma-separated option (`--reset`, `--units`) as a list without repeats, in order:
    repeats change nothing evaluated, so they must not change run.json or the resume
    fingerprint either. Commas inside brackets stay (`re:x{1,2}`, `[a,b]*`: see
    `units.split_patterns`). Neither a string nor an iterable (`units=5`) is refused naming
    `flag`: it was a bare "TypeError: 'int' object is not iterable"."""
    from layerfast.units import split_patterns

    if value is None:
        return []
    if isinstance(value, bytes) or not isinstance(value, str | Iterable):
        raise LayerfastError(f"{flag} takes a comma-separated string or a list of strings; "
                             f"got {type(value).__name__} {value!r}")
    items = split_patterns(value) if isinstance(value, str) else [str(v).strip() for v in value]
    return list(dict.fromkeys(v for v in items if v))


def _parse_units(units: str | Sequence[str] | None) -> list[str] | None:
    """`--units` as a pattern list, None when not given (the granularity decides).

    Given but naming no pattern (`--units ''`, `','`: a shell variable that expanded to
    nothing) is refused, as `--reset ''` is: read as "not given", it silently analysed every
    layer of the granularity instead of the custom units asked for."""
    if units is None:
        return None
    patterns = _parse_list(units, "--units")
    if not patterns:
        raise LayerfastError(
            f"--units names no pattern (got {units!r}): give globs or re:regexes, "
            "comma-separated, or leave --units out for the granularity's units"
        )
    return patterns


def parse_seeds(text: str) -> int | list[int]:
    """`--seeds` as written: "3" is a count (seeds 1..3), "1,7,9" names seeds (a trailing comma
    names one). The CLI and `analyze(seeds="...")` both read it here."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return int(text)
    except ValueError:
        raise LayerfastError(
            f"--seeds takes a count like 3 or seeds like 1,7,9; got {text!r}"
        ) from None


def _seed_list(seeds: int | str | Iterable[int]) -> list[int]:
    """`seeds=n` means seeds 1..n (the CLI's `--seeds 3`); an iterable names them, sorted
    and repeats dropped (seed 1 twice is one draw, evaluated once; `3,1` is the run `1,3`). A string reads as the CLI reads it:
    "3" is a count, "1,7,9" names seeds (a str must not be iterated character by character)."""
    if isinstance(seeds, bool) or isinstance(seeds, numbers.Real) and not is_int(seeds):
        raise LayerfastError(f"--seeds takes a count n >= 1 or a list of seeds; got {seeds!r}")
    if isinstance(seeds, str):
        seeds = parse_seeds(seeds)
    if is_int(seeds):
        seeds = int(seeds)
        if seeds < 1:
            raise LayerfastError(f"--seeds takes a count n >= 1 (seeds 1..n) or a list of "
                                 f"seeds like 1,7,9; got {seeds}")
        out = range(1, min(seeds, MAX_SEEDS + 1) + 1)
    else:
        out = sorted(set(integers(seeds, "seeds")))  # a repeated seed: the same draw
    if not out:
        raise LayerfastError("--seeds needs at least one seed; got none")
    if len(out) > MAX_SEEDS:  # checked before a list of millions of variants is built
        raise LayerfastError(f"--seeds asks for more than {MAX_SEEDS} re-randomizations per unit; "
                             "each one is a variant of every unit: ask for fewer")
    bad = [s for s in out if not 0 <= s < 2**63]
    if bad:
        raise LayerfastError(f"seeds must lie in [0, 2^63); got {bad[0]}")
    return list(out)


def _check_threshold(threshold: object) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise LayerfastError(f"--threshold must be a number in [0, 1]; got {threshold!r} "
                             f"({type(threshold).__name__})")
    if not 0 <= threshold <= 1:  # NaN fails too
        raise LayerfastError(f"--threshold must lie in [0, 1]; got {threshold}")


@dataclass(frozen=True)
class Flags:
    """analyze's options that need no file, device or data, parsed: `parse_flags`."""

    resets: list[str]
    interp: tuple[list[float], list[float]] | None  # (alphas, sigmas) with --reset interp
    seed_list: list[int]
    seeded: bool  # rerandom, or interp's noise, draws seeds
    threshold: float
    final: int | None
    batch_size: int | None
    max_samples: int | None
    checkpoints: str | list[int]
    patterns: list[str] | None


def parse_flags(reset: str | Sequence[str] | None = RESETS, alphas: Any = None, sigma: Any = 0.0,
                seeds: Any = 1, threshold: float = 0.05, batch_size: int | None = None,
                max_samples: int | None = None, final: int | None = None,
                checkpoints: Any = "all", units: str | Sequence[str] | None = None) -> Flags:
    """Reject bad options before anything is loaded or written, each with its flag's name (the
    engine would otherwise fail deep inside, or for batch size 0 silently pick a default).
    `analyze` and `--list-units` share it: a dry run that accepts `--seeds 0` or
    `--threshold 2` would pass a command that then fails."""
    from layerfast.interp import check_grid, interp_options

    resets = list(RESETS) if reset is None else _parse_list(reset, "--reset")
    resets = sorted(resets, key=lambda r: KINDS.index(r) if r in KINDS else len(KINDS))
    if not resets:  # `--reset ''` must not mean "every kind"
        raise LayerfastError(f"--reset names no kind: choose from {', '.join(KINDS)}")
    bad = [r for r in resets if r not in KINDS]
    if bad:
        raise LayerfastError(f"unknown --reset {bad[0]!r}: choose from {', '.join(KINDS)}")
    interp = interp_options(resets, alphas, sigma)
    seed_list = _seed_list(seeds)
    if interp is not None:
        check_grid(*interp, seed_list)
    seeded = "rerandom" in resets or (interp is not None and any(interp[1]))
    _check_threshold(threshold)
    if final is not None:
        if not is_int(final):
            raise LayerfastError(f"--final takes a checkpoint label (an integer); got {final!r}")
        final = int(final)
    return Flags(resets, interp, seed_list, seeded,
                 threshold=float(threshold) + 0.0,  # np.float32 too: run.json is JSON; -0 is 0
                 final=final, batch_size=count(batch_size, "--batch-size"),
                 max_samples=count(max_samples, "--max-samples"),
                 checkpoints=_parse_checkpoints(checkpoints), patterns=_parse_units(units))


def _checkpoint_every(value: float | None) -> float:
    """Seconds between progress saves: the argument, else $LAYERFAST_CHECKPOINT_EVERY, else 5.
    A save costs one small SQLite transaction, so 0 (every batch) is affordable for tests.

    An infinite interval (`inf`, `1e400`) saves only when the pass ends, so a run killed
    before then starts over. From the environment variable (set once in a profile, then
    forgotten) that was silent: it is said now (`warn`, kept in run.json when called inside
    analyze's `collect_warnings`); given as the argument, it is taken as meant."""
    source = "checkpoint_every"
    if value is None:
        source = "LAYERFAST_CHECKPOINT_EVERY"
        text = os.environ.get(source, "").strip()
        if not text:
            return CHECKPOINT_EVERY
        try:
            value = float(text)
        except ValueError:
            value = text  # type: ignore[assignment]  # said as given, below
    if isinstance(value, bool | str) or not isinstance(value, numbers.Real) \
            or not value >= 0:  # also rejects NaN
        raise LayerfastError(f"checkpoint interval ({source}) must be a number of seconds >= 0; "
                             f"got {value!r}")
    if math.isinf(value) and source != "checkpoint_every":
        warn(f"LAYERFAST_CHECKPOINT_EVERY={text}: progress is saved only when the pass ends, so "
             "a run killed before then starts over; set it to a number of seconds (default 5) "
             "to keep the run resumable")
    return float(value)

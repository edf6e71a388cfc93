"""Counts -> the results table: errors, Wilson intervals, loss, agreement, verdicts (DESIGN.md §5).

The engine accumulates, per variant, four numbers on the device (correct@1, correct@5, summed
cross-entropy, agreement with the baseline's prediction) and hands them over as a float64
[V, 4] array. Everything a user reads in `results.csv` is derived here, in one place, so that
the CSV, the figures and the terminal table can never disagree about what "error" or "robust"
means.

Two choices worth knowing:
- Errors and deltas are computed in count space, `(n - correct) / n` and
  `(correct_base - correct) / n`, not as `1 - correct / n` minus another such float. A variant
  exactly `threshold` worse than the baseline (e.g. 50 more mistakes out of 1000 at 0.05) then
  lands exactly on the threshold and is called robust, as "delta_error <= threshold" promises,
  instead of being pushed over it by rounding.
- The interval is Wilson's score interval (not the normal approximation), because errors near
  0 (a robust layer on MNIST) and near 1 (chance on ImageNet) are where the normal interval
  breaks: it leaves [0, 1] and has zero width at k = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from layerfast.errors import LayerfastError

__all__ = ["COLUMNS", "VERDICT_KINDS", "results_table", "wilson"]

#: Columns of `results.csv`, in order (DESIGN.md §5). Other modules import this, never retype it.
COLUMNS: tuple[str, ...] = (
    "unit",
    "kind",
    "checkpoint",
    "seed",
    "error",
    "error_lo",
    "error_hi",
    "top5_error",
    "loss",
    "agreement",
    "n",
    "delta_error",
    "verdict",
)

#: Kinds that get a robust/critical verdict; the others (baseline, fullmodel, joint, interp)
#: are references or research variants whose verdict would mean nothing per unit.
VERDICT_KINDS: frozenset[str] = frozenset({"reinit", "rerandom"})

_Z95 = 1.959963984540054  # Φ⁻¹(0.975)


class VariantLike(Protocol):
    """What `results_table` reads from a variant (layerfast.variants.Variant has more)."""

    unit: str
    kind: str
    checkpoint: int | None
    seed: int | None


def wilson(k: Any, n: Any, z: float = _Z95) -> tuple[Any, Any]:
    """Wilson score interval for a binomial proportion k/n, vectorised over numpy arrays.

    Returns (lo, hi) with the broadcast shape of k and n (numpy scalars for scalar input);
    NaN where n == 0, since no samples carry no information. k = 0 gives exactly lo = 0 and
    k = n exactly hi = 1 (the formula gives those only up to rounding); always within [0, 1].
    """
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k_arr / n_arr
        z2n = z * z / n_arr
        denom = 1.0 + z2n
        center = (p + z2n / 2.0) / denom
        half = (z / denom) * np.sqrt(np.maximum(p * (1.0 - p) / n_arr + z2n / (4.0 * n_arr), 0.0))
        # Exact endpoints where the closed form is exact (rounding gives 0.9999999999999999).
        lo = np.where(k_arr <= 0, 0.0, np.clip(center - half, 0.0, 1.0))
        hi = np.where(k_arr >= n_arr, 1.0, np.clip(center + half, 0.0, 1.0))
    empty = n_arr == 0
    lo = np.where(empty, np.nan, lo)
    hi = np.where(empty, np.nan, hi)
    return lo[()], hi[()]


def _optional_int(value: Any) -> Any:
    return pd.NA if value is None else int(value)


def results_table(
    variants: Sequence[VariantLike],
    counts: Any,
    n: int,
    num_classes: int,
    threshold: float = 0.05,
) -> pd.DataFrame:
    """Build the results table (columns `COLUMNS`, one row per variant, in variant order).

    `counts` is float64 [V, 4]: correct@1, correct@5, summed cross-entropy, agreement count,
    over `n` samples. The row with kind "baseline" (exactly one is required: every delta is
    relative to it) defines `delta_error`; reinit and rerandom rows get `verdict` "robust"
    when delta_error <= threshold, else "critical"; other rows get "". top5_error is NaN when
    `num_classes` < 5 (top-5 of fewer classes is trivially 0, and would look like a result).
    checkpoint and seed are nullable Int64 so that "not applicable" stays empty in the CSV.
    With interp variants, `alpha` and `sigma` follow (NaN on the other rows).
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 4 or c.shape[0] != len(variants):
        raise LayerfastError(
            f"counts must have shape [{len(variants)}, 4] (one row per variant: correct@1, "
            f"correct@5, summed cross-entropy, agreement), got {list(c.shape)}"
        )
    if int(n) < 0:
        raise LayerfastError(f"n (samples evaluated) must be >= 0, got {n}")
    kinds = [str(v.kind) for v in variants]
    base_rows = [i for i, kind in enumerate(kinds) if kind == "baseline"]
    if len(base_rows) != 1:
        raise LayerfastError(
            "results_table needs exactly one variant of kind 'baseline' (every delta_error is "
            f"relative to it), got {len(base_rows)}"
        )
    n_f = float(n)
    correct1, correct5, ce_sum, agree = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        wrong = n_f - correct1
        error = wrong / n_f
        top5 = (n_f - correct5) / n_f if num_classes >= 5 else np.full(len(c), np.nan)
        loss = ce_sum / n_f
        agreement = agree / n_f
        delta = (correct1[base_rows[0]] - correct1) / n_f
    lo, hi = wilson(wrong, np.full(len(c), n_f))

    # Slack far below one sample's worth of error (1/n), only to absorb float noise when the
    # threshold itself is not a multiple of 1/n.
    robust = delta <= threshold + 1e-12
    verdict = [
        ("robust" if r else "critical") if kind in VERDICT_KINDS and not np.isnan(d) else ""
        for kind, r, d in zip(kinds, robust, delta, strict=True)
    ]
    df = pd.DataFrame(
        {
            "unit": pd.Series([str(v.unit) for v in variants], dtype=object),
            "kind": pd.Series(kinds, dtype=object),
            "checkpoint": pd.array([_optional_int(v.checkpoint) for v in variants], dtype="Int64"),
            "seed": pd.array([_optional_int(v.seed) for v in variants], dtype="Int64"),
            "error": error,
            "error_lo": np.atleast_1d(lo),
            "error_hi": np.atleast_1d(hi),
            "top5_error": top5,
            "loss": loss,
            "agreement": agreement,
            "n": np.full(len(c), int(n), dtype=np.int64),
            "delta_error": delta,
            "verdict": pd.Series(verdict, dtype=object),
        },
        columns=list(COLUMNS),
    )
    if any(v.kind == "interp" for v in variants):
        # interp rows of one unit and τ differ only in α and σ: without them the rows cannot be
        # told apart. Appended after DESIGN §5's columns, and only then (a run without
        # `--reset interp` keeps exactly the contract's columns).
        for name in ("alpha", "sigma"):
            df[name] = [np.nan if getattr(v, name, None) is None else float(getattr(v, name))
                        for v in variants]
    return df

"""metrics: Wilson intervals and the results table (DESIGN.md §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from layerfast.errors import LayerfastError
from layerfast.metrics import COLUMNS, results_table, wilson

Z = 1.959963984540054


@dataclass
class FakeVariant:
    """Stand-in for layerfast.variants.Variant: only what results_table reads."""

    unit: str
    kind: str
    checkpoint: int | None = None
    seed: int | None = None
    alpha: float | None = None
    sigma: float | None = None


# ----------------------------------------------------------------------------- wilson


def test_wilson_zero_successes_matches_closed_form() -> None:
    # k = 0: lo = 0, hi = z^2 / (n + z^2).
    lo, hi = wilson(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(Z**2 / (10 + Z**2), abs=1e-12)
    assert hi == pytest.approx(0.2775327, abs=1e-6)


def test_wilson_half_is_symmetric_and_matches_hand_value() -> None:
    # k = 5, n = 10: centre 0.5, half-width z/(1+z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2)).
    lo, hi = wilson(5, 10)
    half = Z / (1 + Z**2 / 10) * math.sqrt(0.25 / 10 + Z**2 / 400)
    assert lo == pytest.approx(0.5 - half, abs=1e-12)
    assert hi == pytest.approx(0.5 + half, abs=1e-12)
    assert (lo, hi) == pytest.approx((0.2365931, 0.7634069), abs=1e-6)


def test_wilson_all_successes_matches_closed_form() -> None:
    # k = n: lo = n / (n + z^2), hi = 1.
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(10 / (10 + Z**2), abs=1e-12)
    assert hi == 1.0


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # Newcombe (1998), Stat. Med. 17:857-872, Table I, method 3 (score, no continuity corr.).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_1998(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=6e-5)
    assert got[1] == pytest.approx(hi, abs=6e-5)


def test_wilson_is_vectorised_and_nan_for_no_samples() -> None:
    k = np.array([0, 3, 7, 0])
    n = np.array([10, 10, 10, 0])
    lo, hi = wilson(k, n)
    assert lo.shape == hi.shape == (4,)
    for i in range(3):
        assert (lo[i], hi[i]) == wilson(int(k[i]), int(n[i]))
    assert np.isnan(lo[3]) and np.isnan(hi[3])
    # Broadcast a scalar n over an array k.
    lo2, _ = wilson(np.array([1, 2]), 10)
    assert lo2.shape == (2,)


def test_wilson_contains_the_estimate_and_stays_in_unit_interval() -> None:
    n = 37
    k = np.arange(n + 1)
    lo, hi = wilson(k, n)
    p = k / n
    assert np.all(lo <= p + 1e-15) and np.all(p <= hi + 1e-15)
    assert np.all(lo >= 0) and np.all(hi <= 1)
    assert np.all(np.diff(lo) > 0)  # monotone in k


def test_wilson_narrows_with_z() -> None:
    lo95, hi95 = wilson(30, 100)
    lo68, hi68 = wilson(30, 100, z=1.0)
    assert lo68 > lo95 and hi68 < hi95


# ----------------------------------------------------------------------------- results_table


def _counts(rows: list[tuple[float, float, float, float]]) -> np.ndarray:
    return np.array(rows, dtype=np.float64)


def _study(n: int = 1000) -> tuple[list[FakeVariant], np.ndarray]:
    variants = [
        FakeVariant("*", "baseline"),
        FakeVariant("fc1", "reinit", 0),
        FakeVariant("fc1", "reinit", 3),
        FakeVariant("fc1", "rerandom", None, 1),
        FakeVariant("*", "fullmodel", 0),
        FakeVariant("fc1+fc2", "joint", 0),
        FakeVariant("fc1", "interp", 0, alpha=0.25, sigma=0.0),
    ]
    counts = _counts(
        [
            (900, 990, 250.0, 1000),  # baseline: error 0.10
            (850, 950, 400.0, 900),  # exactly 0.05 worse -> robust
            (849, 950, 400.0, 899),  # 0.051 worse -> critical
            (100, 500, 2300.0, 120),  # chance -> critical
            (100, 500, 2300.0, 100),  # fullmodel: no verdict
            (500, 800, 900.0, 600),  # joint: no verdict
            (880, 980, 300.0, 950),  # interp: no verdict
        ]
    )
    return variants, counts


def test_results_table_has_exact_columns_in_order() -> None:
    variants, counts = _study()
    variants, counts = variants[:-1], counts[:-1]  # no interp row: DESIGN §5's columns exactly
    df = results_table(variants, counts, 1000, 10)
    assert list(df.columns) == [
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
    ]
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == len(variants)
    assert list(df["unit"]) == [v.unit for v in variants]
    assert list(df["kind"]) == [v.kind for v in variants]


def test_interp_rows_add_alpha_and_sigma_after_the_designs_columns() -> None:
    """Interp rows of one unit and τ differ only in α and σ; without them the rows could not be
    told apart (they all read `fc1, interp, 0`)."""
    variants, counts = _study()
    variants = [*variants, FakeVariant("fc1", "interp", 0, alpha=1.0, sigma=0.5)]
    counts = np.vstack([counts, counts[-1]])
    df = results_table(variants, counts, 1000, 10)
    assert list(df.columns) == [*COLUMNS, "alpha", "sigma"]
    assert df["alpha"].tolist()[-2:] == [0.25, 1.0] and df["sigma"].tolist()[-2:] == [0.0, 0.5]
    assert df["alpha"].iloc[:-2].isna().all() and df["sigma"].iloc[:-2].isna().all()


def test_results_table_values() -> None:
    variants, counts = _study()
    df = results_table(variants, counts, 1000, 10)
    base = df.iloc[0]
    assert base["error"] == pytest.approx(0.10)
    assert base["top5_error"] == pytest.approx(0.01)
    assert base["loss"] == pytest.approx(0.25)
    assert base["agreement"] == pytest.approx(1.0)
    assert base["n"] == 1000
    assert base["delta_error"] == 0.0
    rr = df.iloc[3]
    assert rr["error"] == pytest.approx(0.9)
    assert rr["delta_error"] == pytest.approx(0.8)
    assert rr["agreement"] == pytest.approx(0.12)
    assert rr["loss"] == pytest.approx(2.3)


def test_interval_is_wilson_of_the_error_not_the_accuracy() -> None:
    variants, counts = _study()
    df = results_table(variants, counts, 1000, 10)
    lo, hi = wilson(1000 - counts[:, 0], 1000)
    np.testing.assert_allclose(df["error_lo"], lo, rtol=0, atol=1e-15)
    np.testing.assert_allclose(df["error_hi"], hi, rtol=0, atol=1e-15)
    assert np.all(df["error_lo"] <= df["error"]) and np.all(df["error"] <= df["error_hi"])
    # Asymmetric near 0: a 10% error's interval is not centred on the accuracy's (90%).
    assert df["error_hi"].iloc[0] < 0.2


def test_verdict_at_threshold_boundary_is_robust_and_just_above_is_critical() -> None:
    variants, counts = _study()
    df = results_table(variants, counts, 1000, 10, threshold=0.05)
    # 850 vs 900 correct of 1000 is exactly 0.05: "robust <=> delta_error <= threshold".
    assert df.loc[1, "delta_error"] == 0.05
    assert df.loc[1, "verdict"] == "robust"
    assert df.loc[2, "delta_error"] == pytest.approx(0.051)
    assert df.loc[2, "verdict"] == "critical"
    assert df.loc[3, "verdict"] == "critical"


def test_verdict_uses_the_given_threshold() -> None:
    variants, counts = _study()
    df = results_table(variants, counts, 1000, 10, threshold=0.01)
    assert list(df.loc[1:3, "verdict"]) == ["critical", "critical", "critical"]
    df = results_table(variants, counts, 1000, 10, threshold=0.9)
    assert list(df.loc[1:3, "verdict"]) == ["robust", "robust", "robust"]


def test_verdict_only_for_reinit_and_rerandom() -> None:
    variants, counts = _study()
    df = results_table(variants, counts, 1000, 10)
    by_kind = dict(zip(df["kind"], df["verdict"], strict=False))
    for kind in ("baseline", "fullmodel", "joint", "interp"):
        assert by_kind[kind] == ""
    assert set(df.loc[df["kind"].isin(["reinit", "rerandom"]), "verdict"]) <= {
        "robust",
        "critical",
    }


def test_improvement_over_baseline_is_negative_delta_and_robust() -> None:
    variants = [FakeVariant("*", "baseline"), FakeVariant("a", "reinit", 5)]
    df = results_table(variants, _counts([(900, 990, 1, 1), (950, 990, 1, 1)]), 1000, 10)
    assert df.loc[1, "delta_error"] == pytest.approx(-0.05)
    assert df.loc[1, "verdict"] == "robust"


@pytest.mark.parametrize(("classes", "empty"), [(2, True), (4, True), (5, False), (1000, False)])
def test_top5_empty_below_five_classes(classes: int, empty: bool) -> None:
    variants, counts = _study()
    df = results_table(variants, counts, 1000, classes)
    assert df["top5_error"].isna().all() == empty
    assert df["top5_error"].notna().all() == (not empty)


def test_checkpoint_and_seed_are_nullable_ints() -> None:
    variants, counts = _study()
    df = results_table(variants, counts, 1000, 10)
    assert df["checkpoint"].dtype == "Int64" and df["seed"].dtype == "Int64"
    assert df["checkpoint"].isna().tolist() == [True, False, False, True, False, False, False]
    assert df["seed"].isna().tolist() == [True, True, True, False, True, True, True]
    assert df.loc[2, "checkpoint"] == 3 and df.loc[3, "seed"] == 1


def test_baseline_row_defines_delta_wherever_it_is() -> None:
    variants = [FakeVariant("a", "reinit", 0), FakeVariant("*", "baseline")]
    df = results_table(variants, _counts([(500, 600, 1, 1), (800, 900, 1, 1)]), 1000, 10)
    assert df["delta_error"].tolist() == pytest.approx([0.3, 0.0])
    assert df.loc[0, "verdict"] == "critical"


@pytest.mark.parametrize("kinds", [["reinit"], ["baseline", "baseline", "reinit"]])
def test_needs_exactly_one_baseline(kinds: list[str]) -> None:
    variants = [FakeVariant("*" if k == "baseline" else "a", k, 0) for k in kinds]
    with pytest.raises(LayerfastError, match="baseline"):
        results_table(variants, np.ones((len(kinds), 4)), 10, 10)


def test_counts_shape_is_checked() -> None:
    variants, counts = _study()
    with pytest.raises(LayerfastError, match=r"\[7, 4\]"):
        results_table(variants, counts[:, :3], 1000, 10)
    with pytest.raises(LayerfastError, match=r"\[7, 4\]"):
        results_table(variants, counts[:5], 1000, 10)


def test_zero_samples_gives_nan_not_an_exception() -> None:
    variants = [FakeVariant("*", "baseline"), FakeVariant("a", "reinit", 0)]
    df = results_table(variants, np.zeros((2, 4)), 0, 10)
    assert df[["error", "error_lo", "error_hi", "loss"]].isna().all().all()
    assert list(df["verdict"]) == ["", ""]


def test_returns_a_fresh_frame_with_default_index() -> None:
    variants, counts = _study()
    df = results_table(variants, counts, 1000, 10)
    assert isinstance(df, pd.DataFrame)
    assert list(df.index) == list(range(len(variants)))

"""The order options were typed in is not part of a run: `--checkpoints 2,0` and `0,2` (and
seeds `3,1` / `1,3`, resets `rerandom,reinit` / `reinit,rerandom`) ask the same question, so
they give the same rows in the same order, the same run.json, and one resumes the other."""

from __future__ import annotations

import pandas as pd
import pytest

import layerfast
from layerfast.flags import parse_flags


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Single-threaded (see conftest.one_thread)."""


def test_typed_order_is_canonical() -> None:
    a = parse_flags(reset="fullmodel,rerandom,reinit", seeds="3,1", checkpoints="8,0,3,0")
    assert a.resets == ["reinit", "rerandom", "fullmodel"]
    assert a.seed_list == [1, 3] and a.checkpoints == [0, 3, 8]
    assert parse_flags(reset="interp,reinit", alphas="0.5").resets == ["reinit", "interp"]
    assert parse_flags(seeds=[5, 2, 5]).seed_list == [2, 5]


def test_reordered_options_resume_the_same_run(ckpts, tmp_path) -> None:
    kw = dict(device="cpu", out=tmp_path, progress=False, max_samples=40, figures=False)
    first = layerfast.analyze("fcn3x256", ckpts, checkpoints="2,0", reset="rerandom,reinit",
                              seeds=[3, 1], **kw)
    again = layerfast.analyze("fcn3x256", ckpts, checkpoints="0,2", reset="reinit,rerandom",
                              seeds=[1, 3], **kw)
    assert again.run["engine"]["evaluated"] == 0  # resumed: the same question
    assert first.run["evaluated_checkpoints"] == [0, 2] and first.run["seeds"] == [1, 3]
    pd.testing.assert_frame_equal(first.table, again.table)
    reinit = first.table[first.table["kind"] == "reinit"]
    for unit, rows in reinit.groupby("unit", sort=False):
        assert list(rows["checkpoint"]) == [0, 2], unit
    rr = first.table[first.table["kind"] == "rerandom"]
    for unit, rows in rr.groupby("unit", sort=False):
        assert list(rows["seed"]) == [1, 3], unit


def test_interp_alphas_and_sigmas_are_sorted() -> None:
    """`--alphas 0.5,0.25` evaluates what `0.25,0.5` does; kept in typed order, the second was
    refused as a different run ("differs in: alphas") while --checkpoints/--seeds resumed."""
    f = parse_flags(reset="interp", alphas="0.5,0.25,0.5", sigma="0.1,0,0.1", checkpoints="0")
    assert f.interp == ([0.25, 0.5], [0.0, 0.1])

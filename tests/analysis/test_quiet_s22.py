"""Warnings can be silenced from Python without losing them (session 22).

`errors.warn` writes one `layerfast: warning:` line to stderr and keeps it for run.json; it
does not go through Python's `warnings` filters (docs/decisions.md), so a study running
hundreds of analyses in a loop could only silence the repeated lines by redirecting stderr.
`analyze(quiet=True)` and `errors.quiet_warnings()` now keep them off stderr; run.json still
holds every one. `progress=False` (the CLI's `--quiet`) still prints them, as the CLI does."""

from __future__ import annotations

import pytest

from layerfast.analysis import analyze
from layerfast.errors import LayerfastError, collect_warnings, quiet_warnings, warn

#: --seeds without a kind that draws: a warning every run gives
KW = dict(data="digits", reset="reinit", checkpoints=[0], seeds=[1, 2], max_samples=100,
          figures=False, device="cpu", progress=False)
SAID = "--seeds 1,2 has no effect"


def test_analyze_quiet_keeps_warnings_off_stderr_and_in_run_json(ckpts, tmp_path, capsys,
                                                                  one_thread) -> None:
    res = analyze("fcn3x256", ckpts, out=tmp_path / "q", quiet=True, **KW)
    assert "layerfast: warning:" not in capsys.readouterr().err
    assert any(SAID in w for w in res.run["warnings"])


def test_without_quiet_the_line_is_said(ckpts, tmp_path, capsys, one_thread) -> None:
    res = analyze("fcn3x256", ckpts, out=tmp_path / "loud", **KW)  # progress=False: --quiet
    err = capsys.readouterr().err
    assert f"layerfast: warning: {SAID}" in err
    assert any(SAID in w for w in res.run["warnings"])


def test_quiet_is_a_yes_or_no(ckpts, tmp_path) -> None:
    with pytest.raises(LayerfastError, match="quiet must be True or False"):
        analyze("fcn3x256", ckpts, out=tmp_path / "s", quiet="yes", **KW)


def test_quiet_warnings_block_keeps_what_it_hides(capsys) -> None:
    with collect_warnings() as kept:
        with quiet_warnings():
            warn("hidden")
            with quiet_warnings(False):  # an inner block cannot unsilence an outer one
                warn("still hidden")
        warn("said")
    assert kept == ["hidden", "still hidden", "said"]
    assert capsys.readouterr().err == "layerfast: warning: said\n"

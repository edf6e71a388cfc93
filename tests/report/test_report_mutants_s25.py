"""Mutation testing of session 25: the resume store (`layerfast/store.py`), the results
tables (`report/tables.py`, `metrics.py`), the terminal summary (`report/terminal.py`,
`report.summary`) and the distances (`distances.py`). Each test here fails with one small,
realistic change to the code it names (the mutant, said in its docstring) and passes on the
code as it is."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from layerfast.errors import LayerfastError
from layerfast.store import FILENAME, ResumeStore

FP = {"arch": "fcn3x256", "data": "digits"}


def _store(out: Path, **kw) -> ResumeStore:
    out.mkdir(exist_ok=True)
    return ResumeStore(out, FP, num_variants=3, **kw)


# ---- store.py ---------------------------------------------------------------------------------


def test_a_store_refused_at_open_releases_the_out_dirs_lock(tmp_path: Path) -> None:
    """Mutant: no `self._release()` in `ResumeStore.__init__`'s error path. A store `_open`
    refuses (a damaged file) raised before `close()` ran, so the lock stayed held for as long
    as the error lived (its traceback holds the half-made store): in a notebook, the retry with
    `fresh=True` the message suggests was refused as "another layerfast run"."""
    out = tmp_path / "out"
    _store(out).close()
    (out / FILENAME).write_bytes(b"not a database at all" * 100)
    with pytest.raises(LayerfastError, match="cannot use the resume store") as info:
        _store(out)
    assert info.value is not None  # the error, and its traceback, still alive here
    _store(out, fresh=True).close()


@pytest.mark.parametrize("schema", ["7", "5"])
def test_a_store_of_another_schema_is_refused_whichever_it_is(tmp_path: Path,
                                                              schema: str) -> None:
    """Mutant: `rows.get("schema") < SCHEMA` for `!= SCHEMA` (an "older versions only" slip):
    a store a newer layerfast wrote (another table layout, other numbers) was continued."""
    out = tmp_path / "out"
    _store(out).close()
    with sqlite3.connect(out / FILENAME) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (schema,))
    con.close()
    with pytest.raises(LayerfastError, match="another layerfast version"):
        _store(out)


def test_the_newest_unfinished_run_is_the_one_resumed(tmp_path: Path) -> None:
    """Mutant: `sorted(parent.glob(...))` without `reverse=True`: of two unfinished runs of
    the same command (default out dirs `<arch>-<time>`), the oldest was resumed, whose sums
    were the fewer, and the newer one was left behind."""
    from layerfast.store import find_unfinished

    for name in ("fcn3x256-20260101-000000", "fcn3x256-20260102-000000"):
        with _store(tmp_path / name) as store:
            store.save(torch.zeros(3, 4, dtype=torch.float64), 5)
    assert find_unfinished(tmp_path, "fcn3x256-", FP) == tmp_path / "fcn3x256-20260102-000000"


@pytest.mark.parametrize(("diff", "wrong"), [
    (["arch", "model"], "same arch"),  # another --arch is another argument, not a code change
    (["max_samples", "n"], "another number of samples"),  # said as --max-samples itself
])
def test_a_refusal_says_why_the_stored_run_differs_once(diff: list[str], wrong: str) -> None:
    """Mutants of `_what_differs`: each clause that keeps one difference from being said twice
    (or as something it is not) dropped, or the input keys counted as arguments."""
    from layerfast.store import _what_differs

    assert wrong not in _what_differs(diff)


def test_ctrl_c_while_the_store_is_set_up_keeps_the_out_dir_it_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: `if created:` without `isinstance(exc, LayerfastError)`: a Ctrl-C (or an
    internal error) while a new run's store was set up deleted its out dir, where bad input
    only should (Ctrl-C and internal errors keep the run's store: `analysis._removed_on_bad_input`).
    The lock is released either way."""
    def interrupted(self, out):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(ResumeStore, "_check_identity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _store(out, created=True)
    assert (out / FILENAME).is_file()
    monkeypatch.undo()
    _store(out).close()  # not locked, and resumable


# ---- report/tables.py: reading results.csv back -----------------------------------------------


def test_a_seed_of_2_to_the_63_is_not_a_seed(tmp_path: Path) -> None:
    """Mutant: `-(2**63) <= v <= 2**63` for `< 2**63` in `_ints`: seed 2**63, which no run
    can draw (seeds are int64), was read as one."""
    from layerfast.report import read_results
    from tests.report.test_report_audit import GOOD_BASE, write_rows

    row = f"fc1,rerandom,,{2**63},0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,critical"
    with pytest.raises(LayerfastError, match="column 'seed', row 2: .* is not a whole number"):
        read_results(write_rows(tmp_path / "results.csv", [GOOD_BASE, row]))


def test_a_loss_of_exactly_zero_is_read(tmp_path: Path) -> None:
    """Mutant: `out["loss"] <= 0` for `< 0`: a mean cross-entropy of exactly 0 (a baseline
    whose logits are so confident that float32's softmax rounds to 1 on every sample) is a
    result, and was refused as "not a mean cross-entropy (>= 0)"."""
    from layerfast.report import read_results
    from tests.report.test_report_audit import GOOD_REINIT, write_rows

    base = "*,baseline,,,0.05,0.02,0.11,0.01,0,1.0,100,0.0,"
    assert read_results(write_rows(tmp_path / "results.csv", [base, GOOD_REINIT]))["loss"][0] == 0


def test_an_interp_row_with_an_infinite_alpha_is_refused(tmp_path: Path) -> None:
    """Mutant: no `~np.isfinite(v)` in `_interp_columns`: an interp row at alpha = inf (no
    run writes one) was read, and the summary's grid had an `alpha=inf` column."""
    from layerfast.report import read_results
    from tests.report.test_report_audit import GOOD_BASE, HEADER, write_rows

    rows = [GOOD_BASE + ",,", "fc1,interp,0,,0.4,0.31,0.5,0.1,1.5,0.6,100,0.35,,inf,0"]
    with pytest.raises(LayerfastError, match="column 'alpha', row 2: 'inf' is not a finite"):
        read_results(write_rows(tmp_path / "results.csv", rows, HEADER + ",alpha,sigma"))


def test_an_atomically_written_file_gets_the_umasks_mode(tmp_path: Path) -> None:
    """Mutant: no `os.fchmod(fd, new_file_mode())` in `atomic_path`: mkstemp makes 0600
    files, so results.csv, run.json and the figures, moved into place, were readable by
    their owner only, where any file `open()` creates is shared as the umask says."""
    import os
    import stat

    import pandas as pd

    from layerfast.report import write_csv

    old = os.umask(0o022)
    try:
        path = write_csv(pd.DataFrame({"a": [1]}), tmp_path / "results.csv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_an_alpha_column_without_its_sigma_column_is_said_so(tmp_path: Path) -> None:
    """Mutant: no "kept together or not at all" check in `_read`: a results.csv with an
    `alpha` column but no `sigma` (a column cut away by hand) was a KeyError traceback."""
    from layerfast.report import read_results
    from tests.report.test_report_audit import GOOD_BASE, HEADER, write_rows

    path = write_rows(tmp_path / "results.csv", [GOOD_BASE + ","], HEADER + ",alpha")
    with pytest.raises(LayerfastError, match="has column[(]s[)] alpha but not sigma"):
        read_results(path)


# ---- report/terminal.py and report.summary: the terminal summary -------------------------------


def test_two_long_unit_names_never_share_a_label() -> None:
    """Mutant: `len(out) == len(rows)` for `len(set(out)) == len(set(rows))` in `fit_labels`:
    two long names that differ only in their middle were both cut to one label, so the
    summary and the heatmap showed two rows that read the same."""
    from layerfast.report.tables import fit_labels

    names = ["x" * 60 + "A" + "y" * 60, "x" * 60 + "B" + "y" * 60, "short"]
    assert len(set(fit_labels(names))) == 3


def test_a_max_l2_rel_of_exactly_1e_3_is_in_fixed_point() -> None:
    """Mutant: `1e-3 < rel` for `1e-3 <= rel`: the column's fixed-point range starts at
    1e-3 (`0.0010`), which came out as `1.00e-03` beside its neighbours' `0.0012`."""
    import pandas as pd

    from layerfast.report import summary_table
    from tests.report.test_report_audit import small_table

    dist = pd.DataFrame({"unit": ["fc1", "fc2"], "checkpoint": [1, 1], "l2": [0.1, 0.1],
                         "l2_rel": [1e-3, 1.2e-3], "linf": [0.01, 0.01]})
    rows = [r for r in summary_table(small_table(), dist).splitlines() if r.startswith("fc")]
    assert rows[0].endswith(" 0.0010") and rows[1].endswith(" 0.0012"), rows


def test_critical_at_tau_is_a_dash_where_nothing_was_judged() -> None:
    """Mutant: `judged = True` for "some reinit row has a delta_error": a run over 0 samples
    (every delta_error NaN, no verdict) said `none` under "critical at tau", which reads as
    "robust at every τ"."""
    from layerfast.report import summary_table
    from tests.report.test_report_audit import small_table

    rows = [r for r in summary_table(small_table(n=0)).splitlines() if r.startswith("fc")]
    assert len(rows) == 2 and all(r.endswith(" -") and "none" not in r for r in rows), rows


def _run_dir(tmp_path: Path, threshold: object) -> Path:
    from layerfast.report import write_csv
    from tests.report.test_report_audit import small_table

    write_csv(small_table(), tmp_path / "results.csv")
    (tmp_path / "run.json").write_text(json.dumps({"threshold": threshold}))
    return tmp_path


def test_the_runs_own_threshold_given_again_adds_no_note(tmp_path: Path) -> None:
    """Mutant: no `threshold != recorded` in `report.summary`: `layerfast report --threshold
    0.1` on a run judged at 0.1 said it was "judged here at --threshold 0.1; results.csv keeps
    the run's verdicts at 0.1", as if the two differed."""
    from layerfast.report import summary

    out = _run_dir(tmp_path, 0.1)
    assert "judged here" not in summary(out, threshold=0.1)
    assert "judged here at --threshold 0.2" in summary(out, threshold=0.2)


# ---- distances.py ------------------------------------------------------------------------------


def test_a_unit_holding_an_empty_parameter_is_measured(tmp_path: Path) -> None:
    """Mutant: `_float64` keeping empty tensors (no `if t.numel()`): a unit with a 0-element
    parameter (a Linear with no inputs, a pruned-away slot) made `max()` of an empty tensor
    raise a RuntimeError, instead of the row over the unit's other tensors."""
    from torch import nn

    from layerfast.checkpoints import CheckpointDir
    from layerfast.distances import distances
    from layerfast.units import Unit

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 1)
            self.empty = nn.Parameter(torch.zeros(0))

    def state(w: float) -> dict[str, torch.Tensor]:
        return {"fc.weight": torch.tensor([[w, 0.0]]), "fc.bias": torch.tensor([0.0]),
                "empty": torch.zeros(0)}

    torch.save(state(3.0), tmp_path / "e_0.pt")
    torch.save(state(4.0), tmp_path / "e_1.pt")
    model = Net()
    model.load_state_dict(state(4.0))
    unit = Unit("fc", ("fc",), ("fc.weight", "fc.bias", "empty"))
    df = distances(model, [unit], CheckpointDir(tmp_path))
    assert list(df["l2"]) == [0.0, 1.0] and list(df["linf"]) == [0.0, 1.0]


def test_tau0_is_checked_against_the_model_when_only_other_taus_are_asked(
        tmp_path: Path) -> None:
    """Mutant: `labels=sorted(taus)` for `sorted({0, *taus})` in `distances`' validation:
    with `checkpoints=[1]`, a θ^0 of another shape (a checkpoint of another model) was never
    checked, and every row is measured against it: a RuntimeError from the subtraction, or,
    where the shapes broadcast, distances of nothing."""
    from layerfast.checkpoints import CheckpointDir
    from layerfast.distances import distances
    from tests.report.test_distances import FC, Net, state

    wrong = state([1.0, 2.0], 2.0)
    wrong["fc.weight"] = torch.zeros(1, 3)
    torch.save(wrong, tmp_path / "e_0.pt")
    torch.save(state([1.0, 4.0], -1.0), tmp_path / "e_1.pt")
    model = Net()
    model.load_state_dict(state([1.0, 4.0], -1.0))
    with pytest.raises(LayerfastError, match="fc.weight"):
        distances(model, [FC], CheckpointDir(tmp_path), checkpoints=[1])

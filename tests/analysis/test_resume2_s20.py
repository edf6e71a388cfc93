"""Resume under changed conditions, and what a resumed run's run.json remembers (session 20).

DESIGN §5: a run killed at any moment and started again with the same arguments ends with the
same results as an uninterrupted run. These tests stop a run in-process right after its k-th
progress save (the store then holds exactly what a kill at that point leaves) and compare the
rerun with an uninterrupted one: results.csv, and run.json's engine plan and warnings, which
must not forget what happened before the interrupt (an out-of-memory back-off, the earlier
passes' groups), nor differ because the rerun landed on a machine with other memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import layerfast
from tests.analysis.test_resume import _Crash, crash_after  # noqa: F401  (used here and re-exported)

ARGS = {"data": "digits", "seeds": 1, "device": "cpu", "batch_size": 32, "progress": False,
        "figures": False, "checkpoint_every": 0, "max_samples": 256}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def same_record(a: Path, b: Path) -> None:
    """results.csv byte for byte, and run.json's plan and warnings as an uninterrupted run's."""
    assert (a / "results.csv").read_bytes() == (b / "results.csv").read_bytes()
    ra, rb = run_json(a), run_json(b)
    assert ra["engine"]["plan"] == rb["engine"]["plan"]
    assert ra["warnings"] == rb["warnings"]


def _oom_once(monkeypatch: pytest.MonkeyPatch, rows: int) -> list[int]:
    """The first baseline forward of `rows` samples runs out of memory (simulated)."""
    from layerfast.engine.graph import Program

    real, failed = Program.run, []

    def run(self, x, start=0, *a, **k):
        if "keep" in k and x.shape[0] == rows and not failed:
            failed.append(x.shape[0])
            raise torch.OutOfMemoryError("simulated")
        return real(self, x, start, *a, **k)

    monkeypatch.setattr(Program, "run", run)
    return failed


def test_a_back_off_before_the_interrupt_is_in_the_resumed_run_json(ckpts, tmp_path,
                                                                    monkeypatch):
    """The back-off of the interrupted segment was saved nowhere but the final store: the
    resumed run.json said rows_after_oom null and had no out-of-memory warning, while its
    first segment had run in halves."""
    kw = {**ARGS, "reset": "reinit"}
    with monkeypatch.context() as m:
        failed = _oom_once(m, 32)
        layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "whole", **kw)
        assert failed == [32]
    assert run_json(tmp_path / "whole")["engine"]["plan"]["rows_after_oom"] == 16
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _oom_once(m, 32)
        crash_after(m, 3)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    assert res.run["engine"]["resumed_from"] == 96
    same_record(out, tmp_path / "whole")


def test_a_run_of_several_passes_resumed_in_a_later_pass_records_every_pass(ckpts, tmp_path,
                                                                          monkeypatch):
    """run.json's engine.plan merged only the passes the rerun ran: resumed in the second of
    several passes, its groups, fanned/swapped counts and kmax left out the first pass's."""
    import layerfast.engine.evaluator as evm

    monkeypatch.setattr(evm, "stage_limit", lambda model_bytes: model_bytes // 3)
    kw = {**ARGS, "reset": "reinit,rerandom"}
    layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "whole", **kw)
    passes = run_json(tmp_path / "whole")["engine"]["plan"]["passes"]
    assert passes > 1
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after(m, 11)  # 8 batches of 32 per pass, and its end: into the second
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    res = layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    assert res.run["engine"]["resumed_from"] == 256 + 64
    same_record(out, tmp_path / "whole")


def _budget(monkeypatch: pytest.MonkeyPatch, nbytes: int | None) -> None:
    """The device's memory budget as another machine would have it (None: this machine's)."""
    import layerfast.engine.evaluator as evm
    from layerfast.engine.plan import memory_budget

    monkeypatch.setattr(evm, "memory_budget",
                        memory_budget if nbytes is None else (lambda device, fraction: nbytes))


def _chunk_widths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """K of every fanned chunk the pass runs, in order."""
    import layerfast.engine.evaluator as evm

    real, seen = evm.run_fanned, []

    def spy(prog, fan, x, stacks, K, *a, **k):
        seen.append(K)
        return real(prog, fan, x, stacks, K, *a, **k)

    monkeypatch.setattr(evm, "run_fanned", spy)
    return seen


@pytest.mark.parametrize("passes", [1, 3])
@pytest.mark.parametrize("first, second", [(None, 1 << 18), (1 << 18, None)])
def test_a_run_resumed_with_other_memory_keeps_its_fanned_chunk_width(ckpts, tmp_path,
                                                                      monkeypatch, first,
                                                                      second, passes):
    """K (variants per fanned chunk) comes from the device's total memory and was in no saved
    segment: a run requeued onto a machine with other memory, same --batch-size, went on in
    chunks of another width, so one result mixed two K (the last bits of fanned logits, and in
    bf16 more, depend on K) and run.json gave the rerun's K for the whole run. The rerun now
    keeps the K the run started with, in the resumed pass and in the passes after it."""
    import layerfast.engine.evaluator as evm

    if passes > 1:
        monkeypatch.setattr(evm, "stage_limit", lambda model_bytes: model_bytes // passes)
    kw = {**ARGS, "reset": "reinit", "fanout": True}
    with monkeypatch.context() as m:
        _budget(m, first)
        whole = _chunk_widths(m)
        layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "whole", **kw)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _budget(m, first)
        before = _chunk_widths(m)
        crash_after(m, 3)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    with monkeypatch.context() as m:
        _budget(m, second)  # requeued onto a machine with other memory
        after = _chunk_widths(m)
        layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    assert len(set(whole)) == 1 or first is not None
    assert before + after == whole
    same_record(out, tmp_path / "whole")


def test_a_run_resumed_at_a_batch_of_one_sample_decides_its_first_batch_checks_as_before(
        ckpts, tmp_path, monkeypatch):
    """The first-batch checks ran on the first batch the RESUMED run saw: resumed at a last
    batch of one sample (257 samples in batches of 32), whether the model mixes samples was
    "unknown", so a later pass that ran out of memory ended with an error instead of the
    back-off the uninterrupted run took. They now look at the data's first batch, as the
    uninterrupted run did."""
    import layerfast.engine.evaluator as evm

    monkeypatch.setattr(evm, "stage_limit", lambda model_bytes: model_bytes // 3)
    kw = {**ARGS, "reset": "reinit,rerandom", "max_samples": 257}
    with monkeypatch.context() as m:
        _oom_once(m, 32)  # the first baseline forward of the run
        layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "whole", **kw)
    assert run_json(tmp_path / "whole")["engine"]["plan"]["rows_after_oom"] == 16
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after(m, 8)  # 256 of the first pass's 257 samples
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    with monkeypatch.context() as m:
        failed = _oom_once(m, 32)  # the rerun's first forward of 32: in the second pass
        res = layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    assert failed == [32] and res.run["engine"]["resumed_from"] == 256
    assert res.run["engine"]["plan"]["rows_after_oom"] == 16
    exact = ["unit", "kind", "checkpoint", "error", "top5_error", "agreement", "n", "verdict"]
    whole = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "whole", **kw).table
    assert res.table[exact].equals(whole[exact])

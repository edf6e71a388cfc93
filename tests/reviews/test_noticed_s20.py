"""Small defects from the 'noticed' list, fixed in session 20."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import layerfast
from layerfast.data import open_data


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def test_default_out_dir_of_a_lambda_arch_is_a_portable_name(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A callable arch is named `module:<lambda>`: `<` and `>` (and `:`) cannot be in a Windows
    file name, so the default `layerfast-out/<arch>-<time>` uses only portable characters."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    def mk() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    lam = lambda: mk()  # noqa: E731  (the point: a lambda's __qualname__ is '<lambda>')
    torch.manual_seed(0)
    sds = {0: mk().state_dict(), 1: mk().state_dict()}
    src = open_data("digits")
    res = layerfast.analyze(lam, sds, data=(src.reader.x.float() / 16, src.reader.y),
                            device="cpu", progress=False, figures=False, max_samples=64)
    assert res.run["arch"].endswith("<lambda>"), res.run["arch"]
    (made,) = (tmp_path / "layerfast-out").iterdir()
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", made.name), made.name


def test_widest_dtype() -> None:
    from layerfast.engine.precision import widest_dtype

    assert widest_dtype(nn.Linear(2, 2)) == torch.float32
    assert widest_dtype(nn.Linear(2, 2).half()) == torch.float16
    mixed = nn.Sequential(nn.Linear(2, 2).bfloat16(), nn.Linear(2, 2).double())
    assert widest_dtype(mixed) == torch.float64
    assert widest_dtype(nn.ReLU()) == torch.float32


@pytest.mark.parametrize("argv", [["--fanout", "on", "--no-fanout"],
                                  ["--no-fanout", "--fanout", "on"]])
def test_conflicting_fanout_flags_are_refused(argv: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`--fanout on --no-fanout` ran with fan-out off and the other order on: the last flag
    won, silently. One of the two is a mistake; which one only the user knows."""
    from layerfast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--arch", "fcn3x256", "--ckpts", str(tmp_path), "--out",
              str(tmp_path / "o"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


class _ReflectAfter(nn.Module):
    """A conv unit, then a shared conv that pads by reflection (or another mode)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.unit = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pad = nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode)
        self.fc = nn.Linear(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.unit(x)))
        return self.fc(torch.relu(self.pad(h)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_a_shared_conv_downstream_with_another_padding_mode_fans(mode: str) -> None:
    """Only the unit's own conv must pad with zeros (its K stacked weights run as one
    zero-padded conv); a shared conv after it runs as itself on the K·B batch, where every
    padding mode pads each sample on its own. It refused the whole group (the swap path: a
    speed cost on the GPU); a unit conv that pads another way is still refused."""
    from layerfast.engine.fanrun import GLUE_MODES
    from tests.fanout.test_fanunit_s20 import _data, _same_as_naive, _variants

    torch.manual_seed(0)
    m = _ReflectAfter(mode)
    for glue in GLUE_MODES:
        plan = _same_as_naive(m, _variants(m, "unit,bn"), _data(6, (3, 8, 8)), glue=glue)
        assert plan["fanned_variants"] == 3, plan
    plan = _same_as_naive(m, _variants(m, "pad"), _data(6, (3, 8, 8)))
    assert plan["fanned_variants"] == 0, plan
    assert f"padding_mode {mode!r}" in " ".join(plan["fanout_refused"].values()), plan


def test_analyze_finds_a_weight_derived_cache_and_says_what_its_rows_mean(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """analyze's own probe of the logits' width (`_num_outputs`) called the model first and
    filled its cache, so the engine's first-batch check never saw the first fill: the model
    stayed traced and nothing said that resets of `a` never reached the forward. The warning
    now also says what such rows measure."""
    import json

    from tests.effects.test_effects2_s20 import _Cached

    class Flat(_Cached):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.flatten(1))

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    torch.manual_seed(0)
    sds = {t: {k: v.clone() for k, v in Flat().state_dict().items()} for t in (0, 1)}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)
    layerfast.analyze(Flat, sds, data=(x, y), device="cpu", precision="fp32", reset="reinit",
                      out=tmp_path / "o", progress=False, figures=False)
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert "caches tensors on its modules on its first call (wc)" in (
        run["engine"]["plan"]["untraced"] or ""), run["engine"]["plan"]
    assert "do not measure their resets" in capsys.readouterr().err


def test_an_out_of_memory_in_the_cache_check_backs_off_and_still_finds_the_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The weight-derived cache check's own calls swallowed an out-of-memory error (the model
    stayed traced, its counts differed from the naive loop), and a retry on fewer samples saw
    the cache the failed try had filled. It now backs off with the trace check and each try
    starts from the model's own attributes."""
    import contextlib

    from layerfast.engine import Evaluator, verify
    from layerfast.engine.naive import naive_evaluate
    from tests.effects.test_effects2_s20 import _Cached

    real, calls = verify.eager_inplace, []

    @contextlib.contextmanager
    def tight(model: nn.Module):
        calls.append(1)
        if len(calls) == 2:  # the cache check's second call of the forward (the first try)
            raise torch.OutOfMemoryError("simulated")
        with real(model):
            yield

    monkeypatch.setattr(verify, "eager_inplace", tight)
    torch.manual_seed(0)
    m = _Cached().eval()
    g = torch.Generator().manual_seed(1)
    variants = [{"a.weight": torch.randn(64, 64, generator=g) * 0.2} for _ in range(3)]
    batches = [(torch.randn(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g))]
    res = Evaluator(m, variants, device="cpu", precision="fp32").run(batches)
    assert len(calls) > 2  # the simulated out-of-memory happened, and the check went on
    assert "(wc)" in (res.plan.get("untraced") or ""), res.plan
    monkeypatch.setattr(verify, "eager_inplace", real)
    want = naive_evaluate(m, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


def test_a_damaged_engine_state_names_its_store(ckpts: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved engine state that does not describe the run was refused in one line that did
    not say where it came from, unlike the store's other damage ("<path> is damaged: ...")."""
    import json
    import sqlite3

    from layerfast.errors import LayerfastError
    from tests.analysis.test_resume2_s20 import ARGS, _Crash, crash_after

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after(m, 3)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, reset="reinit", **ARGS)
    (db,) = out.rglob("progress.sqlite")
    with sqlite3.connect(db) as con:
        (info,) = con.execute("SELECT info FROM state WHERE id = 0").fetchone()
        info = json.loads(info)
        info["resume"]["k"] = "a"
        con.execute("UPDATE state SET info = ? WHERE id = 0", (json.dumps(info),))
    with pytest.raises(LayerfastError, match=r"progress\.sqlite: the saved engine state does "
                       r"not describe this run") as exc:
        layerfast.analyze("fcn3x256", ckpts, out=out, reset="reinit", **ARGS)
    assert str(db.parent) in str(exc.value) and "\n" not in str(exc.value)

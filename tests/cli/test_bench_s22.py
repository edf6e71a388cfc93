"""Session 22's review of `layerfast bench` (layerfast/bench.py): every approach timed warm, the
warnings counted as stderr shows them, the batch size the pass ran. No test depends on how long
anything took: the method is checked with counting stubs."""

from __future__ import annotations

import pytest

import layerfast.bench as bench
import layerfast.engine as engine
from tests.cli import test_bench_audit as _audit

# the audit's helpers: its argument parser and its `quick` fixture (no half-second GEMM)
_args, quick = _audit._args, _audit.quick


def test_every_approach_warms_up_untimed_before_any_is_timed(monkeypatch, quick) -> None:
    """The first timed mode ran cold: a pass leaves the process changed for later ones
    (kernels chosen per shape; glibc malloc's thresholds, which only rise), so ResNet-20 block
    on 64 images took 3.7-4.6 s for prefix sharing timed first and 2.7-3.3 s after fan-out,
    and the CPU's "fanout vs layerfast" leaned toward the mode timed second. Each layerfast
    mode now runs once over the first batch (its planned B, every variant) in an Evaluator of
    its own, and the naive loop one batch, before ANY approach is timed (a mode's own warm-up
    just before its timed pass left the order's effect in place); each timed pass is a fresh
    Evaluator, and the naive warm-up is outside the naive figure, scaled or not."""
    events: list[tuple] = []  # in order: ("ev", evaluator, fan-out, samples) or ("naive", ...)
    real_run = engine.Evaluator.run

    def counting_run(self, data, *a, **k):
        events.append(("ev", self, bool(self.fanout), data.n))
        return real_run(self, data, *a, **k)

    real_naive = bench.naive_pass

    def counting_naive(model, variants, *a, warmup=False, **k):
        events.append(("naive", None, warmup, len(variants)))
        warm, loop, counts = real_naive(model, variants, *a, warmup=warmup, **k)
        return (5.0 if warmup else 0.0), loop, counts  # a slow warm-up would show if counted

    monkeypatch.setattr(engine.Evaluator, "run", counting_run)
    monkeypatch.setattr(bench, "naive_pass", counting_naive)
    out = bench.run(_args("--arch", "fcn2x16", "--batch-size", "8"))  # 32 samples: 4 batches
    assert [e[0::2] + e[3:] for e in events] == [
        ("ev", False, 8), ("ev", True, 8), ("naive", True, 0),  # warm-ups: one batch each
        ("ev", False, 32), ("ev", True, 32), ("naive", False, 22),  # then the timed passes
    ]
    evs = [e[1] for e in events if e[0] == "ev"]
    assert len({id(e) for e in evs}) == 4  # a fresh Evaluator each: the timed ones plan anew
    assert out["naive_warmup_s"] == 5.0 and out["seconds"]["naive"] < 5.0
    assert out["layerfast_plan"]["batch_size"] == out["fanout_plan"]["batch_size"] == 8


def test_the_help_says_how_bench_times(capsys) -> None:
    """How the approaches are timed was in no help text: `bench --help` says it now."""
    import layerfast.cli as cli

    with pytest.raises(SystemExit):
        cli.parser().parse_args(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Every approach is timed warm" in text and "untimed" in text


def test_the_warning_count_is_what_stderr_shows(monkeypatch, quick, capsys) -> None:
    """Every warm-up and timed mode builds its own Evaluator, and one that warns on
    construction (`--precision tf32` on the CPU) printed its line on stderr once for each,
    while the JSON kept one and the text's last line said "1 warning (stderr, above ...)".
    Each warning is now said once per run, on stderr as in the JSON."""
    assert bench.main(_args("--arch", "fcn2x16", "--naive-variants", "2", "--precision",
                            "tf32")) == 0
    captured = capsys.readouterr()
    said = [ln for ln in captured.err.splitlines() if ln.startswith("layerfast: warning: ")]
    assert len(said) == 1 and said[0].startswith("layerfast: warning: precision tf32"), said
    assert captured.out.rstrip().splitlines()[-1] == \
        "1 warning (stderr, above; also in --json's warnings)"


def test_warnings_once_says_each_message_once_inside_the_block(capsys) -> None:
    from layerfast.errors import collect_warnings, warn, warnings_once

    with collect_warnings() as outer:
        with warnings_once(), collect_warnings() as inner:
            warn("a")
            warn("b")
            warn("a")
        warn("a")  # outside the block: said again
    assert inner == ["a", "b"] and outer == ["a", "b", "a"]
    assert capsys.readouterr().err.count("layerfast: warning: a\n") == 2


def test_the_text_shows_the_batch_the_pass_ran(monkeypatch, quick, capsys) -> None:
    """`B=` printed the planned batch size even above n: a pass over 32 samples said B=1000
    (the CPU's plan for fcn2x16) and the naive loop B=256, while every batch held 32. The text
    and the GPU session's table show the batch used; the JSON keeps the planned one beside it."""
    run = bench.run
    out = run(_args("--arch", "fcn2x16", "--naive-variants", "2"))
    for mode in ("layerfast", "fanout"):
        plan = out[f"{mode}_plan"]
        assert plan["batch_size"] > 32 and plan["batch_size_used"] == 32
    assert out["naive_batch_size"] == 256 and out["naive_batch_size_used"] == 32
    monkeypatch.setattr(bench, "run", lambda args: out)
    bench.main(_args())
    text = capsys.readouterr().out
    planned = out["layerfast_plan"]["batch_size"]
    row = next(ln for ln in text.splitlines() if ln.startswith("layerfast "))
    assert row.endswith(f"(fan-out off, B=32, all the samples ({planned} planned))"), row
    assert f"B={planned}" not in text and "B=256" not in text
    assert "DataLoader pass at B=32, all the samples (256 asked)" in text
    assert _audit._table_rows()(out, "fcn")[0].split()[-1] == "32"
    out = run(_args("--arch", "fcn2x16", "--naive-variants", "2", "--batch-size", "8"))
    monkeypatch.setattr(bench, "run", lambda args: out)
    bench.main(_args())
    text = capsys.readouterr().out
    assert "fan-out off, B=8)" in text and "DataLoader pass at B=8," in text

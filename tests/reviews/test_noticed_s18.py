"""Session 18: items from the "noticed and left alone" list that are now fixed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerfast.cli import main
from layerfast.errors import LayerfastError
from layerfast.options import flag


@pytest.mark.parametrize("value", ["no", "false", "", None, 2, 0.0, [True]])
def test_yes_no_options_refuse_what_is_not_a_bool(value) -> None:
    """`analyze(fresh="no")` was truthy: it discarded a resumable run's progress, and
    `figures="false"` drew the figures."""
    with pytest.raises(LayerfastError, match="must be True or False"):
        flag(value, "fresh")


@pytest.mark.parametrize("value,want", [(True, True), (False, False), (1, True), (0, False),
                                        (np.bool_(True), True), (torch.tensor(False), False)])
def test_yes_no_options_take_bools_and_0_1(value, want) -> None:
    got = flag(value, "fresh")
    assert got is want


@pytest.mark.parametrize("kw", [{"fresh": "no"}, {"progress": "off"}, {"figures": "false"}])
def test_analyze_refuses_a_string_for_a_yes_no_option_before_writing(kw, tmp_path) -> None:
    from layerfast.analysis import analyze

    with pytest.raises(LayerfastError, match="must be True or False"):
        analyze("fcn3x256", tmp_path / "nothing", data="digits", out=tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kw", [{"overwrite": "yes"}, {"progress": "no"}])
def test_train_refuses_a_string_for_a_yes_no_option_before_writing(kw, tmp_path) -> None:
    from layerfast.train import train

    with pytest.raises(LayerfastError, match="must be True or False"):
        train("fcn3x256", "digits", 1, tmp_path / "ck", **kw)
    assert not (tmp_path / "ck").exists()


def test_demo_refuses_a_string_for_progress(tmp_path) -> None:
    from layerfast.demo import demo

    with pytest.raises(LayerfastError, match="must be True or False"):
        demo(tmp_path / "d", progress="no")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("lr", [0, 0.0, "0"])
def test_train_refuses_a_zero_learning_rate(lr, tmp_path, capsys) -> None:
    """`--lr 0` trained nothing: every checkpoint equalled θ⁰ and analyze measured a model at
    chance, with only a warning about the baseline."""
    from layerfast.train import train

    if isinstance(lr, str):
        rc = main(["train", "--arch", "fcn3x256", "--data", "digits", "--epochs", "1",
                   "--lr", lr, "--out", str(tmp_path / "ck")])
        assert rc == 2
        assert "lr must be above 0" in capsys.readouterr().err
    else:
        with pytest.raises(LayerfastError, match="lr must be above 0"):
            train("fcn3x256", "digits", 1, tmp_path / "ck", lr=lr)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("flags,message", [
    (["--seeds", "0"], "--seeds takes a count"),
    (["--threshold", "2"], "--threshold must lie in"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--max-samples", "0"], "--max-samples must be a positive integer"),
    (["--alphas", "0.5"], "--alphas is for interpolation"),
    (["--reset", "interp", "--alphas", "2"], "--alphas must lie in"),
    (["--reset", "bogus"], "unknown --reset"),
    (["--checkpoints", "x"], "--checkpoints takes"),
])
def test_list_units_refuses_the_flags_analyze_refuses(flags, message, capsys) -> None:
    """`--list-units` is the dry run of a command: it listed the units (exit 0) for flags the
    real run then refused."""
    rc = main(["analyze", "--arch", "fcn3x256", "--list-units", *flags])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_list_units_still_lists_with_good_flags(capsys) -> None:
    rc = main(["analyze", "--arch", "fcn3x256", "--list-units", "--seeds", "3",
               "--reset", "reinit,interp", "--alphas", "0.5", "--threshold", "0.1"])
    assert rc == 0
    assert "4 units" in capsys.readouterr().out


def test_batch_size_one_trains_on_every_sample() -> None:
    """With `--batch-size 1` the last sample of each epoch was dropped as a "lone trailing
    sample" (a rule for BatchNorm, which cannot train on batches of one anyway)."""
    from layerfast.train import _batch_sizes

    assert _batch_sizes(5, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert _batch_sizes(5, 2) == [(0, 2), (2, 4)]  # BatchNorm's rule stays for larger batches
    assert _batch_sizes(1, 1) == [(0, 1)]


def _finished_run(tmp_path):
    """A finished run's directory: results.csv written by hand (read_results checks it)."""
    from layerfast.report.tables import COLUMNS

    out = tmp_path / "run"
    out.mkdir()
    head = ",".join(COLUMNS)
    base = "*,baseline,,,0.1,0.05,0.2,,0.3,1,10,0,"
    row = "fc1,reinit,0,,0.5,0.3,0.7,,0.9,0.4,10,0.4,critical"
    (out / "results.csv").write_text(f"{head}\n{base}\n{row}\n")
    return out


def test_report_refuses_while_a_run_writes_into_the_dir(tmp_path, capsys) -> None:
    """`layerfast report` took no lock: beside an analyze rerun into the same directory it
    replaced the new figures with ones drawn from the old CSV files."""
    from layerfast.store import _acquire_lock

    out = _finished_run(tmp_path)
    held = _acquire_lock(out)  # what a running analyze holds (a second open file: flock conflicts)
    try:
        rc = main(["report", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and "another layerfast run" in err and "Traceback" not in err
        assert "choose another" not in err  # report has no --out to choose
        assert not (out / "heatmap.png").exists()
    finally:
        held.close()
    assert main(["report", str(out)]) == 0
    assert (out / "heatmap.png").is_file()
    # a lock file the redraw created is removed; analyze's own (already there) is kept
    assert sorted(p.name for p in out.iterdir()) == [".layerfast.lock", "heatmap.png",
                                                     "results.csv"]
    (out / ".layerfast.lock").unlink()
    assert main(["report", str(out)]) == 0
    assert not (out / ".layerfast.lock").exists()


def test_report_names_a_results_csv_that_is_a_directory(tmp_path, capsys) -> None:
    """A directory named results.csv was reported as "not found"."""
    (tmp_path / "results.csv").mkdir()
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a regular file" in capsys.readouterr().err


def test_unreadable_results_csv_names_its_path_once(tmp_path, monkeypatch) -> None:
    """`cannot read P: [Errno 13] Permission denied: 'P'` said the path twice."""
    import pandas as pd

    from layerfast.report.tables import read_results

    out = _finished_run(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(out / "results.csv"))

    monkeypatch.setattr(pd, "read_csv", refuse)
    with pytest.raises(LayerfastError) as info:
        read_results(out / "results.csv")
    assert str(info.value).count("results.csv") == 1
    assert str(info.value).endswith("Permission denied")


def test_progress_bar_keeps_tqdms_refresh_on_a_terminal_and_in_a_notebook(monkeypatch) -> None:
    """Only a bar written into a file or a log is slowed (errors.progress_bar): a notebook's
    widget (tqdm.auto in Jupyter, whose stderr is no terminal either) redraws in place, and
    slowing it would leave it still for 30 s."""
    import inspect
    import sys

    import tqdm.auto
    import tqdm.std

    from layerfast import errors

    class Stderr:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def write(self, s: str) -> int:
            return len(s)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return self.tty

    class Widget(tqdm.std.tqdm):  # stands in for tqdm.notebook's class (needs ipywidgets)
        pass

    Widget.__module__ = "tqdm.notebook"
    default = inspect.signature(tqdm.std.tqdm.__init__).parameters["mininterval"].default
    monkeypatch.setattr(sys, "stderr", Stderr(tty=True))
    assert errors.progress_bar(total=10).mininterval == default
    monkeypatch.setattr(sys, "stderr", Stderr(tty=False))
    assert errors.progress_bar(total=10).mininterval == errors.LOG_PROGRESS_INTERVAL
    monkeypatch.setattr(tqdm.auto, "tqdm", Widget)
    bar = errors.progress_bar(auto=True, total=10)
    assert isinstance(bar, Widget) and bar.mininterval == default


class _Tied(torch.nn.Module):
    """A head tied to a hidden layer (`out.weight = mid.weight`), as tied embeddings are."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(64, 10)
        self.mid = torch.nn.Linear(10, 10)
        self.out = torch.nn.Linear(10, 10)
        self.out.weight = self.mid.weight

    def forward(self, x):
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x.flatten(1))))))


def test_units_that_share_a_tied_tensor_are_named() -> None:
    """Resetting `mid` also reset `out`'s (tied) weight, and nothing said so: both rows read
    as one unit's effect."""
    from layerfast.units import make_units, tied_across_units

    model = _Tied()
    units = make_units(model)
    assert [u.name for u in units] == ["inp", "mid", "out"]
    lines = tied_across_units(model, units)
    assert len(lines) == 1 and "units mid and out share one tensor" in lines[0]
    assert "mid.weight is out.weight" in lines[0]
    untied = _Tied()
    untied.out.weight = torch.nn.Parameter(untied.mid.weight.detach().clone())
    assert tied_across_units(untied, make_units(untied)) == []
    # a norm layer fed by two units shares its keys under one name: documented, not listed
    assert tied_across_units(model, make_units(model, patterns=["mid", "m*"])) == []


def _train_fcn(tmp_path, epochs: int = 3):
    from layerfast.train import train

    ck = tmp_path / "ck"
    train("fcn3x256", "digits", epochs, ck, max_samples=64, progress=False)
    return ck


def test_checkpoints_after_the_final_model_are_said(tmp_path) -> None:
    """`--final 1` with checkpoints 0..3 reset units to weights trained past the final model
    without a word (the paper resets to earlier ones)."""
    from layerfast.analysis import analyze

    ck = _train_fcn(tmp_path)
    res = analyze("fcn3x256", ck, data="digits", final=1, reset="reinit", max_samples=32,
                  out=tmp_path / "o", progress=False, figures=False)
    said = [w for w in res.run["warnings"] if "after the final model" in w]
    assert said == ["checkpoints 2, 3 come after the final model (1): their rows reset units "
                    "to weights trained past it (--checkpoints up to 1 keeps to earlier ones)"]
    res = analyze("fcn3x256", ck, data="digits", final=1, checkpoints="0,1", reset="reinit",
                  max_samples=32, out=tmp_path / "o2", progress=False, figures=False)
    assert not [w for w in res.run["warnings"] if "after the final model" in w]


def test_train_says_when_the_model_did_not_learn(tmp_path) -> None:
    """A run that ends at chance (lr too high for the arch, or as here too low) said nothing:
    only analyze's chance note, later, showed it. The manifest keeps the warning."""
    import json

    from layerfast.train import train

    train("fcn3x256", "digits", 1, tmp_path / "slow", lr=1e-7, max_samples=64, progress=False)
    said = json.loads((tmp_path / "slow" / "manifest.json").read_text())["warnings"]
    assert len(said) == 1 and "within 5 points of chance (90.00% for 10 classes)" in said[0]
    assert "it did not learn; another --lr (this run's: 1e-07" in said[0]
    train("fcn3x256", "digits", 2, tmp_path / "ok", progress=False)  # learns: 3% error
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["warnings"] == []


@pytest.mark.parametrize("out,said", [
    ((torch.zeros(2, 3), torch.zeros(2)), "a tuple of 2; wrap the model in a module whose "
     "forward returns the class scores alone (e.g. `return self.net(x)[0]`, the scores' index)"),
    ({"logits": torch.zeros(2, 3), "aux": 1}, "a dict with keys 'logits', 'aux'; wrap the model "
     "in a module whose forward returns the class scores alone (e.g. `return "
     "self.net(x)['logits']`)"),
    (torch.zeros(2, 1, 3), "a tensor shaped [2, 1, 3]; wrap the model in a module whose forward "
     "returns the class scores alone (e.g. `return self.net(x).squeeze(1)`)"),
    (torch.zeros(2, 3, 4), "a tensor shaped [2, 3, 4]"),
    ({}, "an empty dict"),
    ((), "an empty tuple"),
    ({"aux": 1, "scores": torch.zeros(2, 3)}, "a dict with keys 'aux', 'scores'; wrap the model "
     "in a module whose forward returns the class scores alone (e.g. `return "
     "self.net(x)['scores']`)"),
    ({"aux": 1}, "a dict with keys 'aux'"),
])
def test_a_model_output_that_is_not_logits_is_described_with_the_way_out(out, said) -> None:
    """A tuple, dict or Hugging Face-style output was refused as "it returned a Out", with no
    word on what to return instead."""
    from layerfast.engine.batches import check_logits

    with pytest.raises(LayerfastError) as info:
        check_logits(out, 2)
    assert str(info.value) == f"the model must return logits shaped [batch, classes]; it returned {said}"


def test_an_output_object_with_logits_is_pointed_at_them() -> None:
    from dataclasses import dataclass

    from layerfast.engine.batches import check_logits

    @dataclass
    class ModelOutput:
        logits: torch.Tensor

    with pytest.raises(LayerfastError, match=r"an object of type ModelOutput; .*\.logits`\)$"):
        check_logits(ModelOutput(torch.zeros(2, 3)), 2)
    with pytest.raises(LayerfastError, match=r"it returned an object of type int$"):
        check_logits(3, 2)


class _UntraceableDropout(torch.nn.Module):
    """A random forward (dropout kept on) that fx cannot trace (a branch on a value)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(12, 16), torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.sum() > -1:  # a value decides: fx cannot trace it
            h = torch.nn.functional.dropout(h, 0.5, training=True)
        return self.b(h)


def test_an_untraceable_random_forward_is_not_called_exact(capsys) -> None:
    """The determinism check ran only for a traced model whose program differed: a model fx
    cannot trace was called exact however random its forward."""
    from layerfast.engine import Evaluator
    from layerfast.engine.plan import warn_plan

    torch.manual_seed(0)
    m = _UntraceableDropout()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(20, 12, generator=g), torch.randint(0, 5, (20,), generator=g))
               for _ in range(2)]
    variants = [{"b.weight": torch.zeros_like(m.b.weight)}]
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout="off").run(batches)
    untraced = res.plan["untraced"]
    assert untraced.startswith("the model's forward is not deterministic in eval mode")
    assert "fx could not trace it either" in untraced
    warn_plan(res.plan)
    err = capsys.readouterr().err
    assert "change from run to run" in err and "exact" not in err
    m.eval()
    m.forward = lambda x: m.b(torch.relu(m.a(x)))  # the same net, deterministic: exact
    res = Evaluator(m, variants, device="cpu", precision="fp32", fanout="off").run(batches)
    assert "not deterministic" not in (res.plan["untraced"] or "")


def test_summary_cuts_long_unit_names_as_the_figures_do() -> None:
    """A 1,500-character unit name (a long `--units` regex) made every line of the terminal
    summary, the rule lines included, that wide. Cut in the middle with an ASCII "..." (the
    summary is ASCII apart from the names themselves); results.csv keeps the names whole."""
    import pandas as pd

    from layerfast.report.tables import COLUMNS, MAX_LABEL_CHARS
    from layerfast.report.terminal import summary_table

    long = "re:" + "encoder.layers.[0-9]+.attention." * 50
    rows = [dict.fromkeys(COLUMNS) | {"unit": "*", "kind": "baseline", "error": 0.1,
                                      "error_lo": 0.05, "error_hi": 0.2, "n": 10,
                                      "delta_error": 0.0}]
    for u in (long, long + "x", "fc"):
        rows.append(dict.fromkeys(COLUMNS) | {"unit": u, "kind": "reinit", "checkpoint": 0,
                                              "error": 0.5, "n": 10, "delta_error": 0.4})
    text = summary_table(pd.DataFrame(rows))
    width = max(map(len, text.splitlines()))
    assert width < MAX_LABEL_CHARS + 80, width
    names = [ln.split("  ")[0] for ln in text.splitlines() if ln.startswith("re:")]
    assert len(names) == 2 and len(set(names)) == 2  # still told apart
    assert all("..." in n and n.isascii() and len(n) <= MAX_LABEL_CHARS for n in names)
    assert names[0].startswith("re:encoder.layers") and names[1].endswith("attention.x")


def test_summary_of_a_fullmodel_only_run_does_not_call_its_column_reinit() -> None:
    """`--reset fullmodel` alone: the one result column held the whole-model reset row under
    the heading `reinit@0`."""
    import pandas as pd

    from layerfast.report.tables import COLUMNS
    from layerfast.report.terminal import summary_table

    rows = [dict.fromkeys(COLUMNS) | {"unit": "*", "kind": "baseline", "error": 0.1,
                                      "error_lo": 0.05, "error_hi": 0.2, "n": 10,
                                      "delta_error": 0.0}]
    rows += [dict.fromkeys(COLUMNS) | {"unit": "*", "kind": "fullmodel", "checkpoint": t,
                                       "error": e, "n": 10, "delta_error": e - 0.1}
             for t, e in ((0, 0.9), (1, 0.1))]
    head = summary_table(pd.DataFrame(rows)).splitlines()[2]
    assert "reset@0" in head and "reinit" not in head, head

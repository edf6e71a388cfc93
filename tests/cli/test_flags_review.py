"""Review of every CLI flag and Python API option (session 21): bad values are one LayerfastError
(exit status 2 from the CLI), never a TypeError from deep inside, and nothing is written. Each
test failed on a200510."""

from __future__ import annotations

import pytest

import layerfast
from layerfast.analysis import list_units
from layerfast.cli import main
from layerfast.demo import demo
from layerfast.errors import LayerfastError


@pytest.mark.parametrize("out", [5, b"run", 1.5])
def test_analyze_out_that_is_not_a_path_is_refused_up_front(ckpts, tmp_path, monkeypatch, out):
    """`analyze(out=5)` built the model, read the checkpoints, planned the batch and then died
    in `Path(5)` with "TypeError: expected str, bytes or os.PathLike object" (train said
    "out must be a directory path"); bytes died in `Path(b"run")`."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayerfastError, match="out must be a directory path"):
        layerfast.analyze("fcn3x256", ckpts, data="digits", out=out, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", [5, b"demo"])
def test_demo_out_that_is_not_a_path_is_refused(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayerfastError, match="out must be a directory path"):
        demo(out, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["units", "reset"])
@pytest.mark.parametrize("value", [5, 2.5, object()])
def test_analyze_list_option_that_is_not_a_string_or_list_is_refused(ckpts, tmp_path, option,
                                                                      value):
    """`units=5` and `reset=5` were a bare "TypeError: 'int' object is not iterable"."""
    with pytest.raises(LayerfastError, match=f"--{option}"):
        layerfast.analyze("fcn3x256", ckpts, data="digits", out=tmp_path / "o", progress=False,
                          **{option: value})
    assert not (tmp_path / "o").exists()


def test_list_units_units_that_is_not_a_string_or_list_is_refused():
    with pytest.raises(LayerfastError, match="--units"):
        list_units("fcn3x256", units=5)


def test_list_units_num_classes_zero_is_refused():
    """`num_classes=0` was read as "not given" (`num_classes or ...`): the data's class count
    was used without a word, while -1 and 2.5 were refused."""
    with pytest.raises(LayerfastError, match="num_classes"):
        list_units("fcn3x256", num_classes=0)


def test_cli_still_accepts_the_documented_forms(ckpts, capsys):
    """The checks above leave the CLI's own strings alone (a dry run: nothing is evaluated)."""
    assert main(["analyze", "--arch", "fcn3x256", "--list-units", "--units", "fc1,fc2",
                 "--reset", "reinit"]) == 0
    assert "2 units" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [
    ["analyze", "--arch", "fcn3x256", "--list-units", "--units", "fc1", "--units", "fc2"],
    ["analyze", "--arch", "fcn3x256", "--list-units", "--reset", "reinit", "--reset", "rerandom"],
    ["analyze", "--arch", "fcn3x256", "--list-units", "--checkpoints", "0", "--checkpoints=3"],
    ["analyze", "--arch", "fcn3x256", "--list-units", "--seeds", "3", "--seeds", "1,2"],
    ["analyze", "--arch", "fcn3x256", "--list-units", "--reset", "interp", "--alphas", "0.5",
     "--alphas", "0.25"],
    ["analyze", "--arch", "fcn3x256", "--list-units", "--reset", "interp", "--alphas", "0.5",
     "--sigma", "0", "--sigma", "0.1"],
    ["train", "--arch", "fcn3x256", "--data", "digits", "--epochs", "3", "--out", "never",
     "--checkpoints", "0,1", "--checkpoints", "3"],
])
def test_a_list_flag_given_twice_is_refused(cmd, capsys, tmp_path, monkeypatch):
    """`--units 'conv*' --units 'fc*'` analysed the fc units alone, exit 0 (argparse keeps the
    last value): the first list was dropped without a word, whether the user meant both
    lists or a replacement. A list flag given twice with different values is now one line,
    exit 2, naming the flag."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(cmd)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    flag = next(a for a in reversed(cmd) if a.startswith("--")).split("=")[0]
    assert len(err.splitlines()) == 1 and flag in err and "twice" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_list_flag_repeated_with_the_same_value_still_runs(capsys):
    assert main(["analyze", "--arch", "fcn3x256", "--list-units", "--units", "fc1",
                 "--units", "fc1"]) == 0
    assert "1 unit " in capsys.readouterr().out


def test_max_samples_that_cuts_nothing_does_not_split_the_run(ckpts, tmp_path):
    """README: a different command into the same --out is refused unless it changes nothing
    evaluated. `--max-samples 1000` on digits' 360 test samples evaluates exactly what no
    --max-samples does (n is in the fingerprint too), yet the rerun was refused: "a run with
    different arguments (differs in: max_samples)". (A cap of exactly the data's size is still
    told apart: n alone cannot say whether it cut.)"""
    kw = dict(data="digits", reset="fullmodel", checkpoints=[0], out=tmp_path / "o",
              progress=False, figures=False)
    first = layerfast.analyze("fcn3x256", ckpts, max_samples=1000, **kw)
    assert first.run["n"] == 360
    again = layerfast.analyze("fcn3x256", ckpts, **kw)
    assert again.run["engine"]["evaluated"] == 0
    cut = layerfast.analyze("fcn3x256", ckpts, max_samples=100, fresh=True, **kw)
    with pytest.raises(LayerfastError, match="differs in: max_samples"):
        layerfast.analyze("fcn3x256", ckpts, **kw)  # a cap that cuts is still another run
    assert cut.run["n"] == 100


@pytest.mark.parametrize("path", [5, b"fig.png", ""])
def test_plot_path_that_is_no_file_name_is_refused(ckpts, tmp_path, path):
    """`res.plot(5)` raised TypeError from `Path(5)`; `res.plot("")` tried to write the current
    directory and said "cannot write .: Device or resource busy"."""
    res = layerfast.analyze("fcn3x256", ckpts, data="digits", reset="fullmodel", checkpoints=[0],
                            out=tmp_path / "o", progress=False, figures=False)
    with pytest.raises(LayerfastError, match="a figure's path must be a file name"):
        res.plot(path)


def _tiny():
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    return m, [(x, y)]


@pytest.mark.parametrize("model", [None, "fcn3x256", object()])
def test_evaluator_model_that_is_not_a_module_is_refused(model):
    """`Evaluator(None, [{}])` was "AttributeError: 'NoneType' object has no attribute
    'named_parameters'"."""
    with pytest.raises(LayerfastError, match="model must be a torch.nn.Module"):
        layerfast.Evaluator(model, [{}], device="cpu")


def test_evaluator_variants_that_are_no_list_are_refused():
    """`variants=None` was "TypeError: 'NoneType' object is not iterable"; one mapping passed
    for the list (`Evaluator(m, {"1.weight": w})`) was iterated as its keys, and each key was
    refused as "a variant must be a mapping"."""
    m, _ = _tiny()
    with pytest.raises(LayerfastError, match="variants must be a list"):
        layerfast.Evaluator(m, None, device="cpu")
    with pytest.raises(LayerfastError, match=r"pass \[it\]"):
        layerfast.Evaluator(m, {"1.weight": m[1].weight.detach().clone()}, device="cpu")


@pytest.mark.parametrize("data", [None, 5, "digits"])
def test_evaluator_run_data_that_is_no_iterable_of_batches_is_refused(data):
    """`ev.run(None)`, `ev.run(5)`: "TypeError: ... object is not iterable" from the planner."""
    m, batches = _tiny()
    ev = layerfast.Evaluator(m, [{}], device="cpu")
    with pytest.raises(LayerfastError, match="data must be a layerfast DataSource"):
        ev.run(data)
    assert ev.run(batches).counts.shape == (1, 4)  # the evaluator is still usable


def test_bench_glue_that_times_nothing_is_said(capsys):
    """docs/decisions.md: options that would do nothing are said. On the CPU only the 'fanout'
    row fans out; with --no-prefix-only it is not timed, and `--glue unfolded` changed nothing
    without a word (the JSON still said glue 'unfolded')."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on CUDA the default mode fans out, and --glue applies")
    from layerfast.bench import run
    from layerfast.cli import parser

    args = parser().parse_args(["bench", "--arch", "fcn2x16", "--max-samples", "40",
                                "--checkpoints", "2", "--seeds", "1", "--device", "cpu",
                                "--glue", "unfolded", "--no-prefix-only"])
    out = run(args)
    assert any("--glue unfolded has no effect" in w for w in out["warnings"]), out["warnings"]
    args = parser().parse_args(["bench", "--arch", "fcn2x16", "--max-samples", "40",
                                "--checkpoints", "2", "--seeds", "1", "--device", "cpu",
                                "--glue", "unfolded"])
    assert not any("--glue" in w for w in run(args)["warnings"])  # the fanout row uses it


def test_train_checkpoints_help_says_what_is_always_saved(capsys):
    """`train --checkpoints 2 --epochs 4` saves epochs 0, 2 and 4, which the help ("default:
    0,1,2,3,8,40,90,100 scaled") did not say: a user listing 2 alone got three files."""
    from layerfast.train import checkpoint_schedule

    assert checkpoint_schedule(4, "2") == [0, 2, 4]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 and --epochs are always saved" in text


def test_summary_of_a_train_split_run_says_train_error(ckpts, tmp_path, capsys):
    """`analyze --split train` printed "baseline test error 18.44% ..., n=1,437": the errors
    are the train split's (run.json said split "train"), and so must the summary, in analyze's
    output and in `layerfast report`'s."""
    out = tmp_path / "o"
    res = layerfast.analyze("fcn3x256", ckpts, data="digits", split="train", reset="fullmodel",
                            checkpoints=[0], max_samples=50, out=out, progress=False,
                            figures=False)
    assert "baseline train error" in res.summary() and "test error" not in res.summary()
    assert main(["report", str(out)]) == 0
    assert "baseline train error" in capsys.readouterr().out
    test = layerfast.analyze("fcn3x256", ckpts, data="digits", reset="fullmodel",
                             checkpoints=[0], max_samples=50, out=tmp_path / "t", progress=False,
                             figures=False)
    assert "baseline test error" in test.summary()


def _texts(fig) -> str:
    from matplotlib.text import Text

    return " | ".join(t.get_text() for t in fig.findobj(Text))


def test_heatmap_of_a_train_split_run_says_train_error(ckpts, tmp_path):
    """The heatmap of a `--split train` run was titled "Test error (%) after resetting one
    unit", its colour bar "test error (%)": as the summary, it names the split measured, in
    analyze's figure and in `layerfast report`'s redraw."""
    from layerfast.report import redraw

    out = tmp_path / "o"
    res = layerfast.analyze("fcn3x256", ckpts, data="digits", split="train", reset="reinit",
                            checkpoints=[0], max_samples=50, out=out, progress=False,
                            figures=False)
    text = _texts(res.figure("heatmap"))
    assert "train error (%)" in text and "Train error (%)" in text and "est error" not in text
    redraw(out)  # draws from the CSV files, the label from run.json
    test = layerfast.analyze("fcn3x256", ckpts, data="digits", reset="reinit",
                             checkpoints=[0], max_samples=50, out=tmp_path / "t", progress=False,
                             figures=False)
    assert "test error (%)" in _texts(test.figure("heatmap"))


def test_redraw_labels_the_heatmap_with_run_json_split(ckpts, tmp_path, monkeypatch):
    from layerfast import report

    out = tmp_path / "o"
    layerfast.analyze("fcn3x256", ckpts, data="digits", split="train", reset="reinit",
                      checkpoints=[0], max_samples=50, out=out, progress=False)
    seen = []
    real = report.figures.heatmap_figure
    monkeypatch.setattr(report.figures, "heatmap_figure",
                        lambda *a, **k: seen.append(_texts(fig := real(*a, **k))) or fig)
    report.redraw(out)
    assert seen and "train error (%)" in seen[0]


@pytest.mark.parametrize("stage_bytes", [0, -1, 1.5, "1", True])
def test_evaluator_stage_bytes_must_be_a_positive_integer(stage_bytes):
    """`stage_bytes=0` ran at the default limit (`stage_bytes or stage_limit(...)`), -1 and 1.5
    were taken as limits, and "1" failed mid-plan with "TypeError: '<=' not supported"; the
    other counts (`batch_size`, `max_fanout`) are refused up front."""
    m, _ = _tiny()
    with pytest.raises(LayerfastError, match="stage_bytes must be a positive integer"):
        layerfast.Evaluator(m, [{}], device="cpu", stage_bytes=stage_bytes)


def test_evaluator_small_stage_bytes_still_runs_in_several_passes():
    import torch

    m, batches = _tiny()
    w = torch.zeros_like(m[1].weight)
    ev = layerfast.Evaluator(m, [{}, {"1.weight": w}, {"1.weight": w + 1}], device="cpu",
                             stage_bytes=1)
    assert ev.run(batches).counts.shape == (3, 4) and len(ev.passes()) > 1


def test_version_flag(capsys):
    """`layerfast --version` was refused as "a command is required", exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"layerfast {layerfast.__version__}"

"""Audit of the `layerfast` command line (DESIGN.md §6): flags a researcher gets wrong are exit
status 2 with one clear line on stderr and nothing written, and the CLI holds no logic the
Python API lacks.

Each test here failed before the fix its docstring names.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from layerfast.cli import parser
from layerfast.errors import LayerfastError
from tests.cli.test_cli import cli


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def one_line(rc: int, err: str, match: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


# ---- abbreviated flags ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, meant",
    [
        (["analyze", "--arch", "fcn3x256", "--seed", "7"], "--seeds"),
        (["analyze", "--arch", "fcn3x256", "--thresh", "0.1"], "--threshold"),
        (["analyze", "--arch", "fcn3x256", "--check", "0,1"], "--checkpoints"),
        (["analyze", "--arch", "fcn3x256", "--gran", "block"], "--granularity"),
        (["train", "--arch", "fcn3x256", "--data", "digits", "--epochs", "1", "--out", "x",
          "--check", "0"],
         "--checkpoints"),
        (["bench", "--seed", "3"], "--seeds"),
    ],
)  # fmt: skip
def test_an_abbreviated_flag_is_refused_and_the_full_one_suggested(
    argv: list[str], meant: str, capsys
) -> None:
    """argparse's prefix matching took `analyze --seed 7` (the spelling of `train --seed`) as
    `--seeds 7`, i.e. seeds 1..7: seven re-randomizations per unit instead of seed 7, with no
    word said. Likewise `--thresh`, `--check`. A flag is now spelt in full; the error names the
    flag that was probably meant."""
    with pytest.raises(SystemExit) as exc:  # parsing alone: before the fix the command ran
        parser().parse_args(argv)
    out, err = capsys.readouterr()
    line = one_line(exc.value.code, err, "unrecognized arguments: " + re.escape(argv[-2]))
    assert f"did you mean {meant}?" in line and out == ""


def test_a_bare_double_dash_is_not_taken_for_a_flags_prefix(capsys) -> None:
    """`--` was answered with "(did you mean --help?)": every flag starts with it."""
    with pytest.raises(SystemExit):
        parser().parse_args(["analyze", "--arch", "fcn3x256", "--ckpts", "x", "--"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --" in err and "did you mean" not in err


def test_full_flags_and_equals_forms_still_parse() -> None:
    args = parser().parse_args(
        ["analyze", "--arch", "fcn3x256", "--seeds=1,7", "--threshold", "0.1", "--no-fanout"]
    )
    assert args.seeds == [1, 7] and args.threshold == 0.1 and args.fanout == "off"


# ---- values that look like flags -----------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--seeds", "-1,2", r"seeds must lie in \[0, 2\^63\); got -1"),
        ("--checkpoints", "-1,0", "no checkpoint with label -1"),
        ("--checkpoints", "-2", "no checkpoint with label -2"),
    ],
)
def test_a_negative_list_is_judged_as_a_value(
    flag: str, value: str, match: str, ckpts: Path, tmp_path: Path, capsys
) -> None:
    """argparse reads `-1,2` as a flag (only `-1` looks like a negative number to it), so
    `--seeds -1,2` said 'argument --seeds: expected one argument': the user gave one. The value
    now reaches the check that explains what is wrong with it."""
    out = tmp_path / "o"
    rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", out,
                      flag, value], capsys)  # fmt: skip
    one_line(rc, err, match)
    assert not out.exists()


# ---- --list-units ----------------------------------------------------------------------------
def test_list_units_says_what_the_units_are(capsys) -> None:
    """With --units, the summary line said '(layer granularity, ...)': the units were the
    patterns', not the layers'; and --help promised variants the listing never printed."""
    rc, out, _ = cli(["analyze", "--arch", "fcn3x256", "--list-units", "--units", "fc[12]"], capsys)
    assert rc == 0
    *rows, last = out.strip().splitlines()
    assert [r.split()[0] for r in rows] == ["fc[12]"]
    assert last == "1 unit (custom: --units fc[12], --bn with-layer)"
    rc, out, _ = cli(["analyze", "--arch", "fcn3x256", "--list-units", "--bn", "keep"], capsys)
    assert out.strip().splitlines()[-1] == "4 units (layer granularity, --bn keep)"
    rc, out, _ = cli(["analyze", "--help"], capsys)
    assert "(and variants)" not in out


def test_list_units_builds_for_the_data_the_manifest_names(tmp_path, monkeypatch, capsys):
    """`--list-units --ckpts DIR` built the model for digits' 1×8×8 samples whatever the
    checkpoints were trained on; a model whose units depend on the input (here one head per
    input channel) was listed wrong. The manifest's data now decides, as analyze's does."""
    from layerfast.train import train

    (tmp_path / "perchannel.py").write_text(
        "from torch import nn\n"
        "def make(num_classes, in_shape):\n"
        "    return nn.ModuleList(nn.Linear(in_shape[1] * in_shape[2], num_classes)\n"
        "                         for _ in range(in_shape[0]))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    train("fcn1x8", "synthetic:cifar:40", 1, tmp_path / "ck", device="cpu", progress=False)
    argv = ["analyze", "--arch", "perchannel:make", "--list-units"]
    rc, out, _ = cli([*argv, "--ckpts", tmp_path / "ck"], capsys)
    assert rc == 0 and out.strip().splitlines()[-1].startswith("3 units "), out  # 3 channels
    rc, out, _ = cli(argv, capsys)
    assert rc == 0 and out.strip().splitlines()[-1].startswith("1 unit "), out  # digits: 1
    (tmp_path / "ck" / "manifest.json").write_text("{not json")  # refused as analyze refuses it
    rc, out, err = cli([*argv, "--ckpts", tmp_path / "ck"], capsys)
    assert rc == 2 and out == "" and "manifest.json" in err and err.count("\n") == 1, err


# ---- defects that were outside the CLI (analysis.py, train.py) ----------------------------
def test_the_api_reads_seeds_as_the_cli_does(ckpts: Path, tmp_path: Path) -> None:
    """DESIGN §5: analyze() takes the same options as the CLI. `--seeds 3` is seeds 1..3 and
    `--seeds 1,7,9` names them; `analyze(seeds="3")` ran seed 3 alone (a str is iterated),
    and `analyze(seeds="1,7,9")` raised ValueError from int(',')."""
    from layerfast.analysis import analyze

    for text, want in (("3", [1, 2, 3]), ("1,7,9", [1, 7, 9])):
        res = analyze("fcn3x256", ckpts, reset="rerandom", seeds=text, device="cpu",
                      out=tmp_path / text, progress=False, figures=False)  # fmt: skip
        assert res.run["seeds"] == want
    with pytest.raises(LayerfastError, match="--seeds takes a count like 3 or seeds like 1,7,9"):
        analyze("fcn3x256", ckpts, seeds="1,x", out=tmp_path / "x")


def test_an_empty_reset_is_bad_input(ckpts: Path, tmp_path: Path, capsys) -> None:
    """`--reset ''` (and `analyze(reset=[])`) ran every kind, as if --reset had been left out."""
    out = tmp_path / "o"
    rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", out,
                      "--reset", ""], capsys)  # fmt: skip
    one_line(rc, err, "--reset")
    assert not out.exists()


def test_train_with_an_empty_out_is_bad_input(tmp_path: Path, monkeypatch, capsys) -> None:
    """`layerfast train --out ''` wrote epoch_*.pt and manifest.json among the files of the
    current directory and said 'checkpoints and manifest.json in /' (analyze refuses
    `--out ''` for this reason)."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(["train", "--arch", "fcn3x256", "--data", "digits", "--epochs", "1",
                      "--out", "", "--quiet",
                      "--max-samples", "64"], capsys)  # fmt: skip
    one_line(rc, err, "--out")
    assert list(tmp_path.iterdir()) == []


def test_demo_with_an_empty_out_is_bad_input(tmp_path: Path, monkeypatch, capsys) -> None:
    """`layerfast demo --out ''` put checkpoints/ and analysis/ into the current directory."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(["demo", "--out", ""], capsys)
    one_line(rc, err, "--out")
    assert list(tmp_path.iterdir()) == []


def test_demo_with_a_file_as_out_names_that_file(tmp_path: Path, capsys) -> None:
    """`demo --out FILE` named FILE/checkpoints in its error, not the file in the way."""
    (tmp_path / "f").write_text("mine")
    rc, _, err = cli(["demo", "--out", tmp_path / "f", "--quiet"], capsys)
    one_line(rc, err, re.escape(f"--out {tmp_path / 'f'} is not a directory"))
    assert (tmp_path / "f").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    rc, _, err = cli(["demo", "--out", tmp_path / "link", "--quiet"], capsys)
    one_line(rc, err, re.escape(f"--out {tmp_path / 'link'} is a dangling symbolic link"))


def test_every_analyze_flag_reaches_the_run(ckpts: Path, tmp_path: Path, capsys) -> None:
    """Each option, set away from its default, is the one the run used, read back from
    run.json: dropping `split=`, `bn=` or `precision=` from cli._analyze's call passed every
    test before (a script test counted variants, the same under --bn keep and with-layer).
    `n == 400` is only reachable on digits' train split (its test split has 360 samples)."""
    import json

    out = tmp_path / "run"
    argv = ["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", out, "--quiet",
            "--data", "digits", "--split", "train", "--max-samples", "400", "--units", "fc1,fc3",
            "--bn", "keep", "--reset", "reinit,rerandom", "--checkpoints", "1", "--seeds", "2",
            "--threshold", "0.1", "--final", "2", "--device", "cpu", "--precision", "bf16",
            "--batch-size", "64", "--fanout", "on", "--layout", "channels_last"]
    rc, _, err = cli(argv, capsys)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert {k: run[k] for k in ("data", "split", "max_samples", "n", "units", "patterns", "bn",
                                "reset", "evaluated_checkpoints", "seeds", "threshold",
                                "final", "device", "precision", "batch_size", "channels_last",
                                "variants")} == {
        "data": "digits", "split": "train", "max_samples": 400, "n": 400,
        "units": ["fc1", "fc3"], "patterns": ["fc1", "fc3"], "bn": "keep",
        "reset": ["reinit", "rerandom"], "evaluated_checkpoints": [1], "seeds": [1, 2],
        "threshold": 0.1, "final": 2, "device": "cpu", "precision": "bf16", "batch_size": 64,
        "channels_last": True, "variants": 7,  # 2 units x (1 checkpoint + 2 seeds) + baseline
    }
    assert run["engine"]["plan"]["fanned_variants"] == 6  # --fanout on (the CPU's auto is off)
    # the command as given, quoted for a shell (it was " ".join(sys.argv): pytest's own argv
    # here, and from a shell the entry point's path with `fc[12]` left for the shell to glob)
    assert shlex.split(run["command"]) == ["layerfast", *map(str, argv)]
    assert run["cwd"] == os.getcwd()


def test_the_command_recorded_is_quoted_for_a_shell(ckpts: Path, tmp_path: Path, capsys) -> None:
    import json

    out = tmp_path / "a b"
    rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", out, "--quiet",
                      "--units", "fc[12]", "--reset", "reinit", "--checkpoints", "0"], capsys)
    assert rc == 0, err
    command = json.loads((out / "run.json").read_text())["command"]
    assert command == (f"layerfast analyze --arch fcn3x256 --ckpts {ckpts} --out '{out}' "
                       "--quiet --units 'fc[12]' --reset reinit --checkpoints 0")
    # from Python: the interpreter's own arguments (sys.argv reduced `python -c CODE` to "-c")
    import subprocess
    import sys

    code = (f"import layerfast; layerfast.analyze('fcn3x256', {str(ckpts)!r}, out={str(out)!r}, "
            "reset='reinit', checkpoints='0', progress=False, figures=False, fresh=True)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    command = json.loads((out / "run.json").read_text())["command"]
    assert shlex.split(command)[1:] == ["-c", code]

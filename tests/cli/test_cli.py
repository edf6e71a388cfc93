"""The `layerfast` command line (DESIGN.md §6): bad input everywhere gives one clear line on
stderr starting `layerfast: error:`, exit status 2, no traceback, and no results presented as
complete in --out; good input prints a progress bar on stderr and the summary on stdout.

Most cases call `layerfast.cli.main` in-process (an uncaught exception would fail the test,
which is stricter than grepping for "Traceback"); two run the real interpreter to cover what a
user sees from a shell, including a user factory imported from the current directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def shell(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # PYTHONPATH: import this checkout even where an editable install is stale or absent.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "layerfast", *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_bad_input(rc: int, err: str, match: str, out: Path | None = None) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("layerfast: error: "), err
    assert re.search(match, lines[0]), lines[0]
    if out is not None:
        assert not (out / "results.csv").exists() and not (out / "run.json").exists()
    return lines[0]


# ---- bad inputs: each builds its case in tmp_path and returns (argv, expected message) --------
def _copy(ckpts: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(ckpts, tmp / "ck"))


def _missing(ck: Path, tmp: Path):
    return ["--ckpts", tmp / "nope"], "does not exist"


def _no_tau0(ck: Path, tmp: Path):
    d = _copy(ck, tmp)
    (d / "epoch_000.pt").unlink()
    man = json.loads((d / "manifest.json").read_text())
    man["checkpoints"] = [c for c in man["checkpoints"] if c["epoch"] != 0]
    (d / "manifest.json").write_text(json.dumps(man))
    return ["--ckpts", d, "--reset", "reinit"], "τ=0"


def _truncated(ck: Path, tmp: Path):
    d = _copy(ck, tmp)
    f = d / "epoch_002.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["--ckpts", d], "epoch_002.pt.*(truncated|corrupt)"


def _corrupt(ck: Path, tmp: Path):
    d = _copy(ck, tmp)
    (d / "epoch_002.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return ["--ckpts", d], "epoch_002.pt"


class _Evil:
    """Unpickling this would create the marker file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _code_pickle(ck: Path, tmp: Path):
    d = _copy(ck, tmp)
    sd = torch.load(d / "epoch_002.pt", weights_only=True)
    evil = _Evil()
    evil.marker = str(tmp / "MARKER")
    sd["extra"] = evil
    torch.save(sd, d / "epoch_002.pt")
    return ["--ckpts", d], "epoch_002.pt.*code"


def _nan(ck: Path, tmp: Path):
    d = _copy(ck, tmp)
    sd = torch.load(d / "epoch_003.pt", weights_only=True)
    sd["fc2.weight"][3, 4] = float("nan")
    torch.save(sd, d / "epoch_003.pt")
    return ["--ckpts", d], "NaN.*fc2.weight"


def _npz(tmp: Path, name: str, n: int, label: int) -> Path:
    path = tmp / name
    np.savez(
        path,
        x=np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32),
        y=np.full(n, label, dtype=np.int64),
    )
    return path


def _labels_12(ck: Path, tmp: Path):
    return ["--ckpts", ck, "--data", _npz(tmp, "y12.npz", 20, 12)], "12"


def _empty_data(ck: Path, tmp: Path):
    return ["--ckpts", ck, "--data", _npz(tmp, "empty.npz", 0, 0)], "empty"


def _corrupt_beton(ck: Path, tmp: Path):
    (tmp / "x.beton").write_bytes(np.random.default_rng(1).bytes(4096))
    return ["--ckpts", ck, "--data", tmp / "x.beton"], "beton|FFCV"


def _out_under_file(ck: Path, tmp: Path):
    (tmp / "plain").write_text("a regular file")
    return ["--ckpts", ck, "--out", tmp / "plain" / "out"], "cannot write to the out dir"


def _out_proc(ck: Path, tmp: Path):
    return ["--ckpts", ck, "--out", "/proc/forbidden"], "cannot write to the out dir"


CASES: dict[str, Callable] = {
    "missing ckpt dir": _missing,
    "no tau0 for reinit": _no_tau0,
    "truncated checkpoint": _truncated,
    "corrupt checkpoint": _corrupt,
    "code-carrying pickle": _code_pickle,
    "NaN weights": _nan,
    "labels outside the classes": _labels_12,
    "empty data": _empty_data,
    "corrupt beton": _corrupt_beton,
    "out dir under a file": _out_under_file,
    "out dir in /proc": _out_proc,
}


# Opening a .beton imports FFCV (numba and friends): several seconds, so that case is `slow`.
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if "beton" in c else c for c in CASES]
)
def test_bad_input(case: str, ckpts: Path, tmp_path: Path, capsys) -> None:
    extra, match = CASES[case](ckpts, tmp_path)
    out = tmp_path / "out"
    argv = ["analyze", "--arch", "fcn3x256", "--quiet", "--out", out, *extra]
    rc, _, err = cli(argv, capsys)
    assert_bad_input(rc, err, match, out)
    assert not (tmp_path / "MARKER").exists()


def test_key_and_shape_mismatches_are_listed(ckpts: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = cli(["analyze", "--arch", "fcn2x100", "--ckpts", ckpts, "--out", tmp_path], capsys)
    line = assert_bad_input(rc, err, "do not match", tmp_path)
    for key in ("fc4.weight", "fc4.bias", "fc1.weight", "fc3.bias"):
        assert key in line
    assert "[256, 64]" in line and "[100, 64]" in line


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--arch", "no_such_arch"], "unknown arch"),
        (["--seeds", "0"], "--seeds"),
        (["--batch-size", "0"], "--batch-size"),
        (["--threshold", "1.5"], "--threshold"),
        (["--device", "tpu"], "--device"),
        (["--reset", "reinit,sideways"], "--reset"),
        (["--checkpoints", "0,7"], "label 7"),
        (["--units", "nothing*"], "nothing"),
    ],
)
def test_bad_options(argv: list[str], match: str, ckpts: Path, tmp_path: Path, capsys) -> None:
    base = {"--arch": "fcn3x256"}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    flat = [x for kv in base.items() for x in kv]
    rc, _, err = cli(["analyze", "--ckpts", ckpts, "--out", tmp_path / "o", *flat], capsys)
    assert_bad_input(rc, err, match, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # rejected before the out dir was made


@pytest.mark.parametrize(
    "argv,prog,match",
    [
        ([], "layerfast", "a command is required: analyze, train"),
        (["frobnicate"], "layerfast", "invalid choice: 'frobnicate'"),
        (["analyze"], "layerfast analyze", "required: --arch"),
        (
            ["analyze", "--arch", "fcn3x256", "--no-such-flag"],
            "layerfast analyze",
            "unrecognized arguments: --no-such-flag",
        ),
        (
            ["analyze", "--arch", "fcn3x256", "--split", "val"],
            "layerfast analyze",
            "--split: invalid choice: 'val'",
        ),
        (
            ["analyze", "--arch", "fcn3x256", "--threshold", "abc"],
            "layerfast analyze",
            "--threshold: invalid float value",
        ),
        (
            ["analyze", "--arch", "fcn3x256", "--seeds", "x"],
            "layerfast analyze",
            "--seeds: expected",
        ),
        (["train", "--arch", "fcn3x256", "--data", "digits", "--out", "x"], "layerfast train",
         "required: --epochs"),
        (["train", "--arch", "fcn3x256", "--epochs", "1", "--out", "x"], "layerfast train",
         "required: --data"),
        (["info", "--bogus"], "layerfast info", "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], prog: str, match: str, capsys) -> None:
    """DESIGN §6: a usage error is exit 2 with one clear line on stderr (argparse's usage block
    would be a dozen), naming the command and where its usage is."""
    rc, out, err = cli(argv, capsys)
    assert rc == 2 and out == "", err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and lines[0].endswith(f"(see {prog} --help)")
    assert match in lines[0] and "usage:" not in err


def test_help_still_shows_the_usage(capsys) -> None:
    rc, out, _ = cli(["analyze", "--help"], capsys)
    assert rc == 0 and out.startswith("usage: layerfast analyze") and "--checkpoints" in out


def test_every_option_says_what_it_does_and_its_default() -> None:
    """`layerfast train --help` listed `--lr LR`, `--schedule {cosine,step,constant}`, ... with
    no word on what they do or what the default is; a user had to read train.py. Every option
    of every command now has a help line, and each one with a non-trivial default names it."""
    from layerfast.cli import parser

    for name, sub in parser().commands.items():
        for a in sub._actions:
            if a.dest == "help":
                continue
            where = f"layerfast {name} {'/'.join(a.option_strings) or a.dest}"
            assert a.help, f"{where} has no help"
            if a.default not in (None, False) and not a.required:
                shown = re.escape(str(a.default).replace("0.0005", "5e-4"))
                # "default: 1" or "x (default)": a bare "1" somewhere in the text was accepted
                said = re.search(rf"default[^)]*?{shown}|{shown} \(default\)", a.help)
                assert said or "%(default)" in a.help, f"{where}: no default in {a.help!r}"


def test_factory_that_raises_from_a_shell(ckpts: Path, tmp_path: Path) -> None:
    (tmp_path / "myfactory.py").write_text(
        "def build(**kwargs):\n    raise RuntimeError('boom: factory misconfigured')\n"
    )
    p = shell(["analyze", "--arch", "myfactory:build", "--ckpts", ckpts, "--out", "out"], tmp_path)
    assert_bad_input(p.returncode, p.stderr, "boom: factory misconfigured", tmp_path / "out")
    p = shell([], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (
        "layerfast: error: a command is required: analyze, train, demo, "
        "bench, convert, report, info (see layerfast --help)"
    )


@pytest.mark.parametrize(("form", "rows"), [("mean(0, keepdim=True)", 1), ("t()", 10)])
def test_user_model_with_pooled_logits_is_bad_input(ckpts: Path, tmp_path: Path, form: str,
                                                     rows: int) -> None:
    """A user model that averages its logits over the batch passed analyze's one-sample probe
    and ended in `score_`'s shape error with a traceback; one that returns them transposed
    ([classes, batch]) was "a model with 1 output". Both are exit 2 naming the rows, and no
    output directory is left."""
    (tmp_path / "pooledfcn.py").write_text(
        "from layerfast.models.fcn import fcn\n"
        "class Pooled(type(fcn(3, 256, 10, (1, 8, 8)))):\n"
        "    def forward(self, x):\n"
        f"        return super().forward(x).{form}\n"
        "def build(num_classes, in_shape):\n"
        "    m = fcn(3, 256, num_classes, in_shape)\n"
        "    m.__class__ = Pooled\n"
        "    return m\n"
    )
    p = shell(["analyze", "--arch", "pooledfcn:build", "--ckpts", ckpts, "--data", "digits",
               "--reset", "reinit", "--out", "out", "--quiet"], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    *warnings, error = p.stderr.strip().splitlines()
    assert warnings == [], p.stderr  # refused by the probe, before the checkpoints are read
    assert error == (f"layerfast: error: the model returned {rows} rows of logits for a batch of "
                     "2 samples: it must return one row per sample")
    assert not (tmp_path / "out").exists()


def test_an_internal_error_is_exit_1_with_its_traceback(ckpts: Path, tmp_path: Path) -> None:
    """DESIGN §6: exit 1 for an internal error (a bug of ours), with the traceback a bug report
    needs; only bad input is the one-line exit 2."""
    code = (
        "import sys\n"
        "from layerfast.engine import evaluator\n"
        "def boom(*a, **k):\n"
        "    raise RuntimeError('simulated internal error')\n"
        "evaluator.Evaluator.run = boom\n"
        "from layerfast.cli import main\n"
        f"sys.exit(main(['analyze', '--arch', 'fcn3x256', '--ckpts', {str(ckpts)!r}, '--quiet',\n"
        f"               '--reset', 'reinit', '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 1, p.stderr
    assert "Traceback" in p.stderr and "RuntimeError: simulated internal error" in p.stderr
    assert "layerfast: error:" not in p.stderr  # not dressed up as the user's mistake


def test_analyze_and_train_defaults_are_designs() -> None:
    """DESIGN §6's defaults, read from the parser itself: the help test above only checks that
    each help text names its default, so a default changed with its help line passed."""
    from layerfast.cli import parser

    a = parser().parse_args(["analyze", "--arch", "x", "--ckpts", "d"])
    assert (a.split, a.granularity, a.bn, a.reset, a.checkpoints, a.seeds, a.threshold,
            a.device, a.precision, a.batch_size, a.max_samples, a.data) == (
        "test", "layer", "with-layer", "reinit,rerandom,fullmodel", "all", 1, 0.05,
        "auto", "auto", None, None, None)  # fmt: skip
    t = parser().parse_args(["train", "--arch", "x", "--data", "digits", "--epochs", "100",
                             "--out", "o"])  # fmt: skip
    assert t.checkpoints is None  # None: the paper's 0,1,2,3,8,40,90,100 (scaled to --epochs)
    from layerfast.train import checkpoint_schedule

    assert checkpoint_schedule(100) == [0, 1, 2, 3, 8, 40, 90, 100]


# ---- good input ------------------------------------------------------------------------------
def test_analyze_ends_with_how_many_warnings_it_printed(ckpts: Path, tmp_path: Path,
                                                       capsys) -> None:
    """Warnings come before the progress bar and the summary table; the last line says how
    many there were, so a user reading the table sees that there is something above it."""
    rc, out, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--device", "cpu",
                        "--final", "0", "--reset", "reinit", "--out", tmp_path], capsys)
    assert rc == 0, err
    assert err.count("layerfast: warning: ") == 1 and "chance" in err
    assert out.splitlines()[-1] == "1 warning (stderr, above; also in run.json)"


def test_analyze_prints_progress_on_stderr_and_summary(ckpts: Path, tmp_path: Path, capsys) -> None:
    rc, out, err = cli(
        ["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--device", "cpu", "--out", tmp_path],
        capsys,
    )
    assert rc == 0, err
    assert re.search(r"\d+ variants: .*/360 ", err)  # the tqdm bar (may close before 360/360)
    assert "/360 " not in out
    assert re.search(r"^fc1\s", out, re.M) and re.search(r"^threshold: .*0\.05", out, re.M)
    assert str(tmp_path) in out
    assert "warning" not in out + err  # a trained model on its own data: nothing to warn of
    # `layerfast report OUT` redraws the figures from the CSV files alone
    for name in ("heatmap.png", "distances.png"):
        (tmp_path / name).unlink()
    rc, out, err = cli(["report", tmp_path], capsys)
    assert rc == 0, err
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    assert (tmp_path / "distances.png").stat().st_size > 1000
    assert "heatmap.png" in out
    rc, _, err = cli(["report", tmp_path / "nowhere"], capsys)
    assert_bad_input(rc, err, "not a directory")


@pytest.mark.parametrize("granularity,count", [("block", 18), ("stage", 6), ("layer", 54)])
def test_list_units_resnet50(granularity: str, count: int, capsys) -> None:
    rc, out, _ = cli(
        [
            "analyze",
            "--list-units",
            "--arch",
            "resnet50",
            "--data",
            "synthetic:imagenet",
            "--granularity",
            granularity,
        ],
        capsys,
    )
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[-1].startswith(f"{count} units")
    names = [line.split()[0] for line in lines[:-1]]
    assert len(names) == count and names[-1] == "fc"
    if granularity == "block":
        assert names[:3] == ["stem", "layer1.0", "layer1.1"] and names[-2] == "layer4.2"


def test_demo_writes_its_report(tmp_path: Path, capsys) -> None:
    """The zero-setup demo end to end (its ~10 s is measured in the README, never asserted:
    timings do not gate tests)."""
    rc, out, err = cli(["demo", "--out", tmp_path / "demo", "--quiet"], capsys)
    assert rc == 0, err
    report = tmp_path / "demo" / "analysis"
    assert str(report) in out and "heatmap.png" in out
    for name in ("results.csv", "distances.csv", "run.json", "heatmap.png", "distances.png"):
        assert (report / name).is_file()


@pytest.mark.parametrize(
    "argv, want",
    [
        ([], "auto"),
        (["--fanout", "on"], "on"),
        (["--no-fanout"], "off"),
        (["--fanout", "off"], "off"),
    ],
)
def test_fanout_flag(argv: list[str], want: str) -> None:
    from layerfast.cli import parser

    args = parser().parse_args(["analyze", "--arch", "fcn3x256", "--ckpts", "x", *argv])
    assert args.fanout == want


def test_fanout_on_is_recorded_in_run_json(ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "on"
    rc = main(
        [
            "analyze",
            "--arch",
            "fcn3x256",
            "--ckpts",
            str(ckpts),
            "--data",
            "digits",
            "--reset",
            "reinit",
            "--device",
            "cpu",
            "--fanout",
            "on",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    assert run["engine"]["plan"]["fanned_variants"] > 0, run["engine"]


def test_layout_is_recorded_and_channels_last_matches_contiguous(
    ckpts: Path, tmp_path: Path
) -> None:
    runs = {}
    for layout in ("auto", "channels_last"):
        out = tmp_path / layout
        rc = main(
            [
                "analyze",
                "--arch",
                "fcn3x256",
                "--ckpts",
                str(ckpts),
                "--data",
                "digits",
                "--reset",
                "reinit",
                "--device",
                "cpu",
                "--layout",
                layout,
                "--quiet",
                "--out",
                str(out),
            ]
        )
        assert rc == 0
        runs[layout] = (
            json.loads((out / "run.json").read_text()),
            (out / "results.csv").read_text(),
        )
    assert runs["auto"][0]["channels_last"] is False  # the CPU default keeps the exact layout
    assert runs["channels_last"][0]["channels_last"] is True
    # an FCN has no conv: its layout changes nothing, results are identical
    assert runs["auto"][1] == runs["channels_last"][1]
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--layout", "nhwc"])
    assert e.value.code == 2


def test_bench_runs_both_modes_and_the_naive_loop_side_by_side(capsys) -> None:
    assert main(["bench", "--device", "cpu", "--max-samples", "120", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["seconds"]) == {"layerfast", "fanout", "naive"}  # CPU: default is prefix only
    assert out["layerfast_fanout"] is False and out["fanout_fanout"] is True
    assert out["n"] == 120 and out["variants"] == 29 and not out["naive_scaled"]
    assert out["layerfast_plan"]["batch_size"] == 1000 and out["glue"] == "fused"
    assert all(v > 0 for v in out["seconds"].values())
    # the compute floor: FCN 3×256 on 8×8 digits is 64·256 + 2·256·256 + 256·10 MACs a sample
    g = out["floor"]["gflop_per_sample"]
    assert g["forward"] * 1e9 == pytest.approx(2 * (64 * 256 + 2 * 256 * 256 + 256 * 10))
    assert (
        g["naive"] == pytest.approx(29 * g["forward"]) and g["forward"] < g["needed"] < g["naive"]
    )
    assert (
        out["floor"]["seconds_measured_rate"] > 0 and out["floor"]["rate_tflops_datasheet"] is None
    )
    assert set(out["times_floor"]) == set(out["seconds"])
    # where layerfast's time went: the phases lie within the total, which is the timed run
    ph = out["layerfast_phases"]
    assert set(ph) == {"setup", "data", "baseline", "fanned", "swapped", "total"}
    assert ph["fanned"] == 0 < ph["swapped"] and out["fanout_phases"]["fanned"] > 0
    assert sum(v for k, v in ph.items() if k != "total") <= ph["total"] + 1e-3
    assert ph["total"] <= out["seconds"]["layerfast"] + 1e-3
    assert main(["bench", "--device", "cpu", "--max-samples", "120", "--naive-variants", "3"]) == 0
    text = capsys.readouterr().out
    # B= is the batch the pass ran: its 120 samples, 1000 planned (session 22)
    assert "(fan-out off, B=120, all the samples (1000 planned))" in text
    assert "timed on 3 of 29 variants, scaled" in text
    assert "(fan-out on, glue fused, B=" in text
    assert "compute floor:" in text and "× the floor" in text
    assert (
        "layerfast's time: setup " in text and "(setup and total wall time, the phases wall" in text
    )
    assert (
        main(
            [
                "bench",
                "--device",
                "cpu",
                "--max-samples",
                "60",
                "--glue",
                "unfolded",
                "--json",
                "--naive-variants",
                "2",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["glue"] == "unfolded"
    with pytest.raises(SystemExit) as e:
        main(["bench", "--glue", "fast"])
    assert e.value.code == 2


def test_bench_profile_that_cannot_be_written_is_refused_before_timing(tmp_path: Path, capsys,
                                                                     monkeypatch) -> None:
    """A directory as --profile was refused only after the whole benchmark had run."""
    monkeypatch.setattr("layerfast.data.open_data", lambda *a, **k: pytest.fail("timing started"))
    assert main(["bench", "--device", "cpu", "--profile", str(tmp_path)]) == 2
    assert "is a directory; name a file for the table" in capsys.readouterr().err


def test_bench_profile_writes_the_op_table(tmp_path: Path, capsys) -> None:
    table = tmp_path / "profile.txt"
    assert (
        main(
            [
                "bench",
                "--device",
                "cpu",
                "--max-samples",
                "200",
                "--no-prefix-only",
                "--naive-variants",
                "2",
                "--profile",
                str(table),
                "--profile-samples",
                "100",
                "--json",
            ]
        )
        == 0
    )
    p = json.loads(capsys.readouterr().out)["profile"]
    assert p["samples"] == 100 and p["file"] == str(table)
    ops = [e["op"] for e in p["top"]]
    assert "aten::addmm" in ops and "layerfast::score_" in "".join(table.read_text())
    assert 0 < sum(e["share"] for e in p["top"]) <= 1.0 + 1e-9
    # a profile path that cannot be written: one clear line, exit 2, before any timing runs
    assert main(["bench", "--device", "cpu", "--profile", str(tmp_path / "nowhere" / "p.txt")]) == 2
    err = capsys.readouterr().err
    assert "--profile" in err and "does not exist" in err and "Traceback" not in err


def test_sigterm_runs_the_cleanup_of_ctrl_c(tmp_path: Path) -> None:
    """`bench` killed with SIGTERM (a scheduler's preemption) left its temporary checkpoint
    directory behind: the process ended without running any `with` block. SIGTERM is now
    SystemExit(143), so it cleans up as Ctrl-C does."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = (
        "import os, signal, sys\n"
        "import layerfast.bench as b\n"
        "def term(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    raise AssertionError('not reached')\n"
        "b.naive_pass = term\n"
        "from layerfast.cli import main\n"
        "sys.exit(main(['bench', '--arch', 'fcn1x8', '--max-samples', '16', '--device', 'cpu']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TMPDIR": str(tmp)})
    assert p.returncode == 143, p.stderr
    assert "layerfast: terminated" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp.iterdir()) == []  # the bench's layerfast-bench-* directory is gone


@pytest.mark.parametrize("stderr", ["full", "closed"])
def test_a_stderr_that_cannot_be_written_does_not_stop_the_work(ckpts, tmp_path, stderr):
    """`2>/dev/full` made the first note (--data not given) an OSError, and `2>&-` made the
    progress bar an AttributeError: exit 1 with an out dir holding only progress.sqlite. bench's
    status lines went to stdout with stderr closed, into its --json. Lines on stderr are lost
    now, never the run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    kw: dict = {"cwd": tmp_path, "env": env, "capture_output": False, "timeout": 300,
                "stdout": subprocess.PIPE, "text": True}
    full = open("/dev/full", "w")  # noqa: SIM115 - closed below
    if stderr == "full":
        kw["stderr"] = full
    else:
        kw["preexec_fn"] = lambda: os.close(2)  # the child starts with no fd 2: sys.stderr None
    try:
        p = subprocess.run([sys.executable, "-m", "layerfast", "analyze", "--arch", "fcn3x256",
                            "--ckpts", str(ckpts), "--out", "o"], **kw)
        assert p.returncode == 0 and (tmp_path / "o" / "run.json").is_file()
        p = subprocess.run([sys.executable, "-m", "layerfast", "bench", "--arch", "fcn2x16",
                            "--data", "digits", "--max-samples", "32", "--json"], **kw)
        assert p.returncode == 0 and json.loads(p.stdout)["variants"] == 22
        p = subprocess.run([sys.executable, "-m", "layerfast", "analyze", "--arch", "nope",
                            "--ckpts", str(ckpts)], **kw)
        assert p.returncode == 2  # bad input keeps its status with nowhere to say it
    finally:
        full.close()

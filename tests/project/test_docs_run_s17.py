"""What the docs say, executed (session 17 review): each test pins one claim a run contradicted."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def finished_run(ckpts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import layerfast

    out = tmp_path_factory.mktemp("docsrun") / "run"
    layerfast.analyze("fcn3x256", ckpts, data="digits", device="cpu", out=out, progress=False,
                      reset="reinit", checkpoints=[0], max_samples=60, figures=False)
    return out


@pytest.mark.parametrize("bad", ["7", "-3", '"0.1"', "null"])
def test_report_names_a_bad_threshold_not_a_missing_run_json(finished_run: Path, bad: str,
                                                             capsys) -> None:
    """docs/decisions.md: a threshold outside [0, 1] is "unknown", like a missing run.json; the
    note must not claim the run.json that was read is unreadable."""
    from layerfast.cli import main

    run_json = finished_run / "run.json"
    saved = run_json.read_text()
    try:
        run_json.write_text(f'{{"threshold": {bad}, "bn": "with-layer"}}')
        assert main(["report", str(finished_run)]) == 0
        text = capsys.readouterr().out
        assert "threshold is unknown" in text
        assert "no readable run.json" not in text
        assert "(run.json records no threshold in [0, 1]: the run's threshold is unknown)" in text
    finally:
        run_json.write_text(saved)


def test_report_still_says_a_missing_run_json_is_unreadable(finished_run: Path, capsys) -> None:
    from layerfast.cli import main

    run_json = finished_run / "run.json"
    saved = run_json.read_text()
    try:
        for text in (None, "{not json", "[1, 2]"):
            run_json.unlink(missing_ok=True)
            if text is not None:
                run_json.write_text(text)
            assert main(["report", str(finished_run)]) == 0
            assert ("(no readable run.json: the run's threshold is unknown)"
                    in capsys.readouterr().out), text
    finally:
        run_json.write_text(saved)


@pytest.mark.parametrize("name, magic", [("fig.pdf", b"%PDF"), ("fig.svg", b"<?xml"),
                                         ("fig.png", b"\x89PNG"), ("fig", b"\x89PNG")])
@pytest.mark.parametrize("kind", ["heatmap", "distances"])
def test_plot_writes_the_format_its_path_names(finished_run: Path, tmp_path: Path, name: str,
                                               magic: bytes, kind: str) -> None:
    """README: `res.plot("fig.png")`; a user's `res.plot("fig.pdf")` got PNG bytes in fig.pdf."""
    res = _resumed(finished_run)
    path = res.plot(tmp_path / name, kind=kind)
    assert path == tmp_path / name
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left beside it


def test_plot_refuses_a_format_matplotlib_cannot_write(finished_run: Path,
                                                       tmp_path: Path) -> None:
    from layerfast.errors import LayerfastError

    res = _resumed(finished_run)
    with pytest.raises(LayerfastError, match="matplotlib knows no format 'docx'"):
        res.plot(tmp_path / "fig.docx")
    assert list(tmp_path.iterdir()) == []


def _resumed(out: Path):
    """The finished run's Analysis again (the same arguments: restored, nothing evaluated)."""
    import json

    import layerfast

    ckpts = json.loads((out / "run.json").read_text())["ckpts"]
    return layerfast.analyze("fcn3x256", ckpts, data="digits", device="cpu", out=out,
                             progress=False, reset="reinit", checkpoints=[0], max_samples=60,
                             figures=False)


@pytest.mark.parametrize(
    "argv, typed, meant",
    [
        (["train", "--arch", "fcn1x8", "--data", "digits", "--epoch", "1", "--out", "x"],
         "--epoch", "--epochs"),
        (["convert", "digits", "--t", "x.beton"], "--t", "--to"),
        (["analyze", "--ckpts", "x", "--arc", "fcn3x256"], "--arc", "--arch"),
    ],
)  # fmt: skip
def test_a_misspelt_required_flag_is_named(argv: list[str], typed: str, meant: str,
                                           capsys) -> None:
    """docs/decisions.md: "An unknown flag's error names the flag probably meant." argparse
    checks required flags first, so `train --epoch 1` said only that --epochs is required."""
    from layerfast.cli import parser

    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and err.count("\n") == 1
    assert "the following arguments are required" in err
    assert f"unrecognized {typed} (did you mean {meant}?)" in err


def test_a_missing_required_flag_alone_gets_no_hint(capsys) -> None:
    from layerfast.cli import parser

    for argv in (["train", "--arch", "fcn1x8", "--data", "digits", "--out", "x"],
                 ["train", "--arch", "fcn1x8", "--data", "digits", "--out", "x", "--", "--ep"]):
        with pytest.raises(SystemExit):
            parser().parse_args(argv)
        err = capsys.readouterr().err
        assert "required: --epochs (see layerfast train --help)" in err, argv


@pytest.mark.parametrize("fanout, fanned", [("off", False), (False, False), ("auto", False),
                                            (None, False), ("on", True), (True, True)])
def test_analyze_takes_the_cli_words_for_fanout(ckpts, tmp_path: Path, fanout, fanned) -> None:
    """DESIGN §5: analyze takes the CLI's options; `fanout="off"` (`--fanout off`) was read as
    `bool("off")`, i.e. on, and the run fanned out where the bit-exact swap path was asked for."""
    import layerfast

    res = layerfast.analyze("fcn3x256", ckpts, data="digits", device="cpu", out=tmp_path / "o",
                            progress=False, figures=False, reset="reinit", max_samples=40,
                            fanout=fanout)
    assert (res.run["engine"]["plan"]["fanned_variants"] > 0) is fanned


@pytest.mark.parametrize("fanout", ["yes", "Off", 1, 0.0])
def test_a_fanout_that_is_no_option_is_refused(fanout) -> None:
    import torch
    from torch import nn

    import layerfast
    from layerfast.errors import LayerfastError

    with pytest.raises(LayerfastError, match="fanout"):
        layerfast.Evaluator(nn.Linear(2, 2), [{}], device="cpu", fanout=fanout).run(
            [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))])

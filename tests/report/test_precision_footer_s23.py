"""The summary says when its errors were measured in a rounding mode (session 23). With bf16 now
the fast CPU mode, a table reprinted by `layerfast report`, or pasted without its command, read
as fp32's, the mode that reproduces the naive loop; bf16 moved a ResNet-20 row by 0.68 points and
an FCN verdict at the threshold. A bf16 or tf32 run's summary (analyze's, `Analysis.summary()`,
`layerfast report`'s) now says so in its footer; an fp32 run's, and an older run.json that
records no precision, do not."""

from __future__ import annotations

import json

import pytest

import layerfast
from layerfast.cli import main
from layerfast.report import summary

FOOTER = "precision: bf16: its rounding can move an error by up to about a point from fp32's"


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("prec")
    got = {}
    for p in ("fp32", "bf16"):
        got[p] = (out / p, layerfast.analyze("fcn3x256", ckpts, data="digits", device="cpu",
                                             precision=p, out=out / p, progress=False,
                                             max_samples=200, figures=False, quiet=True))
    return got


def _said(text: str) -> bool:
    return any(line.startswith(FOOTER) for line in text.splitlines())


def test_a_bf16_summary_says_its_precision(runs, capsys) -> None:
    out, res = runs["bf16"]
    assert res.run["precision"] == "bf16"
    assert _said(res.summary()) and _said(summary(out))
    assert main(["report", str(out)]) == 0
    assert _said(capsys.readouterr().out)


def test_an_fp32_summary_and_an_older_run_say_nothing(runs, tmp_path) -> None:
    out, res = runs["fp32"]
    assert "precision:" not in res.summary() and "precision:" not in summary(out)
    run = json.loads((runs["bf16"][0] / "run.json").read_text())
    del run["precision"]  # a run.json from before the precision was recorded
    old = tmp_path / "old"
    old.mkdir()
    for name in ("results.csv", "distances.csv"):
        (old / name).write_bytes((runs["bf16"][0] / name).read_bytes())
    (old / "run.json").write_text(json.dumps(run))
    assert "precision:" not in summary(old)

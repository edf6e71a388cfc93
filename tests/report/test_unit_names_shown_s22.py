"""A unit named with a control character (a ModuleDict key `"x\\ny"`) broke the `--list-units`
listing and the summary table over two lines (and a figure's label). It is now shown escaped
(`x\\ny`), one line per unit; results.csv keeps the name itself."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from layerfast.analysis import analyze
from layerfast.cli import main
from layerfast.report import summary
from layerfast.report.tables import fit_labels, printable
from layerfast.train import train


class _Net(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.d = nn.ModuleDict({"x\ny": nn.Linear(64, 16), "t\tab": nn.Linear(16, num_classes)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d["t\tab"](torch.relu(self.d["x\ny"](x.flatten(1))))


def build(num_classes: int = 10) -> nn.Module:
    return _Net(num_classes)


def test_printable_escapes_control_characters_only():
    assert printable("d.x\ny") == "d.x\\ny"
    assert printable("a\tb\x1bc\u2028d") == "a\\tb\\x1bc\\u2028d"
    assert printable("layer1.0.conv2 é ü") == "layer1.0.conv2 é ü"
    assert fit_labels(["d.x\ny", "fc"]) == ["d.x\\ny", "fc"]


def test_list_units_keeps_one_line_per_unit(capsys):
    rc = main(["analyze", "--list-units", "--arch", f"{__name__}:build", "--data", "digits"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(lines) == 3
    assert lines[0].startswith("d.x\\ny ") and lines[1].startswith("d.t\\tab ")


def test_summary_keeps_one_line_per_unit(tmp_path):
    train(build, "digits", 1, tmp_path / "run", max_samples=40, progress=False, device="cpu")
    analyze(build, tmp_path / "run", device="cpu", progress=False, figures=False,
            out=tmp_path / "an", reset=["reinit"])
    rows = [line for line in summary(tmp_path / "an").splitlines() if line.startswith("d.")]
    assert [r.split()[0] for r in rows] == ["d.x\\ny", "d.t\\tab"]
    units = set(pd.read_csv(tmp_path / "an" / "results.csv")["unit"])
    assert {"d.x\ny", "d.t\tab"} <= units  # the names themselves

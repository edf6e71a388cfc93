"""Session 22's fresh-eyes review of its own change (449832c..f5b4bd4): one test per defect it
introduced, each failing on the code before its fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from layerfast.cli import main
from tests.cli.test_flags_s22 import _data_warnings, _digits_npz
from tests.data.test_data_ffcv import require_ffcv


@pytest.mark.ffcv
def test_a_beton_converted_from_the_manifests_npz_is_not_other_data(ckpts, tmp_path, capsys):
    """9e57579: a .beton stands for the data its sidecar names, by name; the spec it was
    converted from kept its path in its key, so the manifest's `x.npz` (or `cifar10:DIR`)
    against the .beton converted from it was warned about as other data (docs/decisions.md:
    'a .beton whose sidecar names it as its source' is not warned about)."""
    from layerfast.data import convert

    require_ffcv()
    ck = tmp_path / "ck"
    shutil.copytree(ckpts, ck)
    npz = _digits_npz(ck / "x.npz")
    man = json.loads((ck / "manifest.json").read_text())
    (ck / "manifest.json").write_text(json.dumps({**man, "data": str(npz)}))
    to = convert(str(npz), tmp_path / "x.beton")
    capsys.readouterr()
    assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ck), "--data", str(to),
                 "--reset", "reinit", "--checkpoints", "0", "--out", str(tmp_path / "o"),
                 "--quiet", "--device", "cpu"]) == 0
    assert _data_warnings(capsys.readouterr().err) == []
    other = convert(str(_digits_npz(tmp_path / "y.npz")), tmp_path / "y.beton")  # other data
    assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ck), "--data", str(other),
                 "--reset", "reinit", "--checkpoints", "0", "--out", str(tmp_path / "o2"),
                 "--quiet", "--device", "cpu"]) == 0
    assert len(_data_warnings(capsys.readouterr().err)) == 1


class _OwnsModule(nn.Module):
    """Not wrapped: it owns a submodule called `module` beside its head."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.module(x))


@pytest.mark.parametrize("how", ["Evaluator", "naive_evaluate"])
def test_a_model_owning_a_submodule_called_module_is_not_called_wrapped(how):
    """c3326c5: a variant key missing the `module.` of the model's own submodule `module` was
    answered 'the model is wrapped in DataParallel/DDP ...: pass model.module', which would
    evaluate that submodule alone; a wrapper's keys all start with `module.`, this model's
    do not. A DataParallel model is still told to pass model.module."""
    from layerfast.engine import Evaluator
    from layerfast.engine.naive import naive_evaluate
    from layerfast.errors import LayerfastError

    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]

    def refusal(model: nn.Module) -> str:
        with pytest.raises(LayerfastError, match="unknown keys") as exc:
            if how == "Evaluator":
                Evaluator(model, [{"weight": torch.zeros(4, 4)}], device="cpu").run(batches)
            else:
                naive_evaluate(model, [{"weight": torch.zeros(4, 4)}], lambda: batches, "cpu")
        return str(exc.value)

    said = refusal(_OwnsModule())
    assert "wrapped" not in said and "model.module" not in said and "'module.'" in said
    assert "pass model.module" in refusal(nn.DataParallel(nn.Linear(4, 3)))


def test_the_interp_grid_shows_a_control_character_escaped(tmp_path):
    """4314ca3 escaped control characters in the summary's main table, the figures and
    --list-units, but the interp grid below the table printed the unit name raw: a ModuleDict
    key "x\\ny" broke its row over two lines."""
    from layerfast.analysis import analyze
    from layerfast.report import summary
    from layerfast.train import train
    from tests.report.test_unit_names_shown_s22 import build

    train(build, "digits", 1, tmp_path / "run", max_samples=40, progress=False, device="cpu")
    analyze(build, tmp_path / "run", device="cpu", progress=False, figures=False,
            out=tmp_path / "an", reset=["interp"], alphas="0.5")
    text = summary(tmp_path / "an")
    rows = [line.split()[0] for line in text.splitlines() if line.startswith("d.")]
    assert rows == ["d.x\\ny", "d.t\\tab"]


def test_cifar10_named_by_its_batches_folder_is_not_other_data(tmp_path, capsys):
    """9e57579: `cifar10:DIR` reads DIR/cifar-10-batches-py when DIR holds no batches itself
    (the official tarball's folder, `cifar.batch_dir`), so `cifar10:DIR` and
    `cifar10:DIR/cifar-10-batches-py` are the same data spelt otherwise; their paths differ,
    and --data naming the one on checkpoints whose manifest names the other was warned about."""
    from layerfast.train import train
    from tests.data.test_data import make_cifar

    make_cifar(tmp_path / "c" / "cifar-10-batches-py")
    train("fcn3x256", f"cifar10:{tmp_path / 'c'}", 1, tmp_path / "ck", progress=False,
          device="cpu")
    capsys.readouterr()
    for i, data in enumerate([tmp_path / "c" / "cifar-10-batches-py", tmp_path / "c"]):
        assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(tmp_path / "ck"),
                     "--data", f"cifar10:{data}", "--reset", "reinit", "--checkpoints", "0",
                     "--out", str(tmp_path / f"o{i}"), "--quiet", "--device", "cpu"]) == 0
        assert _data_warnings(capsys.readouterr().err) == []

"""A `--arch module:factory` (or a factory from Python) that returns `torch.compile(model)`,
or compiles a submodule: units were named `_orig_mod.0`, the fx trace failed (normalization
layers paired by the fallback rule), and every checkpoint was refused (the loader drops
`_orig_mod.` from its keys, the model's keys kept it) with no hint. The model is now used
uncompiled: the wrapper adds nothing, layerfast runs its own forward passes."""

from __future__ import annotations

import torch
from torch import nn

from layerfast.analysis import analyze
from layerfast.models import build_model
from layerfast.train import train
from layerfast.units import _traced_feeders, make_units


class _Net(nn.Module):
    """The fallback rule (consecutive siblings, matching widths) pairs `bn` with `b`; the
    graph says `a` feeds it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.b = nn.Linear(64, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(torch.cat([self.bn(self.a(x)), self.b(x)], 1))


def plain(num_classes: int = 10) -> nn.Module:
    return _Net(num_classes)


def compiled(num_classes: int = 10) -> nn.Module:
    return torch.compile(_Net(num_classes))


def compiled_inside(num_classes: int = 10) -> nn.Module:
    net = _Net(num_classes)
    net.head = torch.compile(net.head)
    return net


def test_units_of_a_compiled_model_are_the_models_own():
    for factory in (compiled, compiled_inside):
        model, _ = build_model(factory, 10, (1, 8, 8))
        assert "_orig_mod" not in " ".join(model.state_dict())
        _traced_feeders(model)  # traces: no fallback pairing
        units = make_units(model)
        assert [(u.name, u.modules) for u in units] == [
            ("a", ("a", "bn")), ("b", ("b",)), ("head", ("head",))]


def test_checkpoints_of_the_plain_model_load_into_the_compiled_one(tmp_path):
    train(plain, "digits", 1, tmp_path / "run", max_samples=40, progress=False, device="cpu")
    res = analyze(compiled, tmp_path / "run", device="cpu", progress=False, figures=False,
                  reset=["reinit"])
    assert set(res.table["unit"]) >= {"a", "b", "head"}

"""Module names inside `--units` error messages are escaped as `--list-units` shows them
(review s22): a ModuleDict key holding a line break, a tab or an ANSI escape was printed raw
in the one-line `layerfast: error:` message (broken over two lines, or the terminal
recoloured), while the listing wrote `\\n`, `\\t`, `\\x1b`. Fails on the code before the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from layerfast.errors import LayerfastError
from layerfast.report.tables import printable
from layerfast.units import make_units


class _Same(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.ModuleDict({"a\nb": nn.Linear(2, 2), "r\x1b[31m": nn.ReLU()})
        self.p = nn.ModuleDict({"q\tq": nn.Linear(2, 2)})
        parametrize.register_parametrization(self.p["q\tq"], "weight", _Same())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p["q\tq"](self.d["r\x1b[31m"](self.d["a\nb"](x)))


@pytest.mark.parametrize("pattern, shown", [
    ("nomatch", ["d.a\\nb", "p.q\\tq"]),  # the examples of module names
    ("d.r*", ["d.r\\x1b[31m"]),  # modules that own no parameters
    ("p.q?q.parametrizations*", ["p.q\\tq"]),  # only a layer's parametrizations
])
def test_names_in_units_errors_are_escaped(pattern: str, shown: list[str]) -> None:
    with pytest.raises(LayerfastError) as exc:
        make_units(_Net(), patterns=[pattern])
    msg = str(exc.value)
    assert not any(c in msg for c in "\n\t\x1b"), repr(msg)
    for name in shown:
        assert name in msg, msg
    assert printable("d.a\nb") == "d.a\\nb"  # the same escaping as the listing

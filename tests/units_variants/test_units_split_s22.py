"""`--units` splitting with a bracket that nothing closes: a module named `a[` or `a(` (a
ModuleDict key; its glob matches it as written) held every later comma, so `--units 'd.a[,fc'`
was the one pattern `d.a[,fc`, which matched nothing; so did the `[` of `[[]`, the literal form
of `[` that the error message itself suggests. Brackets now pair as globs and regexes read
them, and an unclosed one is a plain character."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.units import literal_pattern, make_units, split_patterns


@pytest.mark.parametrize("text,parts", [
    ("d.a[,fc", ["d.a[", "fc"]),
    ("d.a(,fc", ["d.a(", "fc"]),
    ("d.a{,fc", ["d.a{", "fc"]),
    ("x[[],y", ["x[[]", "y"]),          # literal_pattern("x[")
    ("[(],x", ["[(]", "x"]),            # a class: its ( is a plain character
    ("a)b,c", ["a)b", "c"]),
])
def test_an_unclosed_bracket_no_longer_holds_later_commas(text, parts):
    assert split_patterns(text) == parts


@pytest.mark.parametrize("text,parts", [
    ("re:conv{1,2},fc", ["re:conv{1,2}", "fc"]),
    ("[a,b]*,c", ["[a,b]*", "c"]),
    ("re:(a,(b)),c", ["re:(a,(b))", "c"]),
    ("[]],a", ["[]]", "a"]),
    ("[!,],b", ["[!,]", "b"]),
    (" a , ,b ", ["a", "b"]),
])
def test_closed_brackets_still_keep_their_commas(text, parts):
    assert split_patterns(text) == parts


def test_a_long_run_of_unclosed_brackets_splits_in_linear_time():
    assert split_patterns("(" * 100_000 + ",x") == ["(" * 100_000, "x"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.ModuleDict({"a[": nn.Linear(4, 4), "b(": nn.Linear(4, 4)})
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.d["b("](self.d["a["](x)))


@pytest.mark.parametrize("text", ["d.a[,fc", f"{literal_pattern('d.a[')},fc", "d.b(,fc"])
def test_units_of_modules_named_with_an_open_bracket(text):
    units = make_units(_Net(), patterns=text)
    assert [u.name for u in units] == split_patterns(text)
    assert units[-1].modules == ("fc",)

"""`--data digits:` opens `digits`, but compared as typed against a manifest that names
`digits` it was "not the data ck/manifest.json names ('digits')", a warning in every run.json
of a run on exactly the training data. A name with an empty argument is the name."""

from __future__ import annotations

import pytest

from layerfast.data.spec import data_key, same_data


@pytest.mark.parametrize(("typed", "recorded"), [
    ("digits:", "digits"), ("DIGITS:", "digits"), ("digits", "digits:"),
    ("fashion-mnist:", "fashion-mnist")])
def test_an_empty_argument_is_the_same_data(typed: str, recorded: str) -> None:
    assert same_data(typed, recorded)
    assert data_key(typed) == data_key(recorded)


@pytest.mark.parametrize(("a", "b"), [("digits:", "fashion-mnist"), ("digits:x", "digits"),
                                      ("synthetic:cifar:5", "synthetic:cifar")])
def test_other_data_stays_other(a: str, b: str) -> None:
    assert not same_data(a, b)

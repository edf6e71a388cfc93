"""Session 22's second fresh-eyes review of its last commits (f5b4bd4..170ebde): one test per
defect they introduced, each failing on the code before its fix."""

from __future__ import annotations

import json

import pytest

from layerfast.data.beton import sidecar_path, warn_other_source
from layerfast.data.spec import data_key, same_data
from layerfast.data.synthetic import DEFAULT_N
from layerfast.errors import collect_warnings


@pytest.mark.parametrize("held, spec", [
    ("synthetic:cifar", f"synthetic:cifar:{DEFAULT_N}"),  # the default count written out
    ("synthetic:imagenet:1000", "synthetic:imagenet:01000"),  # int() reads both
    ("SYNTHETIC:cifar:500", "synthetic:cifar: 500"),
])
def test_one_synthetic_data_set_spelled_otherwise_is_no_other(held, spec, tmp_path) -> None:
    """1867492 / 476b3b0: `convert` onto a .beton of `synthetic:cifar` from
    `synthetic:cifar:10000` (its default count) warned that the .beton held another data set,
    and `analyze` compared a .beton's source with the manifest's spec by its text: the same
    synthetic data, spelled otherwise, read as other data. Its count is now written out."""
    to = tmp_path / "s.beton"
    to.write_bytes(b"\0")  # warn_other_source reads only the sidecar
    sidecar_path(to).write_text(json.dumps({"split": "test", "source": held}))
    with collect_warnings() as kept:
        warn_other_source(to, spec, "test")
    assert kept == []
    assert data_key(held) == data_key(spec)
    assert same_data(str(to), spec) and same_data(spec, str(to))  # a .beton beside a spec
    assert not same_data("synthetic:cifar", "synthetic:cifar:500")  # another count: other
    assert not same_data("synthetic:cifar", "synthetic:imagenet")

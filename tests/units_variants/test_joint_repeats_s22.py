"""A joint reset resets a set of units (review s22): a unit name given twice counts once.

`make_variants(joint=[["conv", "fc", "conv"]])` made a unit named `conv+fc+conv` (its keys
de-duplicated, its numbers those of `conv+fc`): a name no other request spells for the same
variant, and results that do not line up with the `conv+fc` rows. Fails before the fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.checkpoints import CheckpointDir
from layerfast.variants import make_variants
from tests.units_variants.test_variants import UNITS, write_run


@pytest.mark.parametrize("entry, taus", [
    (["conv", "fc", "conv"], [0, 1, 5]),
    (["fc", "conv", "fc", "fc"], [0, 1, 5]),
    ((["conv", "fc", "conv"], 1), [1]),
])
def test_repeated_names_in_a_joint_reset_count_once(entry, taus, tmp_path: Path) -> None:
    model = write_run(tmp_path)
    ck = CheckpointDir(tmp_path)
    got = [v for v in make_variants(model, UNITS, ck, reset=(), joint=[entry])
           if v.kind == "joint"]
    first = entry[0] if isinstance(entry, tuple) else entry
    want_name = "+".join(dict.fromkeys(first))  # first-seen order
    assert [v.unit for v in got] == [want_name] * len(taus)
    assert [v.checkpoint for v in got] == taus
    plain = [v for v in make_variants(model, UNITS, ck, reset=(),
                                      joint=[list(dict.fromkeys(first))]) if v.kind == "joint"]
    assert [v.keys for v in got] == [v.keys for v in plain if v.checkpoint in taus]

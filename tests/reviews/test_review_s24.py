"""Review of session 24's non-engine changes: the defects it found, each pinned here.

A `.npz` spec with whitespace around it (`--data "x.npz "`, which `open_data` strips and opens
as the .npz) was not recognised as a .npz by the class-count message (`build.classes_from`,
`_head_fix`): a count its `num_classes` array declared was said "declared by 'x.npz '", with
neither "(its num_classes)" nor the fix a .npz has ("or make the num_classes of ... 10").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.analysis.test_class_count_s24 import _message, _npz, _x
from tests.analysis.test_inmem_s19 import _own_tempdir  # noqa: F401 - autouse: inputs under tmp_path


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


@pytest.mark.parametrize("pad", [" {} ", "{}\t", "{}\n"])
def test_a_padded_npz_spec_is_still_said_as_a_npz(tmp_path: Path, pad: str) -> None:
    data = _npz(tmp_path / "d.npz", x=_x(), y=np.arange(40) % 10, num_classes=np.array(10))
    msg = _message(tmp_path, pad.format(data))
    assert "(its num_classes)" in msg and "or make the num_classes of" in msg, msg
    assert msg.rstrip(")").endswith(" 12"), msg

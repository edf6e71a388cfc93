"""`train(checkpoints=5)` is one epoch, as `train(checkpoints="5")` (the CLI's form, which the
docstring promises it takes) and `analyze(checkpoints=5)` read it; it was refused as "must be
a list of epochs"."""

from __future__ import annotations

import pytest

from layerfast.errors import LayerfastError
from layerfast.train import checkpoint_schedule


def test_an_int_is_one_epoch_as_its_string_is():
    assert checkpoint_schedule(10, 5) == checkpoint_schedule(10, "5") == [0, 5, 10]
    assert checkpoint_schedule(10, 0) == [0, 10]


@pytest.mark.parametrize("bad", [11, -1, True])
def test_an_int_outside_the_run_is_refused_as_in_a_list(bad):
    with pytest.raises(LayerfastError, match="checkpoint|checkpoints"):
        checkpoint_schedule(10, bad)

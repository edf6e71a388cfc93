"""Session 20 review of session 19's docs against the code: each test pins a statement of
README.md / docs/*.md / a public docstring that the code did not keep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import layerfast
from layerfast.data import open_data
from layerfast.errors import LayerfastError


def _fcn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.mark.parametrize("bad", [0, -1, True, False, 2.5, "8"])
@pytest.mark.parametrize("data", ["source", "iterable"])
def test_evaluator_refuses_a_batch_size_that_is_not_a_positive_integer(bad, data):
    """`Evaluator(batch_size=0)` ran silently at the default B (`batch_size or 1000`, then
    marked as fixed), and `batch_size=True` in batches of one sample; analyze refuses both
    (`--batch-size must be a positive integer`), as the Evaluator refuses a bad `max_fanout`
    or `memory_fraction` up front."""
    src = open_data("digits", max_samples=40)
    x, y = next(iter(src.batches(40)))
    batches = src if data == "source" else [(x.float(), y)]
    with pytest.raises(LayerfastError, match="batch_size must be a positive integer"):
        layerfast.Evaluator(_fcn(), [{}], device="cpu", batch_size=bad).run(batches)


@pytest.mark.parametrize("good", [None, 16, np.int64(16)])
def test_evaluator_batch_size_still_takes_none_and_integers(good):
    src = open_data("digits", max_samples=40)
    ev = layerfast.Evaluator(_fcn(), [{}], device="cpu", batch_size=good)
    res = ev.run(src)
    assert res.n == 40
    assert isinstance(ev.batch_size, int) and not isinstance(ev.batch_size, bool)


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf")])
def test_train_negative_lr_message_says_above_0(tmp_path, lr):
    """`layerfast train --help` says the lr is "above 0" and lr 0 is refused, but a negative
    or non-finite lr was told "lr must be a finite number >= 0", inviting the 0 refused next."""
    from layerfast.train import train

    with pytest.raises(LayerfastError, match=r"lr must be a finite number above 0"):
        train("fcn3x256", "digits", 1, tmp_path / "out", lr=lr, progress=False)
    assert not (tmp_path / "out").exists()

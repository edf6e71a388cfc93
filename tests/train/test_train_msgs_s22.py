"""A diverged run names its learning rate as the other train messages do (`{lr:g}`): `lower
lr=1e+10`, not `lower lr=10000000000.0`; the `--epochs` help says its cap."""

from __future__ import annotations

import pytest

from layerfast.cli import parser
from layerfast.errors import LayerfastError
from layerfast.train import MAX_EPOCHS, train


def test_the_divergence_message_prints_lr_compactly(tmp_path):
    with pytest.raises(LayerfastError, match="diverged") as err:
        train("fcn3x256", "digits", 1, tmp_path, max_samples=200, lr=1e10, progress=False)
    # session 24: the flag as the other train messages name it, `--lr` (was "lower lr=1e+10")
    assert str(err.value).endswith("lower --lr (this run's: 1e+10)"), str(err.value)


def test_the_epochs_help_says_the_cap(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--help"])
    assert f"at most {MAX_EPOCHS:,}" in " ".join(capsys.readouterr().out.split())

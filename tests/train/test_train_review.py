"""`layerfast train` as a researcher relies on it (review of 2026-12-07): what the earlier
reviews (test_train_audit, test_train_guards, test_train_s17) left uncovered."""

from __future__ import annotations

import pytest

from layerfast.errors import LayerfastError
from layerfast.train import train

_BN = '''
from torch import nn


def bn(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, num_classes))
'''


@pytest.fixture
def bn_model(tmp_path, monkeypatch):
    (tmp_path / "train_review_models.py").write_text(_BN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "train_review_models", raising=False)
    return "train_review_models:bn"


def test_one_training_sample_with_batchnorm_does_not_blame_the_batch_size(bn_model, tmp_path):
    """`--max-samples 1` gives BatchNorm a batch of one whatever `--batch-size` is: the message
    told the user to "use --batch-size 2 or more" while the batch size was already 128."""
    out = tmp_path / "run"
    with pytest.raises(LayerfastError, match="batch of 1") as exc:
        train(bn_model, "digits", 1, out, max_samples=1, progress=False)
    msg = str(exc.value)
    assert "--batch-size" not in msg and "--max-samples 2 or more" in msg, msg
    assert not out.exists()
    # batch_size 1 is still named when it is the cause
    with pytest.raises(LayerfastError, match="--batch-size 2 or more"):
        train(bn_model, "digits", 1, out, batch_size=1, max_samples=8, progress=False)

"""`train` with a model that has fewer outputs than the data's classes says where the class
count came from (`build.classes_from`, as analyze's shape messages do since c905c14): "the
data has 12 classes" sent a user with a bare .npz looking for a 12th class in the split they
train on, when the count is the largest label + 1 over every y array in the file."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from layerfast.errors import LayerfastError
from layerfast.train import train


def _five(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 5))


def _npz(path, **extra) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((64, 1, 8, 8)).astype("float32"),
             y_train=np.arange(64) % 7, x_test=rng.random((32, 1, 8, 8)).astype("float32"),
             y_test=np.arange(32) % 12, **extra)
    return str(path)


@pytest.mark.parametrize(("data", "where"), [
    ("digits", "10 classes, declared by 'digits':"),
    ("bare", "12 classes, the largest label of '{}' + 1 (over 'y_train', 'y_test'):"),
    ("declared", "13 classes, declared by '{}' (its num_classes):"),
])
def test_too_few_outputs_say_where_the_class_count_came_from(tmp_path, data, where) -> None:
    if data == "bare":
        data = _npz(tmp_path / "d.npz")
    elif data == "declared":
        data = _npz(tmp_path / "e.npz", num_classes=np.array(13))
    with pytest.raises(LayerfastError) as err:
        train(_five, data, 1, tmp_path / "out", progress=False)
    msg = str(err.value)
    shown = where.format(data.rsplit("/", 1)[-1])  # the source names its file
    assert "returns 5 logits per sample, but the data has " + shown in msg, msg
    assert not (tmp_path / "out").exists()

"""A head smaller (or larger) than the state dicts' is said with where the class count really
came from (session 24).

Defect: `analysis.build` said "the model was built for N classes, the largest label of <data>
(<split>) + 1" whenever the data gave the count, even where no label did: `data=(x, y, 9)`
passed 9, a .npz's `num_classes` array, digits / cifar10 (10, fixed), an imagefolder's class
folders and a converted .beton's sidecar declare it; and a bare .npz counts every y array it
holds (`y_test` and `y_train`), while the message named the split alone. Its advice ("labels
must be 0..classes-1 of the checkpoint's model") cannot fix a declared count. Now the data
says where its count came from (`DataSource.classes_from_labels`), and the message says
"declared by <data>", "passed as num_classes", or "the largest label of <data> + 1 (over
'y_test', 'y_train')", with the fix each has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import layerfast
from layerfast.data import convert, open_data
from layerfast.data.source import DataSource
from layerfast.errors import LayerfastError
from layerfast.models import build_model
from tests.analysis.test_inmem_s19 import _own_tempdir  # noqa: F401 - autouse: inputs under tmp_path
from tests.cli.test_cli import cli
from tests.data.test_data import _png_tree, make_cifar
from tests.data.test_data_ffcv import require_ffcv

ARGS = {"device": "cpu", "progress": False, "figures": False, "quiet": True}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


class Mean(nn.Module):
    """A head over the mean of the inputs: it runs on any data, so only the head can mismatch."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1).mean(1, keepdim=True))


def _states(k: int) -> dict[int, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {0: Mean(k).state_dict(), 1: Mean(k).state_dict()}


def _message(tmp_path: Path, data, k: int = 12) -> str:
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze(Mean, _states(k), data=data, out=tmp_path / "out", **ARGS)
    msg = str(info.value)
    assert "\n" not in msg and not (tmp_path / "out").exists()
    return msg


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _x(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).random((n, 64), dtype=np.float32)


def test_a_num_classes_passed_in_memory_is_said_as_passed(tmp_path: Path) -> None:
    x, y = torch.randn(40, 64), torch.arange(40) % 9
    msg = _message(tmp_path, (x, y, 9), k=10)
    assert "built for 9 classes, passed as num_classes, fewer than the 10" in msg, msg
    assert "largest label" not in msg and "(test)" not in msg
    assert "or pass data=(x, y, 10)" in msg and "labels must be" not in msg
    assert "layerfast-inputs" not in msg and "data.npz" not in msg
    # the fix it names works
    res = layerfast.analyze(Mean, _states(10), data=(x, y, 10), out=tmp_path / "b", **ARGS)
    assert res.run["num_classes"] == 10


def test_labels_in_memory_that_miss_a_class_name_the_third_element(tmp_path: Path) -> None:
    x, y = torch.randn(40, 64), torch.arange(40) % 9
    msg = _message(tmp_path, (x, y), k=10)
    assert "the largest label of data (x, y) + 1 (over 'y'), fewer than the 10" in msg, msg
    assert "or pass data=(x, y, num_classes) to declare the classes they miss" in msg


def test_a_npz_num_classes_array_is_said_as_declared(tmp_path: Path) -> None:
    data = _npz(tmp_path / "nc.npz", x=_x(), y=np.arange(40) % 10, num_classes=np.array(10))
    msg = _message(tmp_path, data)
    assert f"built for 10 classes, declared by {data!r} (its num_classes), fewer than" in msg, msg
    assert "largest label" not in msg and "labels must be" not in msg
    assert f"or make the num_classes of {data!r} 12" in msg


def test_a_bare_npz_names_every_y_array_it_counted(tmp_path: Path) -> None:
    """y_test's labels stop at 4, y_train's at 9: the 10 is y_train's, not the test split's."""
    data = _npz(tmp_path / "split.npz", x_test=_x(), y_test=np.arange(40) % 5,
                x_train=_x(), y_train=np.arange(40) % 10)
    msg = _message(tmp_path, data)
    assert (f"built for 10 classes, the largest label of {data!r} + 1 (over 'y_test', "
            "'y_train'), fewer than the 12") in msg, msg
    assert "(test)" not in msg
    assert f"or a num_classes array in {data!r} must declare the classes they miss" in msg
    assert open_data(data).classes_from_labels == ("y_test", "y_train")
    assert open_data(_npz(tmp_path / "one.npz", x=_x(), y=np.arange(40) % 3)).classes_from_labels \
        == ("y",)


def test_labels_past_the_checkpoints_classes_are_still_blamed_on_the_labels(tmp_path) -> None:
    """Counted from labels and more than the state dicts' (1-based labels): the labels' fix."""
    data = _npz(tmp_path / "over.npz", x=_x(), y=np.arange(40) % 10)
    msg = _message(tmp_path, data, k=5)
    assert f"built for 10 classes, the largest label of {data!r} + 1 (over 'y'); labels" in msg
    assert "labels must be 0..classes-1 of the checkpoint's model)" in msg, msg


@pytest.mark.parametrize("make", ["digits", "cifar10"])
def test_a_fixed_data_set_is_said_as_declared(tmp_path: Path, make: str) -> None:
    data = "digits" if make == "digits" else f"cifar10:{tmp_path / 'c'}"
    if make == "cifar10":
        make_cifar(tmp_path / "c")
    msg = _message(tmp_path, data)
    assert f"built for 10 classes, declared by {data!r}, fewer than the 12" in msg, msg
    assert "largest label" not in msg and "labels must be" not in msg
    assert "evaluate on the data it was trained on" in msg
    assert open_data(data).classes_from_labels == ()


def test_an_imagefolder_is_said_as_declared(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _png_tree(tmp_path / "imgs", {"val/cat": [(9, 8)], "val/dog": [(8, 9)]})
    data = f"imagefolder:{tmp_path / 'imgs'}"
    msg = _message(tmp_path, data, k=3)
    assert f"built for 2 classes, declared by {data!r}, fewer than the 3" in msg, msg
    assert "largest label" not in msg


@pytest.mark.ffcv
def test_a_beton_says_its_sidecar_or_its_labels(tmp_path: Path) -> None:
    require_ffcv()
    beton = str(convert("digits", tmp_path / "d.beton"))
    msg = _message(tmp_path, beton)
    assert f"built for 10 classes, declared by {beton!r}, fewer than the 12" in msg, msg
    assert "largest label" not in msg
    Path(beton + ".json").unlink()  # a .beton written elsewhere: no sidecar, the labels count
    assert open_data(beton).classes_from_labels == ("label",)
    msg = _message(tmp_path, beton)
    assert f"the largest label of {beton!r} + 1 (over 'label'), fewer than the 12" in msg, msg


def test_from_arrays_says_whether_it_counted() -> None:
    x, y = torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 1])
    assert DataSource.from_arrays("a", x, y).classes_from_labels == ("y",)
    assert DataSource.from_arrays("a", x, y, num_classes=5).classes_from_labels == ()


def _fcn_ckpts(tmp_path: Path, k: int) -> Path:
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.manual_seed(0)
    for tau in (0, 1):
        torch.save(build_model("fcn3x256", k, (1, 8, 8))[0].state_dict(), ck / f"epoch_{tau}.pt")
    return ck


def test_the_command_line_says_where_the_count_came_from(tmp_path: Path, capsys) -> None:
    ck = _fcn_ckpts(tmp_path, 12)
    split = _npz(tmp_path / "split.npz", x_test=_x(), y_test=np.arange(40) % 5,
                 x_train=_x(), y_train=np.arange(40) % 10)
    for data, said in (("digits", "declared by 'digits', fewer than the 12"),
                       (split, f"the largest label of {split!r} + 1 (over 'y_test', 'y_train')")):
        out = tmp_path / "out"
        rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ck, "--data", data,
                          "--out", out, "--quiet"], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("layerfast: error:") and said in lines[0], err
        assert "(test)" not in err and not out.exists()

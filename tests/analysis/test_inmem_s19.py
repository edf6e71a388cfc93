"""In-memory inputs for `layerfast.analyze` (`layerfast.inputs`): state dicts by τ, an (x, y)
pair and a model class, exactly as the same objects saved as files; reruns resume."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import layerfast
from layerfast.data import open_data
from layerfast.errors import LayerfastError

ARGS = {"device": "cpu", "batch_size": 64, "progress": False, "figures": False,
        "checkpoint_every": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


@pytest.fixture(autouse=True)
def _own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The materialised inputs go under this test's tmp dir, not the machine's /tmp."""
    tmp = tmp_path / "systemp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture(scope="module")
def sds(ckpts: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The session's fcn3x256 checkpoints, loaded: {τ: state_dict}."""
    return {int(p.stem.split("_")[-1]): torch.load(p, weights_only=True)
            for p in sorted(ckpts.glob("epoch_*.pt"))}


@pytest.fixture(scope="module")
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    """digits' test arrays as they are stored (uint8 [N,1,8,8], int64 [N])."""
    src = open_data("digits")
    return src.reader.x.clone(), src.reader.y.clone()


def test_in_memory_equals_the_same_objects_saved_as_files(ckpts: Path, sds: dict, xy: tuple,
                                                         tmp_path: Path) -> None:
    x, y = xy
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    files = layerfast.analyze("fcn3x256", ckpts, data=tmp_path / "d.npz", out=tmp_path / "a",
                              **ARGS)
    mem = layerfast.analyze("fcn3x256", sds, data=(x, y), out=tmp_path / "b", **ARGS)
    pd.testing.assert_frame_equal(files.table, mem.table, check_exact=True)
    pd.testing.assert_frame_equal(files.distances, mem.distances, check_exact=True)
    assert len(mem.distances) > 0
    # run.json says where they came from; the existing keys keep their types (paths)
    inputs = mem.run["inputs"]
    assert inputs["ckpts"].startswith("in-memory: 4 state dicts (τ 0, 1, 2, 3), sha256 ")
    assert inputs["data"].startswith("in-memory: x uint8 [360, 1, 8, 8], y int64 [360], ")
    root = Path(tempfile.gettempdir())
    assert Path(mem.run["ckpts"]).parent == root / f"layerfast-inputs-{os.getuid()}"
    assert Path(mem.run["data"]).name == "data.npz" and Path(mem.run["data"]).is_file()
    assert mem.run["checkpoints"] == {str(t): f"epoch_{t}.pt" for t in (0, 1, 2, 3)}
    assert "inputs" not in files.run
    # numpy arrays are the same data as tensors: the same file
    again = layerfast.analyze("fcn3x256", sds, data=(x.numpy(), y.numpy()), out=tmp_path / "c",
                              **ARGS)
    assert again.run["data"] == mem.run["data"]
    pd.testing.assert_frame_equal(again.table, mem.table, check_exact=True)


def test_a_rerun_with_the_same_objects_resumes(sds: dict, xy: tuple, tmp_path: Path) -> None:
    first = layerfast.analyze("fcn3x256", sds, data=xy, out=tmp_path / "o", **ARGS)
    assert first.run["engine"]["evaluated"] > 0
    mtimes = {p: p.stat().st_mtime_ns for p in Path(first.run["ckpts"]).iterdir()}
    copies = {t: {k: v.clone() for k, v in sd.items()} for t, sd in sds.items()}  # equal, not same
    second = layerfast.analyze("fcn3x256", copies, data=(xy[0].clone(), xy[1].clone()),
                               out=tmp_path / "o", **ARGS)
    assert second.run["engine"]["evaluated"] == 0
    assert second.run["ckpts"] == first.run["ckpts"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # reused, not rewritten
    pd.testing.assert_frame_equal(first.table, second.table, check_exact=True)


def test_changed_content_is_another_run(sds: dict, xy: tuple, tmp_path: Path) -> None:
    """As for files: a different checkpoint directory in the same out is refused unless fresh."""
    first = layerfast.analyze("fcn3x256", sds, data=xy, out=tmp_path / "o", **ARGS)
    changed = dict(sds)
    changed[3] = {k: v.clone() for k, v in sds[3].items()}
    changed[3]["fc1.weight"][0, 0] += 1.0
    with pytest.raises(LayerfastError, match="different arguments"):
        layerfast.analyze("fcn3x256", changed, data=xy, out=tmp_path / "o", **ARGS)
    x = xy[0].clone()
    x[0, 0, 0, 0] += 1
    with pytest.raises(LayerfastError, match="different arguments"):
        layerfast.analyze("fcn3x256", sds, data=(x, xy[1]), out=tmp_path / "o", **ARGS)
    fresh = layerfast.analyze("fcn3x256", changed, data=xy, out=tmp_path / "o", fresh=True,
                              **ARGS)
    assert fresh.run["engine"]["evaluated"] > 0 and fresh.run["ckpts"] != first.run["ckpts"]


def _bad_inputs(sds: dict, xy: tuple) -> list[tuple[object, object, object, str]]:
    x, y = xy
    sd = sds[3]
    return [
        ("fcn3x256", {0: sds[0], -1: sd}, xy, r"labels τ must be >= 0"),
        ("fcn3x256", {"3": sd}, xy, r"labels τ must be integers.*str '3'"),
        ("fcn3x256", {True: sd}, xy, r"labels τ must be integers"),
        ("fcn3x256", {}, xy, r"ckpts is an empty mapping"),
        ("fcn3x256", {3: [sd]}, xy, r"ckpts\[3\] is a list, not a state dict"),
        ("fcn3x256", {3: {**sd, "step": 7}}, xy, r"ckpts\[3\]: 'step' \(int\) is not a tensor"),
        ("fcn3x256", {3: nn.Linear(2, 2)}, xy, r"ckpts\[3\] is an nn.Module: pass its state_dict"),
        ("fcn3x256", {3: {"state_dict": [1]}}, xy, r"ckpts\[3\]: no state dict found: it holds"),
        ("fcn3x256", sds, (x, y[:-1]), r"'x' has shape \(360, 1, 8, 8\) but 'y' has shape"),
        ("fcn3x256", sds, (x, y.float()), r"labels must be integers, got dtype float32"),
        ("fcn3x256", sds, (x[:0], y[:0]), r"is empty \(0 samples\)"),
        ("fcn3x256", sds, (x,), r"a pair \(x, y\), or \(x, y, num_classes\); got a tuple of 1"),
        ("fcn3x256", sds, (x, y, 0), r"num_classes, the third of \(x, y, num_classes\), must be"),
        ("fcn3x256", sds, (x, y, 5), r"label 9 is out of range for 5 classes"),
        ("fcn3x256", sds, (x.bfloat16(), y), r"x is bfloat16 tensor; give x as float32"),
        ("fcn3x256", sds, (x, y.tolist()), r"y is a list"),
        ("fcn3x256", sds, (x.float() * np.nan, y), r"NaN or Inf values"),
        ("fcn3x256", sds, None, r"data is required with in-memory checkpoints"),
        (nn.Linear(64, 10), sds, xy, r"arch is an nn.Module instance \(Linear\)"),
    ]


def test_bad_in_memory_inputs_are_one_clear_error_and_leave_nothing(sds: dict, xy: tuple,
                                                                    tmp_path: Path) -> None:
    for i, (arch, ck, data, msg) in enumerate(_bad_inputs(sds, xy)):
        out = tmp_path / f"out{i}"
        with pytest.raises(LayerfastError, match=msg):
            layerfast.analyze(arch, ck, data=data, out=out, **ARGS)
        assert not out.exists(), msg
        if not isinstance(arch, nn.Module):  # the inputs' checks come before any write
            root = Path(tempfile.gettempdir()) / f"layerfast-inputs-{os.getuid()}"
            assert not root.exists() or not any(root.iterdir()), msg


def test_the_inputs_folder_is_this_users_alone(sds: dict, xy: tuple, tmp_path: Path) -> None:
    res = layerfast.analyze("fcn3x256", sds, data=xy, out=tmp_path / "o", **ARGS)
    root = Path(res.run["ckpts"]).parent
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and root.stat().st_uid == os.getuid()
    assert not [p for p in Path(res.run["ckpts"]).iterdir() if p.name.startswith(".")]


class Tied(nn.Module):
    """A square net whose two layers share one weight: safetensors cannot save its state dict."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x.flatten(1))))))


def test_a_class_as_arch_with_tied_weights(xy: tuple, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sd0 = Tied().state_dict()
    sd1 = Tied().state_dict()
    assert sd1["a.weight"].data_ptr() == sd1["b.weight"].data_ptr()
    x, y = xy[0].float() / 16, xy[1]
    res = layerfast.analyze(Tied, {0: sd0, 1: sd1}, data=(x, y), out=tmp_path / "o", **ARGS)
    assert res.run["arch"] == f"{__name__}:Tied"
    assert {u.name for u in res.units} >= {"head"}
    # the class and its `module:factory` string are one model: the same run resumes
    again = layerfast.analyze(f"{__name__}:Tied", {0: sd0, 1: sd1}, data=(x, y),
                              out=tmp_path / "o", **ARGS)
    assert again.run["engine"]["evaluated"] == 0


def test_num_classes_for_labels_that_miss_a_class(sds: dict, xy: tuple, tmp_path: Path) -> None:
    """As a .npz's `num_classes`: test labels 0..8 of a 10-class model built a 9-class head,
    which no in-memory state dict could fit."""
    x, y = xy
    keep = y < 9
    with pytest.raises(LayerfastError, match="built for 9 classes"):
        layerfast.analyze("fcn3x256", sds, data=(x[keep], y[keep]), out=tmp_path / "a", **ARGS)
    res = layerfast.analyze("fcn3x256", sds, data=(x[keep], y[keep], 10), out=tmp_path / "b",
                            **ARGS)
    assert res.run["num_classes"] == 10 and res.run["n"] == int(keep.sum())
    assert ", num_classes 10, sha256 " in res.run["inputs"]["data"]


def test_list_units_takes_the_same_in_memory_inputs(sds: dict, xy: tuple) -> None:
    from layerfast.analysis import list_units

    names = [u.name for u in list_units(Tied, data=(xy[0].float(), xy[1]))]
    assert names == [u.name for u in list_units(f"{__name__}:Tied", data="digits")]
    with pytest.raises(LayerfastError, match="data is required with in-memory checkpoints"):
        list_units("fcn3x256", ckpts=sds)  # was TypeError from pathlib
    root = Path(tempfile.gettempdir()) / f"layerfast-inputs-{os.getuid()}"
    assert not root.exists()  # a dry run writes nothing


def test_an_interrupted_in_memory_run_resumes_where_it_stopped(sds: dict, xy: tuple,
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A notebook's Ctrl-C mid-pass, then the same cell again: it continues from the last save
    and ends with the uninterrupted run's results."""
    from layerfast.store import ResumeStore

    whole = layerfast.analyze("fcn3x256", sds, data=xy, out=tmp_path / "whole", **ARGS)
    real = ResumeStore.save

    def save(self: ResumeStore, counts: torch.Tensor, n_done: int) -> None:
        real(self, counts, n_done)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ResumeStore, "save", save)
        with pytest.raises(KeyboardInterrupt):
            layerfast.analyze("fcn3x256", sds, data=xy, out=tmp_path / "o", **ARGS)
    res = layerfast.analyze("fcn3x256", sds, data=xy, out=tmp_path / "o", **ARGS)
    assert res.run["engine"]["resumed_from"] == 64
    assert res.run["engine"]["evaluated"] == 360 - 64
    pd.testing.assert_frame_equal(res.table, whole.table, check_exact=True)

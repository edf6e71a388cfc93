"""Review of the session's non-engine changes: in-memory inputs (`layerfast.inputs`) given
odd arrays and tensors, and two processes materialising the same content at once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast import inputs
from layerfast.analysis import list_units
from layerfast.checkpoints.save import save_atomic
from layerfast.data import open_data
from layerfast.errors import LayerfastError
from tests.analysis.test_inmem_s19 import _own_tempdir  # noqa: F401  (autouse: inputs under tmp_path)


@pytest.fixture(scope="module")
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    """digits' test arrays as they are stored (uint8 [N,1,8,8], int64 [N])."""
    src = open_data("digits")
    return src.reader.x.clone(), src.reader.y.clone()


@pytest.mark.parametrize("view", ["samples", "width"])
def test_a_float32_numpy_view_with_negative_strides_is_data(xy: tuple, view: str) -> None:
    # x[::-1] (reversed samples) or a flipped image axis is an ordinary numpy view; as float32
    # it reached torch.from_numpy, which refuses negative strides: a ValueError traceback
    x, y = xy
    xf = x.numpy().astype(np.float32) / 255
    flipped = xf[::-1] if view == "samples" else xf[..., ::-1]
    labels = y.numpy()[::-1] if view == "samples" else y.numpy()
    units = list_units("fcn3x256", data=(flipped, labels))
    assert [u.name for u in units] == [u.name for u in list_units("fcn3x256", data=(xf, y))]
    # and the same content as a contiguous copy is the same materialised file
    path, _ = inputs._write_data(*inputs._checked_data((flipped, labels), "test"))
    again, _ = inputs._write_data(*inputs._checked_data(
        (np.ascontiguousarray(flipped), np.ascontiguousarray(labels)), "test"))
    assert path == again


@pytest.mark.parametrize("which", ["x", "y"])
def test_a_tensor_dtype_numpy_lacks_is_one_clear_error(xy: tuple, which: str) -> None:
    # float8 has no numpy dtype: `.numpy()` raised TypeError "Got unsupported ScalarType"
    # (bfloat16 was caught, its float8 siblings were not)
    dt = getattr(torch, "float8_e4m3fn", None)
    if dt is None:
        pytest.skip("this torch has no float8")
    x, y = xy
    data = (x.float().to(dt), y) if which == "x" else (x, y.float().to(dt))
    with pytest.raises(LayerfastError, match=f"data: {which} is float8_e4m3fn"):
        list_units("fcn3x256", data=data)


def test_a_file_another_process_wrote_meanwhile_is_not_rewritten(tmp_path: Path) -> None:
    # Two processes materialising the same content at once both see no file, both write it:
    # the second os.replace rewrote the first's file (new inode and mtime), so a run that had
    # fingerprinted it was refused as "changed checkpoints" when resumed, against the
    # documented "reused, never rewritten".
    folder = tmp_path / "digest"
    folder.mkdir()
    path = folder / "epoch_0.pt"
    sd = {"w": torch.arange(4.0)}
    first: list[os.stat_result] = []

    def slow_write(p: Path) -> None:  # the other process finishes while this one writes
        inputs._write_new(path, lambda q: save_atomic(sd, q))
        first.append(path.stat())
        os.utime(path, ns=(first[0].st_atime_ns, first[0].st_mtime_ns - 10**9))
        first[0] = path.stat()
        save_atomic(sd, p)

    inputs._write_new(path, slow_write)
    st = path.stat()
    assert (st.st_ino, st.st_mtime_ns) == (first[0].st_ino, first[0].st_mtime_ns)
    assert torch.equal(torch.load(path, weights_only=True)["w"], sd["w"])
    assert [p.name for p in folder.iterdir()] == ["epoch_0.pt"]  # no temporary left


def test_an_image_in_a_hidden_folder_is_in_the_data_fingerprint(tmp_path: Path) -> None:
    # imagefolder reads images below hidden folders (torchvision does: `cat/.thumbs/t.png` is
    # a sample), but the resume fingerprint left every file under a hidden folder out, so a
    # killed run resumed over such an image rewritten meanwhile
    from PIL import Image

    from layerfast.analysis import _data_ids
    from layerfast.data.imagefolder import find_samples

    root = tmp_path / "images"
    for rel in ("cat/a.png", "cat/.thumbs/t.png", "dog/b.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / rel)
    assert root / "cat/.thumbs/t.png" in find_samples(root, "test")[0]
    before = _data_ids(f"imagefolder:{root}")
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(root / "cat/.thumbs/t.png")
    os.utime(root / "cat/.thumbs/t.png", ns=(0, 10**9))
    assert _data_ids(f"imagefolder:{root}") != before
    # what no reader reads still does not count: a hidden file, a non-image in a hidden folder
    now = _data_ids(f"imagefolder:{root}")
    (root / "cat/._a.png").write_bytes(b"appledouble")
    (root / "cat/.thumbs/index.db").write_bytes(b"x")
    assert _data_ids(f"imagefolder:{root}") == now


@pytest.mark.parametrize("other", ["wandb_20240101.tmp", "events.out.tfevents.1700000000.tmp",
                                   "notes_2024.part"])
def test_a_tmp_file_that_is_no_checkpoint_copy_is_left_alone(tmp_path: Path, other: str) -> None:
    # The unfinished-copy rule refused any .tmp/.part labelled later than the last checkpoint,
    # so a logger's temporary beside epoch_0.pt, epoch_1.pt (accepted before) refused the
    # directory as "an unfinished copy of a checkpoint"
    from layerfast.checkpoints.discover import _from_names

    for n in ("epoch_0.pt", "epoch_1.pt", other):
        (tmp_path / n).write_bytes(b"x")
    assert sorted(_from_names(tmp_path)) == [0, 1]
    (tmp_path / "epoch_2.pt.tmp").write_bytes(b"x")  # a checkpoint's copy still is refused
    with pytest.raises(LayerfastError, match=r"epoch_2\.pt\.tmp looks like an unfinished copy"):
        _from_names(tmp_path)

"""Review of the s18 changes: defects the day's commits introduced or left in the cases they
name (a notebook's progress widget, a truncated safetensors file, a symlink to a class
folder's parent)."""

from __future__ import annotations

import importlib
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from layerfast.errors import LayerfastError


def test_progress_bar_leaves_a_real_notebook_widget_its_refresh(monkeypatch) -> None:
    """In Jupyter, tqdm.auto's class is `class tqdm(notebook_tqdm, asyncio_tqdm)` defined in
    tqdm.auto itself, so its `__module__` is 'tqdm.auto', never 'tqdm.notebook': the widget
    was slowed to one redraw per 30 s (errors.progress_bar). Built here by tqdm's own code."""
    import inspect

    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    from layerfast import errors

    class Widget(tqdm.std.tqdm):  # tqdm.notebook's class needs ipywidgets
        pass

    Widget.__module__ = "tqdm.notebook"

    class Stderr:
        def write(self, s: str) -> int:
            return len(s)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False  # a kernel's stderr is no terminal

    monkeypatch.setattr(sys, "stderr", Stderr())
    monkeypatch.setattr(tqdm.autonotebook, "tqdm", Widget)
    try:
        importlib.reload(tqdm.auto)  # as imported in a notebook: subclasses the widget
        assert tqdm.auto.tqdm.__module__ == "tqdm.auto"
        default = inspect.signature(tqdm.std.tqdm.__init__).parameters["mininterval"].default
        bar = errors.progress_bar(auto=True, total=10)
        assert isinstance(bar, Widget)
        assert bar.mininterval == default
    finally:
        monkeypatch.undo()
        importlib.reload(tqdm.auto)


def _safetensors_bytes(header_len: int) -> bytes:
    """A valid safetensors file whose JSON header is exactly `header_len` bytes."""
    t = torch.arange(16, dtype=torch.float32)
    hdr: dict = {"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
                 "__metadata__": {"p": ""}}
    hdr["__metadata__"]["p"] = "x" * (header_len - len(json.dumps(hdr).encode()))
    raw = json.dumps(hdr).encode()
    assert len(raw) == header_len
    return struct.pack("<Q", len(raw)) + raw + t.numpy().tobytes()


def test_a_truncated_safetensors_file_is_not_called_a_torch_pickle(tmp_path: Path) -> None:
    """A safetensors file starts with its header's length: one of 640 bytes (0x280) starts
    with b'\\x80\\x02', a pickle's PROTO 2. Truncated, it was called 'a torch.save file (a
    legacy torch pickle)' with the advice to rename it to .pt, where it is truncated."""
    from layerfast.checkpoints.safeload import open_file

    data = _safetensors_bytes(640)
    assert data[:2] == b"\x80\x02"
    path = tmp_path / "epoch_0.safetensors"
    path.write_bytes(data[:-8])
    with pytest.raises(LayerfastError, match="truncated or corrupt") as info:
        open_file(path)
    assert "torch.save" not in str(info.value)
    # a torch.save file under the suffix is still named as one
    torch.save({"w": torch.zeros(2)}, tmp_path / "epoch_1.safetensors")
    with pytest.raises(LayerfastError, match="rename it to .pt"):
        open_file(tmp_path / "epoch_1.safetensors")


def test_imagefolder_link_to_the_class_folders_parent_adds_no_sample(tmp_path: Path) -> None:
    """`cat/loop -> ..`, the example of `_list_images`'s docstring: the link leads to the
    split's root, an ancestor of cat/ but not of the walk's start, so it was followed and
    dog's images were read a second time, labelled cat (every sample exactly once,
    DESIGN.md §4)."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from layerfast.data.imagefolder import find_samples

    root = tmp_path / "data"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / c / "0.png")
    (root / "cat" / "loop").symlink_to("..")
    (root / "dog" / "up").symlink_to("../..")  # an ancestor too, further up
    files, labels, classes = find_samples(root, "test")
    assert classes == ["cat", "dog"]
    assert [f.relative_to(root).as_posix() for f in files] == ["cat/0.png", "dog/0.png"]
    assert labels == [0, 1]

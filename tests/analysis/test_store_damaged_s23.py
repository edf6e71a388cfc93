"""A damaged resume store is refused without leaving files beside it (review s23)."""

from __future__ import annotations

import pytest
import torch

from layerfast.errors import LayerfastError
from layerfast.store import FILENAME, ResumeStore

FP = {"arch": "fcn3x256", "data": "digits"}


def test_a_truncated_store_is_refused_and_its_connection_closed(tmp_path) -> None:
    """A progress.sqlite cut to 100 bytes is refused ("database disk image is malformed"),
    but the connection `_open` had made stayed open for as long as the error lived (its
    traceback holds the frame): progress.sqlite-wal and -shm sat beside the store, in an out
    dir the run was refused, until the process ended (an API caller's, a notebook's error,
    kept as its last traceback, kept them for good). Now the connection is closed first."""
    out = tmp_path / "out"
    out.mkdir()
    store = ResumeStore(out, FP, num_variants=3, created=True)
    store.save(torch.zeros(3, 4, dtype=torch.float64), 5)
    store.close()
    path = out / FILENAME
    path.write_bytes(path.read_bytes()[:100])
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(LayerfastError, match="cannot use the resume store") as info:
        ResumeStore(out, FP, num_variants=3)
    assert info.value is not None  # the error, and its traceback, still alive here
    assert sorted(p.name for p in out.iterdir()) == before

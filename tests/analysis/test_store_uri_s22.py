"""An unfinished run is found again (`store.find_unfinished`, the default out dir's resume)
whatever characters the path holds: the store was opened as the URI `file:{path}?mode=ro`,
so a `?` or `#` in the path cut it short and a `%xx` was decoded, the open failed, and the
rerun started over in a new directory instead of resuming."""

from __future__ import annotations

import pytest
import torch

from layerfast.store import ResumeStore, find_unfinished

FP = {"arch": "fcn3x256", "data": "digits"}


@pytest.mark.parametrize("name", ["runs?v=2", "lr#3", "100%25done", "a%b", "plain"])
@pytest.mark.parametrize("wal", [False, True])
def test_an_unfinished_run_is_found_in_a_path_with_uri_characters(tmp_path, name, wal):
    parent = tmp_path / name
    out = parent / "fcn3x256-20261207-120000"
    out.mkdir(parents=True)
    store = ResumeStore(out, FP, num_variants=3, created=True)
    try:
        store.save(torch.zeros(3, 4, dtype=torch.float64), 5)
        if not wal:  # no -wal file: the read-only, immutable open
            store.close_db()
        assert find_unfinished(parent, "fcn3x256-", FP) == out
        assert find_unfinished(parent, "fcn3x256-", {**FP, "data": "other"}) is None
    finally:
        store.close()

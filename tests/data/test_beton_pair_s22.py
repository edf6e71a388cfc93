"""A .beton and its sidecar are one pair (session 22).

`convert` moves the new sidecar into place just before the new .beton. Killed between the two
(or the second move failing) over a target that held other data of the same n and byte size,
the old .beton stood beside the new sidecar, which the reader accepted (it checked n and size
only): the new data's mean/std and class count were applied to the old pixels, exit 0. The
sidecar now records a content fingerprint of its .beton, checked on read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import layerfast.data.beton as beton
from layerfast.data import convert, open_data
from layerfast.data.beton import sidecar_path
from layerfast.errors import LayerfastError
from tests.data.test_data_ffcv import require_ffcv


@pytest.fixture(autouse=True)
def _need_ffcv() -> None:
    require_ffcv()


def two_sources(tmp_path: Path) -> tuple[str, str]:
    """Two npz datasets of the same n, shape and dtype (so the same .beton size), other pixels
    and another class count (4, then 10: a sidecar's num_classes overrides the labels')."""
    specs = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, (300, 1, 8, 8), dtype=np.uint8)
        path = tmp_path / f"s{seed}.npz"
        np.savez(path, x=x, y=np.arange(300) % 4, num_classes=np.int64(4 + 6 * seed))
        specs.append(str(path))
    return specs[0], specs[1]


def replace_failing_on(target: Path, exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.replace

    def fake(src: str, dst: str | os.PathLike[str]) -> None:
        if Path(dst) == target:
            raise exc
        real(src, dst)

    monkeypatch.setattr(beton.os, "replace", fake)


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), PermissionError(13, "Permission denied")])
def test_a_convert_stopped_between_the_two_moves_leaves_no_valid_stale_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: BaseException
) -> None:
    """Ctrl-C (as a kill would) or a failing move between the sidecar's move and the .beton's:
    the old .beton must not read with the new sidecar (before, Ctrl-C gave the new class count
    to the old pixels; the failing move removed the new sidecar, and the old .beton, without
    its own, read as a foreign one: class count from its labels, no mean/std)."""
    a, b = two_sources(tmp_path)
    to = convert(a, tmp_path / "d.beton")
    old = to.read_bytes()
    assert open_data(str(to)).num_classes == 4
    replace_failing_on(to, stop, monkeypatch)
    with pytest.raises((KeyboardInterrupt, LayerfastError)):
        convert(b, to)
    monkeypatch.undo()
    assert to.read_bytes() == old  # the old data, with the same n and size as the new
    assert json.loads(sidecar_path(to).read_text())["bytes"] == len(old)
    with pytest.raises(LayerfastError, match="describes a different file"):
        open_data(str(to))
    convert(b, to)  # re-running convert mends it
    assert open_data(str(to)).num_classes == 10


def test_a_sidecar_without_a_fingerprint_still_reads(tmp_path: Path) -> None:
    """Sidecars written before the fingerprint are checked by n and size, as before."""
    a, _ = two_sources(tmp_path)
    to = convert(a, tmp_path / "d.beton")
    meta = json.loads(sidecar_path(to).read_text())
    assert meta["fingerprint"].startswith("blake2b-v1:")
    del meta["fingerprint"]
    sidecar_path(to).write_text(json.dumps(meta))
    assert open_data(str(to)).num_classes == 4


def test_a_changed_block_or_a_bad_fingerprint_is_refused(tmp_path: Path) -> None:
    a, _ = two_sources(tmp_path)
    to = convert(a, tmp_path / "d.beton")
    side = sidecar_path(to)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "fingerprint": 7}))
    with pytest.raises(LayerfastError, match="fingerprint must be a string, got 7"):
        open_data(str(to))
    side.write_text(json.dumps({**meta, "fingerprint": meta["fingerprint"][:-1] + "x"}))
    with pytest.raises(LayerfastError, match="describes a different file"):
        open_data(str(to))


def test_a_large_file_is_sampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the whole-file limit (64 MiB; 1 MiB here) blocks are sampled, the first and the
    last byte included, so an ImageNet-sized .beton opens about as fast as before; a change
    in a sampled block shows, one between blocks does not."""
    monkeypatch.setattr(beton, "_FINGERPRINT_WHOLE", 1 << 20)
    monkeypatch.setattr(beton, "_FINGERPRINT_BLOCKS", 4)
    path = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8))
    path.write_bytes(data)
    first = beton.beton_fingerprint(path)
    second_block = (len(data) - (1 << 16)) // 3
    for at, seen in ((0, True), (len(data) - 1, True), (second_block + 100, True),
                     (second_block - 100, False)):  # fmt: skip
        data[at] ^= 1
        path.write_bytes(data)
        assert (beton.beton_fingerprint(path) != first) is seen, at
        data[at] ^= 1
    path.write_bytes(data)
    assert beton.beton_fingerprint(path) == first

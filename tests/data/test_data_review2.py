"""Second adversarial review of the data layer and `convert` (docs/data.md).

Each test pins one defect found by the review: bad input that escaped as a traceback instead of
one LayerfastError, a failed conversion that hung the process at exit, and an interrupted
conversion that reported success over a .beton without image data. FFCV tests follow
tests/data/test_data_ffcv.py: skipped only when FFCV does not import and `CI` is unset.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.data import convert, open_data
from layerfast.errors import LayerfastError
from tests.data.test_data_ffcv import require_ffcv


@pytest.fixture
def need_ffcv() -> None:
    """FFCV's tests here, skipped (or, in CI, failed) as test_data_ffcv's are."""
    require_ffcv()


def _png_with_bad_idat_length(path: Path) -> None:
    """A PNG whose IDAT chunk length is too small (a truncated-and-patched download): PIL then
    reads the next chunk header from inside the compressed data and raises SyntaxError,
    which is not an OSError."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    assert data[37:41] == b"IDAT"  # 8-byte signature + 25-byte IHDR chunk, then IDAT
    data[33:37] = struct.pack(">I", 10)
    path.write_bytes(bytes(data))


def test_imagefolder_broken_png_is_one_clear_error(tmp_path: Path) -> None:
    """A corrupt PNG is bad input like any other corrupt image: one LayerfastError naming the
    file (exit 2), not a SyntaxError traceback from inside PIL (exit 1)."""
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "0.png")
    _png_with_bad_idat_length(tmp_path / "b" / "0.png")
    src = open_data(f"imagefolder:{tmp_path}")
    with pytest.raises(LayerfastError, match=r"cannot decode .*b/0\.png"):
        list(src.batches(2))


_FAILING_WRITER = """
    import sys
    from ffcv.fields import IntField
    from layerfast.data.ffcv_writer import SafeDatasetWriter
    from layerfast.errors import LayerfastError

    class Broken:
        def __len__(self):
            return 20000

        def __getitem__(self, i):
            raise RuntimeError("sample read failed")

    w = SafeDatasetWriter(sys.argv[1], {"label": IntField()}, num_workers=1)
    try:
        w.from_indexed_dataset(Broken(), chunksize=1)
    except LayerfastError as exc:
        print("raised:", exc, flush=True)
"""


def test_a_failed_writer_lets_the_process_exit(tmp_path: Path, need_ffcv: None) -> None:
    """SafeDatasetWriter raises when a worker dies, but the chunks the dead workers never read
    stayed in the work queue: its feeder thread blocked on the full pipe, and interpreter exit
    (which joins that thread) waited forever -- the same hang the writer exists to prevent,
    one step later (a failed or Ctrl-C'd `layerfast convert` of a large dataset never
    returned to the shell). It takes ~6 s; the timeout leaves room for a loaded machine's
    imports of torch, FFCV and numba in the child."""
    code = textwrap.dedent(_FAILING_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.beton")], env=env,
                              capture_output=True, text=True, timeout=180)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"the process hung at exit after the writer raised (stdout: {out!r})")
    assert "raised: convert: an FFCV writer process failed" in done.stdout, done.stderr[-2000:]


def test_an_interrupt_while_finalizing_is_not_swallowed(tmp_path: Path, monkeypatch,
                                                        need_ffcv: None) -> None:  # fmt: skip
    """FFCV's `DatasetWriter.finalize` builds the allocation table under a bare `except:`, so a
    Ctrl-C (or SIGTERM's SystemExit from the CLI) arriving there was swallowed: the table came
    out empty and `convert` went on to publish a .beton with no image data, its sidecar, and
    exit 0 ("layerfast: terminated", then "wrote ..."). The interrupt must propagate and
    leave nothing behind."""
    from ffcv.types import ALLOC_TABLE_TYPE

    real_array = np.array

    def interrupted(obj, *args, **kwargs):  # noqa: ANN001, ANN202 - numpy.array's signature
        if kwargs.get("dtype") is ALLOC_TABLE_TYPE:
            raise KeyboardInterrupt
        return real_array(obj, *args, **kwargs)

    monkeypatch.setattr(np, "array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert("digits", tmp_path / "d.beton")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == []


def test_a_failed_convert_removes_the_directories_it_created(tmp_path: Path, need_ffcv) -> None:
    """`convert` made `--to`'s missing parent directories and left them, empty, when the
    conversion failed (here: a corrupt image in the source): half-written output."""
    from PIL import Image

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a" / "0.png")
    _png_with_bad_idat_length(src / "b" / "0.png")
    (tmp_path / "kept").mkdir()
    with pytest.raises(LayerfastError, match="cannot decode"):
        convert(f"imagefolder:{src}", tmp_path / "kept" / "new" / "deeper" / "x.beton")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == []  # its own dir stays
    (src / "b" / "0.png").unlink()
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(src / "b" / "0.png")
    out = convert(f"imagefolder:{src}", tmp_path / "kept" / "new" / "x.beton")  # success keeps them
    assert out.is_file() and open_data(str(out)).n == 2


def test_convert_writes_an_upper_case_suffix_that_data_specs_read(tmp_path: Path, need_ffcv) -> None:
    """`--data x.BETON` is read (specs match the suffix in any case), but `convert --to
    x.BETON` was refused as not ending in .beton."""
    out = convert("digits", tmp_path / "d.BETON")
    src, ref = open_data(str(out)), open_data("digits")
    assert (src.n, src.num_classes, src.scale) == (ref.n, ref.num_classes, ref.scale)
    (x, y), (x0, y0) = next(src.batches(16)), next(ref.batches(16))
    assert torch.equal(x, x0) and torch.equal(y, y0)

"""Review of every CLI flag and Python API option (session 21): bad values are one LayerfastError
(exit status 2 from the CLI), never a TypeError from deep inside, and nothing is written. Each
test failed on a200510."""

from __future__ import annotations

import pytest

import layerfast
from layerfast.demo import demo
from layerfast.errors import LayerfastError


@pytest.mark.parametrize("out", [5, b"run", 1.5])
def test_analyze_out_that_is_not_a_path_is_refused_up_front(ckpts, tmp_path, monkeypatch, out):
    """`analyze(out=5)` built the model, read the checkpoints, planned the batch and then died
    in `Path(5)` with "TypeError: expected str, bytes or os.PathLike object" (train said
    "out must be a directory path"); bytes died in `Path(b"run")`."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayerfastError, match="out must be a directory path"):
        layerfast.analyze("fcn3x256", ckpts, data="digits", out=out, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", [5, b"demo"])
def test_demo_out_that_is_not_a_path_is_refused(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayerfastError, match="out must be a directory path"):
        demo(out, progress=False)
    assert list(tmp_path.iterdir()) == []

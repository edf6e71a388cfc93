"""In-memory inputs of the Python API, adversarially (`layerfast.inputs`, session 20 review):
exotic tensors are one LayerfastError, nothing is written before every check, a state dict of
views writes only what its tensors hold, and a callable arch is named the same in every
process (so the same script again resumes)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import textwrap
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


def _inputs_root() -> Path:
    return Path(tempfile.gettempdir()) / f"layerfast-inputs-{os.getuid()}"


class Small(nn.Module):
    """A tiny MLP for digits (8×8 inputs), with a BatchNorm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


@pytest.fixture(scope="module")
def sds() -> dict[int, dict[str, torch.Tensor]]:
    """Three independent draws of Small, as {τ: state_dict}."""
    torch.manual_seed(0)
    return {t: {k: v.clone() for k, v in Small().state_dict().items()} for t in range(3)}


@pytest.fixture(scope="module")
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    src = open_data("digits")
    return src.reader.x.float() / 16, src.reader.y.clone()


def _refused(arch: object, ck: object, data: object, out: Path, msg: str) -> None:
    with pytest.raises(LayerfastError, match=msg) as info:
        layerfast.analyze(arch, ck, data=data, out=out, **ARGS)
    assert "\n" not in str(info.value)
    assert not out.exists()
    root = _inputs_root()
    assert not root.exists() or not any(root.iterdir()), "written before it was refused"


def test_a_meta_x_is_refused_not_a_torch_traceback(sds: dict, xy: tuple,
                                                   tmp_path: Path) -> None:
    """`x.to("meta")` was NotImplementedError ("Cannot copy out of meta tensor") from .cpu(),
    before the meta check that was meant to refuse it."""
    from layerfast.analysis import list_units

    x, y = xy
    _refused(Small, sds, (x.to("meta"), y), tmp_path / "a", r"x is a meta tensor")
    _refused(Small, sds, (x, y.to("meta")), tmp_path / "b", r"y is a meta tensor")
    with pytest.raises(LayerfastError, match=r"x is a meta tensor"):
        list_units(Small, data=(x.to("meta"), y))


def test_a_label_past_int64_is_refused_before_anything_is_written(sds: dict, xy: tuple,
                                                                  tmp_path: Path) -> None:
    """τ = 2**63 was written as epoch_9223372036854775808.pt, then refused by the directory
    reader ("Rename it or write a manifest.json"): files written before the refusal, and
    advice that means nothing for a mapping."""
    for i, tau in enumerate((2**63, 2**70)):
        _refused(Small, {0: sds[0], tau: sds[2]}, xy, tmp_path / f"o{i}",
                 r"ckpts: the labels τ must be below 2\*\*63")


def test_exotic_state_dict_tensors_are_one_clear_error(sds: dict, xy: tuple,
                                                       tmp_path: Path) -> None:
    """A conjugate or negative view (`c.conj()`, `c.conj().imag`) was a RuntimeError from
    torch's `Tensor.view` while hashing; a quantized tensor was said to be a "torch.strided /
    cpu tensor", which is what a good one is."""
    w = sds[2]["fc1.weight"]
    neg = torch.complex(torch.zeros_like(w), -w).conj().imag  # w, as a tensor with the neg bit
    assert neg.is_neg() and torch.equal(neg, w)
    conj = w.to(torch.complex64).conj()
    assert conj.is_conj()
    q = torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)
    cases = [(conj, r"fc1.weight.*complex64 in the checkpoint vs float32 in the model"),
             (q, r"ckpts\[2\]\['fc1.weight'\] is a quantized tensor")]
    for i, (t, msg) in enumerate(cases):
        out = tmp_path / f"o{i}"
        with pytest.raises(LayerfastError, match=msg):
            layerfast.analyze(Small, {**sds, 2: {**sds[2], "fc1.weight": t}}, data=xy, out=out,
                              **ARGS)
        assert not out.exists()
    # the neg view holds w: the same run as w itself
    plain = layerfast.analyze(Small, sds, data=xy, out=tmp_path / "p", **ARGS)
    viewed = layerfast.analyze(Small, {**sds, 2: {**sds[2], "fc1.weight": neg}}, data=xy,
                               out=tmp_path / "n", **ARGS)
    pd.testing.assert_frame_equal(plain.table, viewed.table, check_exact=True)


def _flat(sd: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """`sd` as views into one flat buffer `extra` elements longer than it needs."""
    buf = torch.zeros(sum(v.numel() for v in sd.values()) + extra)
    out, at = {}, 0
    for k, v in sd.items():
        if v.dtype != buf.dtype:  # num_batches_tracked
            out[k] = v
            continue
        out[k] = buf[at:at + v.numel()].view(v.shape)
        out[k].copy_(v)
        at += v.numel()
    return out


def test_views_into_a_large_buffer_write_only_their_own_values(sds: dict, xy: tuple,
                                                               tmp_path: Path) -> None:
    """A state dict whose tensors are views into a bigger flat buffer (a flat-parameter
    optimizer, a preallocated history) wrote the whole buffer into every epoch_<τ>.pt:
    torch.save saves a view's entire storage, 4 MB per file for a 10 kB model here (1 GB
    each for a 1-GB buffer)."""
    views = {t: _flat(sd, 1_000_000) for t, sd in sds.items()}
    res = layerfast.analyze(Small, views, data=xy, out=tmp_path / "v", **ARGS)
    sizes = [p.stat().st_size for p in Path(res.run["ckpts"]).glob("epoch_*.pt")]
    assert len(sizes) == 3 and max(sizes) < 100_000, sizes
    plain = layerfast.analyze(Small, sds, data=xy, out=tmp_path / "p", **ARGS)
    pd.testing.assert_frame_equal(plain.table, res.table, check_exact=True)
    assert plain.run["ckpts"] == res.run["ckpts"]  # the same content: the same folder


class Tied(nn.Module):
    """Two layers sharing one weight."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x.flatten(1))))))


def test_tied_views_into_a_large_buffer_stay_tied(xy: tuple, tmp_path: Path) -> None:
    """Compacting a view keeps tied entries (the same view under two names) one tensor."""
    torch.manual_seed(0)
    sds = {t: Tied().state_dict() for t in range(2)}
    views = {}
    for t, sd in sds.items():
        buf = torch.zeros(1_000_000)
        w = buf[:64 * 64].view(64, 64)
        w.copy_(sd["a.weight"])
        views[t] = {**sd, "a.weight": w, "b.weight": w}
    res = layerfast.analyze(Tied, views, data=xy, out=tmp_path / "v", **ARGS)
    loaded = torch.load(Path(res.run["ckpts"]) / "epoch_1.pt", weights_only=True)
    assert loaded["a.weight"].data_ptr() == loaded["b.weight"].data_ptr()
    assert loaded["a.weight"].untyped_storage().nbytes() == 64 * 64 * 4
    plain = layerfast.analyze(Tied, sds, data=xy, out=tmp_path / "p", **ARGS)
    pd.testing.assert_frame_equal(plain.table, res.table, check_exact=True)


def _build(num_classes: int = 10) -> nn.Module:
    return Small(num_classes)


class _Builder:
    """A callable instance building Small."""

    def __call__(self, num_classes: int = 10) -> nn.Module:
        return Small(num_classes)


def test_a_partial_or_a_callable_instance_is_named_without_its_address() -> None:
    """A functools.partial (or any callable without a __qualname__) was named by its repr,
    `functools.partial(<function _build at 0x7f...>)`: another process named it otherwise,
    so the same script again refused its own out dir ("differs in: arch") instead of
    resuming."""
    from layerfast.models import get_arch

    part = get_arch(functools.partial(_build, num_classes=10)).name
    assert " at 0x" not in part and f"{__name__}:_build" in part
    inst = get_arch(_Builder()).name
    assert " at 0x" not in inst and f"{__name__}:_Builder" in inst


@pytest.mark.slow
def test_the_same_script_with_a_partial_arch_resumes(tmp_path: Path) -> None:
    script = tmp_path / "run_partial.py"
    script.write_text(textwrap.dedent(f"""
        import functools, sys, tempfile
        import torch
        from torch import nn
        import layerfast
        tempfile.tempdir = {str(tmp_path)!r}

        def build(num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

        torch.manual_seed(0)
        sds = {{t: build().state_dict() for t in range(2)}}
        x, y = torch.rand(40, 64), torch.arange(40) % 10
        res = layerfast.analyze(functools.partial(build, num_classes=10), sds, data=(x, y),
                                out={str(tmp_path / "o")!r}, device="cpu", progress=False,
                                figures=False)
        print("evaluated", res.run["engine"]["evaluated"])
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env=env, timeout=120) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[1].returncode == 0, runs[1].stderr
    assert "evaluated 40" in runs[0].stdout and "evaluated 0" in runs[1].stdout


@pytest.mark.parametrize("data", [
    {"x": torch.zeros(300, 64), "y": torch.zeros(300, dtype=torch.long)},
    np.zeros((300, 64), np.float32),
    torch.zeros(300, 64),
])
def test_data_of_the_wrong_kind_is_one_short_line(sds: dict, tmp_path: Path,
                                                  data: object) -> None:
    """A dict, a bare array or tensor as `data` was refused with its whole repr in the
    message: dozens of lines of numbers for "one clear line"."""
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze(Small, sds, data=data, out=tmp_path / "o", **ARGS)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 300, msg
    assert "(x, y)" in msg
    assert not (tmp_path / "o").exists()


def test_a_single_state_dict_as_ckpts_says_so(sds: dict, xy: tuple, tmp_path: Path) -> None:
    """`analyze(Net, model.state_dict(), ...)` was "the labels τ must be integers, got str
    'fc1.weight'": true, but not what the user got wrong."""
    _refused(Small, sds[2], xy, tmp_path / "o", r"ckpts is one state dict .* give a mapping")


@pytest.mark.parametrize("data", [{"x": 1}, np.zeros((3, 64)), "  "])
def test_a_bad_data_spec_beside_in_memory_ckpts_writes_nothing(sds: dict, data: object,
                                                              tmp_path: Path) -> None:
    """A data argument that cannot be a spec (a dict, an array, blank) beside in-memory
    state dicts: the checkpoints' files were written to the inputs folder, then the data was
    refused ("everything is checked before the first file is written")."""
    _refused(Small, sds, data, tmp_path / "o", r"data spec")

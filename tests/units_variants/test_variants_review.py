"""Review of the variants beyond a single reset: interp requests, joint entries (make_variants)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.variants import make_variants
from tests.units_variants.test_variants import FC, UNITS, sd_at, write_run


@pytest.mark.parametrize("tau", [1.7, 1.0, True, "1", None])
def test_interp_tau_must_be_a_whole_label(tau, tmp_path: Path) -> None:
    """`interp=[("fc", 1.7, α, σ)]` evaluated τ = 1 (`int(1.7)`) under the label 1, and True
    read as τ = 1: a request for a label that does not exist gave the rows of another one.
    `joint`'s `(names, τ)` and `checkpoints` refuse such values; interp now does too."""
    model = write_run(tmp_path)
    with pytest.raises(LayerfastError, match=r"interp fc: τ must be a checkpoint label"):
        make_variants(model, UNITS, CheckpointDir(tmp_path), reset=(), interp=[("fc", tau, 0.5, 0.0)])


@pytest.mark.parametrize("alpha, sigma", [("0.5", 0.0), (0.5, "0.1"), (None, 0.0), (0.5, None),
                                          (True, 0.0), (0.5, [0.1])])
def test_interp_alpha_sigma_must_be_numbers(alpha, sigma, tmp_path: Path) -> None:
    """σ = "0.1" was a bare TypeError ("'>=' not supported between 'str' and 'int'") and α =
    None one from float(); α = "0.5" was read as a number while σ = "0.1" crashed, and True
    was α = 1. Each is now a LayerfastError naming the field."""
    model = write_run(tmp_path)
    with pytest.raises(LayerfastError, match=r"interp fc: (alpha|sigma) must be a "):
        make_variants(model, UNITS, CheckpointDir(tmp_path), reset=(), seeds=(1,),
                      interp=[("fc", 1, alpha, sigma)])


@pytest.mark.parametrize("entry", [("fc", 1, 0.5), ("fc", 1, 0.5, 0.0, 3), "fc", 5])
def test_interp_entry_must_be_four_fields(entry, tmp_path: Path) -> None:
    """An entry of three fields was 'not enough values to unpack' (a ValueError traceback)."""
    model = write_run(tmp_path)
    with pytest.raises(LayerfastError, match=r"interp: an entry is \(unit, τ, alpha, sigma\)"):
        make_variants(model, UNITS, CheckpointDir(tmp_path), reset=(), interp=[entry])


def test_interp_accepts_numpy_and_tensor_values(tmp_path: Path) -> None:
    """A notebook's numbers (numpy scalars, 0-d tensors) stay accepted, with the same weights."""
    model = write_run(tmp_path)
    ck = CheckpointDir(tmp_path)
    vs = make_variants(model, UNITS, ck, reset=(), seeds=(1,),
                       interp=[("fc", np.int64(1), np.float32(0.25), torch.tensor(0.0)),
                               ("fc", torch.tensor(1), 0.25, 0.0)])
    a, b = vs[1:]
    assert (a.checkpoint, a.alpha, a.sigma) == (1, 0.25, 0.0) == (b.checkpoint, b.alpha, b.sigma)
    assert isinstance(a.checkpoint, int) and isinstance(a.alpha, float)
    t, f = sd_at(1), sd_at(5)
    got = a.overrides()
    for k in FC.keys:
        assert torch.equal(got[k], (0.75 * t[k].double() + 0.25 * f[k].double()).float()), k


@pytest.mark.parametrize("entry, match", [
    ({"fc", "conv"}, r"joint reset: an entry is a list of unit names, or \(names, τ\)"),
    (5, r"joint reset: an entry is a list of unit names, or \(names, τ\)"),
    ((["fc", "conv"], 1.0), r"joint reset fc\+conv: τ must be a checkpoint label"),
    ((["fc", "conv"], True), r"joint reset fc\+conv: τ must be a checkpoint label"),
])
def test_joint_entry_shapes(entry, match, tmp_path: Path) -> None:
    """A set of names was a bare TypeError ('set' object is not subscriptable), and
    `(names, 1.0)` was read as a list of two unit names, refused as 'no unit named
    "['fc', 'conv']"', which hid that the τ was the problem."""
    model = write_run(tmp_path)
    with pytest.raises(LayerfastError, match=match):
        make_variants(model, UNITS, CheckpointDir(tmp_path), reset=(), joint=[entry])


def test_joint_tau_as_a_tensor(tmp_path: Path) -> None:
    """`(names, torch.tensor(1))` (a label read from a tensor) is that τ, as in interp."""
    model = write_run(tmp_path)
    vs = make_variants(model, UNITS, CheckpointDir(tmp_path), reset=(),
                       joint=[(["fc", "conv"], torch.tensor(1))])
    assert [(v.unit, v.kind, v.checkpoint) for v in vs[1:]] == [("fc+conv", "joint", 1)]


@pytest.mark.parametrize("value", [b"0.1", bytearray(b"0.1"), memoryview(b"0.1")])
def test_sigma_as_bytes_is_refused(value) -> None:
    """`analyze(sigma=b"0.1")` iterated the bytes and ran σ = 46, 48 and 49 (the codes of '.',
    '0', '1') without a word: three noise levels nobody asked for. Bytes are refused, as
    `seeds` and `checkpoints` refuse them."""
    from layerfast.interp import interp_options

    with pytest.raises(LayerfastError, match=r"--sigma takes finite numbers"):
        interp_options(["interp"], [0.5], value)
    with pytest.raises(LayerfastError, match=r"--alphas takes finite numbers"):
        interp_options(["interp"], value, 0.0)

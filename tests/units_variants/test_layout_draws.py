"""A rerandom draw does not depend on the model's memory layout.

Init functions fill a tensor in memory order, and the engine converts the model to channels_last
(`--layout channels_last`, the default for bf16/TF32 on CUDA) before it asks the variants for
their tensors. The draw copied the live module with its strides, so the same seed gave other
weights there: rerandom rows up to 30 points apart from the contiguous run's, and from the
draws distances.csv measured (found by a differential fuzz against an independent naive loop).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import layerfast
from layerfast.models import build_model
from layerfast.units import make_units
from layerfast.variants import rerandom_draw


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_a_draw_is_the_same_from_a_channels_last_model() -> None:
    model, spec = build_model("resnet20", 10, (1, 8, 8))
    units = make_units(model, granularity="block", arch=spec)
    want = {u.name: rerandom_draw(model, u, 1, spec) for u in units}
    model = model.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
    for u in units:
        got = rerandom_draw(model, u, 1, spec)
        for k, t in want[u.name].items():
            assert torch.equal(got[k], t), (u.name, k)
            assert got[k].is_contiguous(), k


@pytest.fixture(scope="module")
def r20_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet20 for digits' 8x8 images: θ⁰ and a perturbed τ = 1 (no training needed)."""
    root = tmp_path_factory.mktemp("r20")
    torch.manual_seed(0)
    model, _ = build_model("resnet20", 10, (1, 8, 8))
    torch.save(model.state_dict(), root / "epoch_000.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), root / "epoch_001.pt")
    return root


def test_rerandom_rows_do_not_depend_on_the_layout(r20_ckpts: Path, tmp_path: Path) -> None:
    kw = dict(data="digits", granularity="block", reset="rerandom", seeds=2, max_samples=120,
              device="cpu", progress=False, figures=False)
    a = layerfast.analyze("resnet20", r20_ckpts, out=tmp_path / "a", layout="contiguous", **kw)
    b = layerfast.analyze("resnet20", r20_ckpts, out=tmp_path / "b", layout="channels_last", **kw)
    assert b.run["channels_last"] and not a.run["channels_last"]
    ra, rb = (r.table[r.table["kind"] == "rerandom"].reset_index(drop=True) for r in (a, b))
    assert len(ra) == 2 * 11
    # channels_last changes the logits in the last bits only (docs/engine.md): the same weights
    # give the same loss to ~1e-6 and the same error up to a near-tie flip
    torch.testing.assert_close(torch.tensor(rb["loss"].to_numpy()),
                               torch.tensor(ra["loss"].to_numpy()), rtol=1e-4, atol=0)
    assert ((rb["error"] - ra["error"]).abs() * 120).max() <= 1
    assert a.distances.equals(b.distances)  # and the draws measured are the draws evaluated


def test_a_module_with_a_sparse_buffer_is_still_copied() -> None:
    """The contiguous copy must not refuse tensors without a memory format (sparse)."""
    from layerfast.variants import _cpu_copy

    m = torch.nn.Linear(3, 2)
    m.register_buffer("mask", torch.eye(3).to_sparse())
    c = _cpu_copy(m)
    assert c.mask.layout == torch.sparse_coo and torch.equal(c.mask.to_dense(), torch.eye(3))
    assert c.mask is not m.mask and torch.equal(c.weight, m.weight)

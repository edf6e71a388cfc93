"""Session 22's engine changes, checked on a CUDA GPU (every test here is `cuda`: skipped
without one; `scripts/gpu_session.sh`'s cuda-new-tests step runs them).

1. A reused `Evaluator` decides its layout again on each `run`: on CUDA under bf16 the default
   layout is channels_last; after the caller changes the model to one that only runs
   contiguous (a `view` of a channels_last map), the second run must fall back to the
   contiguous layout, as a fresh Evaluator does, not fail as "the model fails on samples".
2. `bench --profile`'s profiled run keeps its warm-up's first-batch verdicts on CUDA too (the
   checks' forwards are no part of the op table).
3. Data and variants served by `__getitem__` alone (a map-style Dataset of batches) are
   evaluated on CUDA as a list of them is.
4. `analyze` under a caller's float64 default dtype runs the fp32 model on CUDA: the same
   rows as under the float32 default.

`DEVICE` and the `cuda` markers are the only GPU-specific lines: the logic was checked on the
CPU by a copy with `DEVICE = "cpu"` and no markers (test 1 there needs `layout=
"channels_last"`, as the CPU's bf16 default layout is contiguous).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from tests.reviews.test_diff21_s22 import _Batches

DEVICE = "cuda"
LAYOUT = "auto"  # the CPU copy: "channels_last"


class _ViewNet(nn.Module):
    """Runs in either layout while `flat`; a `view` of the conv map (contiguous only) after."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.flat = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(256, 3), True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.flatten(1) if self.flat else h.view(h.shape[0], -1))


@pytest.mark.cuda
def test_a_reused_evaluator_falls_back_to_contiguous_for_a_changed_model() -> None:
    torch.manual_seed(0)
    model = _ViewNet()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
            for _ in range(2)]
    variants = [{}, {"conv.weight": torch.zeros(4, 3, 3, 3)}, {"fc.bias": torch.ones(3)}]
    ev = Evaluator(model, variants, device=DEVICE, precision="bf16", layout=LAYOUT)
    assert ev.run(data).n == 64
    model.flat = False
    if LAYOUT == "channels_last":  # asked for explicitly: refused with the layout named
        from layerfast.errors import LayerfastError

        with pytest.raises(LayerfastError, match="does not run with channels_last"):
            ev.run(data)
        return
    second = ev.run(data)
    fresh = Evaluator(model, variants, device=DEVICE, precision="bf16", layout=LAYOUT).run(data)
    assert second.n == fresh.n == 64
    assert not ev.channels_last
    # the same contiguous bf16 pass: at most a sample apart (cuDNN may pick another algorithm)
    diff = (second.counts.cpu()[:, [0, 1, 3]] - fresh.counts.cpu()[:, [0, 1, 3]]).abs()
    assert diff.max() <= 1, (second.counts, fresh.counts)


@pytest.mark.cuda
def test_bench_profile_keeps_the_warm_up_verdicts_on_cuda(tmp_path) -> None:
    from layerfast.bench import profile_pass
    from layerfast.data import open_data

    torch.manual_seed(0)
    src = open_data("digits", split="test", max_samples=32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    ev = Evaluator(model, [{}, {"3.weight": torch.zeros(10, 16)}], device=DEVICE)
    checked: list[int] = []
    settle = ev._settle_cuts
    ev._settle_cuts = lambda *a: checked.append(1) or settle(*a)
    out = profile_pass(ev, src, tmp_path / "prof.txt")
    assert len(checked) == 1 and out["samples"] == 32
    assert ev.run(src).n == 32 and len(checked) == 2  # outside the profile: checked again


@pytest.mark.cuda
def test_a_sequence_of_batches_and_variants_on_cuda() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    reset = {"0.weight": torch.zeros(3, 4)}
    want = Evaluator(model, [{}, reset], device=DEVICE, precision="fp32").run(batches)
    got = Evaluator(model, _Batches([{}, reset]), device=DEVICE, precision="fp32").run(
        _Batches(batches))
    assert got.n == 10 and torch.equal(got.counts.cpu(), want.counts.cpu())


@pytest.mark.cuda
def test_analyze_under_a_float64_default_on_cuda(ckpts, tmp_path) -> None:
    from layerfast.analysis import analyze

    kw = dict(data="digits", reset="reinit,rerandom", checkpoints=[0, 3], max_samples=200,
              progress=False, figures=False, device=DEVICE, precision="fp32")
    analyze("fcn3x256", ckpts, out=tmp_path / "ref", **kw)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        analyze("fcn3x256", ckpts, out=tmp_path / "run", **kw)
    finally:
        torch.set_default_dtype(before)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "results.csv"),
                                  pd.read_csv(tmp_path / "ref" / "results.csv"))

"""Session 24's changes, checked on a CUDA GPU (every test here is `cuda`: skipped without one;
`scripts/gpu_session.sh`'s cuda-new-tests step runs them).

1. The autocast-region replay (`Program.regions_here`) on the CUDA default path: bf16,
   channels_last, a conv net whose residual block the forward keeps in float32 with
   `torch.autocast("cuda", enabled=False)`, fan-out off and on: traced, no fallback, and the
   logits of the model's own forward under the same autocast (fan-out: within fp32's and
   cuDNN's last bits; a region run in bf16 instead is off by ~1e-2).
2. A float16 model's compute floor on CUDA times a float16 GEMM (tensor cores, the bf16 rate)
   and reads the fp16 datasheet column: the fp32 GEMM made a floor ~15x too high.

`DEVICE` and the `cuda` markers are the only GPU-specific lines: the logic was checked on the
CPU by a copy with `DEVICE = "cpu"` and no markers (test 2's rate bound is CUDA's own).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerfast.engine.flops as flops
from layerfast.engine import Evaluator
from layerfast.engine.graph import Program
from layerfast.engine.plan import make_plan
from layerfast.engine.precision import tf32_allowed

DEVICE = "cuda"


class _Float32Block(nn.Module):
    """A conv stem under the caller's autocast, a residual block kept in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        for n in (self.n1, self.n2):
            n.running_mean.uniform_(-1, 1)
            n.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(self.c1(x)))
        with torch.autocast(DEVICE, enabled=False):
            h = h.float()
            h = F.relu(self.n2(self.c2(h)) + h)
            return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _case():
    torch.manual_seed(0)
    model = _Float32Block().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 3, 16, 16, generator=g), torch.randint(0, 10, (256,), generator=g)
    variants = [{k: torch.randn(v.shape, generator=g) * 0.1}
                for k, v in model.state_dict().items() if v.dim() in (2, 4) for _ in range(3)]
    return model, variants, [(x[:128], y[:128]), (x[128:], y[128:])]


def _plain_loop(model, variants, batches, region_in_bf16: bool = False) -> torch.Tensor:
    """Reset, the model's own forward under bf16 autocast on the device (TF32 allowed, as the
    bf16 mode runs), keep the logits. `region_in_bf16`: the wrong answer, the float32 region
    run under bf16 (what a program that dropped the region would compute)."""
    model = model.to(DEVICE).to(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    with torch.no_grad(), tf32_allowed(True):
        for v in variants:
            model.load_state_dict({k: t.to(DEVICE) for k, t in v.items()}, strict=False)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                xs = [x.to(DEVICE).to(memory_format=torch.channels_last) for x, _ in batches]
                if region_in_bf16:
                    with torch.autocast(DEVICE, dtype=torch.bfloat16):
                        h = [F.relu(model.n1(model.c1(x))) for x in xs]
                        out.append(torch.cat([model.fc(F.adaptive_avg_pool2d(
                            F.relu(model.n2(model.c2(t)) + t), 1).flatten(1)) for t in h]
                        ).float().cpu())
                else:
                    out.append(torch.cat([model(x) for x in xs]).float().cpu())
            model.load_state_dict(state)
    return torch.stack(out)


@pytest.mark.cuda
@pytest.mark.parametrize("fanout", [False, True])
def test_a_float32_region_is_replayed_on_the_cuda_default_path(fanout: bool) -> None:
    model, variants, batches = _case()
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg.float().cpu())

    res = Evaluator(model, variants, device=DEVICE, precision="bf16", fanout=fanout).run(
        batches, on_logits=hook)
    assert res.precision == "bf16"
    assert res.plan["untraced"] is None, res.plan["untraced"]
    assert res.plan["fanout_fallbacks"] == {}, res.plan["fanout_fallbacks"]
    logits = torch.stack([torch.cat(got[i]) for i in range(len(variants))])
    ref = _plain_loop(model, variants, batches)
    wrong = _plain_loop(model, variants, batches, region_in_bf16=True)
    err, off = (logits - ref).abs().max().item(), (wrong - ref).abs().max().item()
    assert err <= 1e-4 < off, f"max |Δlogit| {err:.3g} (the region in bf16 would be {off:.3g})"


@pytest.mark.cuda
def test_a_float16_models_floor_is_timed_in_float16() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10)).to(DEVICE, torch.float16)
    keysets = [{"1.weight"}, {"3.weight"}]
    plan = make_plan(Program(model), keysets, False, 1)
    out = flops.floor_report(model, plan, (1, 32, 32), 10_000, torch.device(DEVICE), "fp32",
                             keysets=keysets)
    fp32 = flops.measure_rate(torch.device(DEVICE), "fp32", seconds=0.2)
    assert out["rate_tflops_gemm"] * 1e12 > 3 * fp32, (out["rate_tflops_gemm"], fp32 / 1e12)
    if DEVICE == "cuda":
        name = torch.cuda.get_device_name()
        sheet = next((r for k, r in flops.DATASHEET_TFLOPS if k in name), None)
        if sheet is not None:
            assert out["rate_tflops_datasheet"] == sheet["fp16"]

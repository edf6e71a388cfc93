"""Session 23's changes, checked on a CUDA GPU (every test here is `cuda`: skipped without one;
`scripts/gpu_session.sh`'s cuda-new-tests step runs them).

1. A forward that sets `torch.autocast` itself for part of it (a head kept in float32 with
   `torch.autocast("cuda", enabled=False)`, common in GPU code) gives under the CUDA default
   bf16 the model's own forward's logits under the same autocast (fx records the ops, not the
   `with`: the traced program ran that head in bf16). It ran untraced in s23; since s24 it
   keeps its trace, the head's steps run under the region's state (`Program.regions_here`).
2. `layerfast bench` times a model built in bfloat16 on CUDA: the naive loop feeds the model's
   own dtype (it fed float32 and died in its warm-up).

`DEVICE` and the `cuda` markers are the only GPU-specific lines: the logic was checked on the
CPU by a copy with `DEVICE = "cpu"` and no markers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerfast.bench as bench
from layerfast.engine import Evaluator
from layerfast.engine.precision import tf32_allowed
from tests.cli import test_bench_audit as _audit

DEVICE = "cuda"
_args, quick = _audit._args, _audit.quick


class _Float32Head(nn.Module):
    """Two layers under the caller's autocast, a head the model keeps in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
        with torch.autocast(DEVICE, enabled=False):
            return self.fc(h.float())


def _case():
    torch.manual_seed(0)
    model = _Float32Head().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 64, generator=g), torch.randint(0, 10, (300,), generator=g)
    variants = [{"a.weight": torch.randn(64, 64, generator=g) * 0.1},
                {"b.weight": torch.randn(64, 64, generator=g) * 0.1},
                {"fc.weight": torch.randn(10, 64, generator=g) * 0.1}]
    return model, variants, [(x[:150], y[:150]), (x[150:], y[150:])]


def _plain_loop(model, variants, batches) -> torch.Tensor:
    """Reset, the model's own forward under bf16 autocast on the device, keep the logits.

    With TF32 allowed, as the bf16 mode runs (`precision_context`): the head the forward keeps
    in float32 is a float32 matmul, which the engine's bf16 pass runs in TF32 on CUDA, and
    torch's default (cuBLAS TF32 off) made this reference another computation. On the CPU the
    setting changes nothing (oneDNN stays in full float32 in every mode)."""
    model = model.to(DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    with torch.no_grad(), tf32_allowed(True):
        for v in variants:
            model.load_state_dict({k: t.to(DEVICE) for k, t in v.items()}, strict=False)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                out.append(torch.cat([model(x.to(DEVICE)) for x, _ in batches]).float().cpu())
            model.load_state_dict(state)
    return torch.stack(out)


@pytest.mark.cuda
@pytest.mark.parametrize("fanout", [False, True])
def test_bf16_keeps_a_float32_region_of_the_forward_on_cuda(fanout: bool) -> None:
    model, variants, batches = _case()
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg.float().cpu())

    res = Evaluator(model, variants, device=DEVICE, precision="bf16", fanout=fanout).run(
        batches, on_logits=hook)
    assert res.precision == "bf16"
    assert res.plan["untraced"] is None, res.plan["untraced"]
    logits = torch.stack([torch.cat(got[i]) for i in range(len(variants))])
    ref = _plain_loop(model, variants, batches)
    assert torch.equal(logits, ref), f"max |Δlogit| {(logits - ref).abs().max():.3g}"


FACTORY = """
import torch
from torch import nn

def make(num_classes, in_shape):
    c, h, w = in_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * h * w, num_classes)).to(torch.bfloat16)
"""


@pytest.mark.cuda
def test_bench_times_a_bfloat16_model_on_cuda(tmp_path, monkeypatch, quick) -> None:
    (tmp_path / "narrow_s23_cuda.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = bench.run(_args("--arch", "narrow_s23_cuda:make", "--naive-variants", "3",
                          "--precision", "bf16", "--device", DEVICE))
    assert out["device"] == DEVICE and out["model_dtype"] == "bfloat16"
    assert out["precision"] == "fp32"  # what `precision.for_model` records for such a model
    assert max(out["agreement_with_naive"]["max_abs_diff_correct1"].values()) <= 1

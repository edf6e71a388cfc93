"""The fan-out's glue: one fanned ResNet-50 Bottleneck unit three ways — fold form with
BN [+ add] + ReLU fused into `layerfast::affine_relu` (the default), fold form with those as
torch ops, and unfolded after every conv (`pytest benchmarks/bench_fanout.py --benchmark-enable`).

The unit is torchvision's `layer2.0` (256 -> 512 channels, stride 2, with its downsample) with
K = 7 weight sets (5 checkpoints + 2 re-randomizations, as at block granularity), run from its
shared input through a pooled head. Both ways do the same convolutions; they differ only in
layout copies and elementwise passes, so the gap is the glue the fold form removes.
CPU: fp32, 8 samples at 28² (the block's input at 56²/2 for a 112² image). CUDA: bf16,
channels_last, 64 samples at 56² (ImageNet's shape at that block). Before it is timed, each
way's logits are checked against K plain forwards of the model with each weight set loaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from layerfast.engine.fanout import fan_plan
from layerfast.engine.fanrun import run_fanned, stack_module
from layerfast.engine.graph import Program, no_inplace_modules
from layerfast.engine.precision import precision_context

K = 7


def _unit(device: str, cl: bool) -> tuple[Program, object, dict, list[dict]]:
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(256, 512, 1, stride=2, bias=False), nn.BatchNorm2d(512))
    model = nn.Sequential(Bottleneck(256, 128, stride=2, downsample=down),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)).eval().to(device)
    if cl:
        model.to(memory_format=torch.channels_last)
    keys = {k for k in model.state_dict() if k.startswith("0.") and "num_batches" not in k}
    prog = Program(model)
    plan = fan_plan(prog, 0, keys)
    assert plan is not None
    sd = model.state_dict()
    stacks = {}
    for mod in plan.modules:
        per = [{k[len(mod) + 1:]: sd[k] * (1 + 0.01 * i) for k in keys if k.startswith(mod + ".")}
               for i in range(K)]
        stacks[mod] = stack_module(prog.modules[mod], per, cl)
    weights = [{k: sd[k] * (1 + 0.01 * i) for k in keys} for i in range(K)]
    return prog, plan, stacks, weights


def _check(prog: Program, weights: list[dict], x: torch.Tensor, got: torch.Tensor,
           precision: str) -> None:
    """The fanned logits [K·B, C] equal K plain forwards of the model with each weight set
    loaded (fp32: 1e-4; bf16: 5e-2 of the logits' scale, its own rounding in another order)."""
    model = copy.deepcopy(prog.model)
    want = []
    with torch.inference_mode(), precision_context(precision, x.device):
        for w in weights:
            model.load_state_dict(w, strict=False)
            want.append(model(x).float())
    want_t = torch.cat(want)
    tol = 1e-4 if precision == "fp32" else 5e-2
    scale = float(want_t.abs().max())
    torch.testing.assert_close(got.float(), want_t, rtol=tol, atol=tol * scale)


def _case(benchmark, device: str, mode: str) -> None:
    cuda = device == "cuda"
    cl, precision = (True, "bf16") if cuda else (False, "fp32")
    prog, plan, stacks, weights = _unit(device, cl)
    B, hw = (64, 56) if cuda else (8, 28)
    x = torch.randn(B, 256, hw, hw, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)

    def once() -> torch.Tensor:
        with torch.inference_mode(), no_inplace_modules(prog.model), \
                precision_context(precision, torch.device(device)):
            y = run_fanned(prog, plan, x, stacks, K, fold=mode != "unfolded",
                           fuse_ops=mode == "fused")
        if cuda:
            torch.cuda.synchronize()
        return y

    _check(prog, weights, x, once(), precision)
    benchmark.extra_info.update({"device": device, "precision": precision, "K": K, "B": B, "hw": hw})
    benchmark(once)


MODES = ["fused", "fold", "unfolded"]


@pytest.mark.parametrize("mode", MODES)
def test_cpu_bottleneck(benchmark, mode):
    _case(benchmark, "cpu", mode)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_bottleneck(benchmark, mode):
    _case(benchmark, "cuda", mode)

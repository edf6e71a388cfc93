"""The compute floor of a CPU bf16 pass (session 23). bf16 autocast runs a CPU pass's matmuls in
bfloat16 (oneDNN: several times the fp32 rate on CPUs with AVX512-BF16 or AMX), but the floor's
GEMM was timed in float32 off CUDA, so the floor of such a pass was too high and layerfast looked
closer to it than it was."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from layerfast.engine.flops import measure_rate


class _MatmulDtypes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _gemm_dtypes(precision: str) -> set[torch.dtype]:
    with _MatmulDtypes() as mode:
        rate = measure_rate(torch.device("cpu"), precision, seconds=0.01)
    assert rate > 0
    return mode.dtypes


def test_a_cpu_bf16_pass_is_floored_at_a_bf16_gemm() -> None:
    assert _gemm_dtypes("bf16") == {torch.bfloat16}


def test_cpu_fp32_and_tf32_passes_keep_an_fp32_gemm() -> None:
    assert _gemm_dtypes("fp32") == {torch.float32}
    assert _gemm_dtypes("tf32") == {torch.float32}

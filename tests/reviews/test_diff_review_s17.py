"""Second-opinion review of the a5955c0..1e31fa0 change: defects the change introduced or left
half-fixed. Each test failed on 1e31fa0."""

from __future__ import annotations

import pytest

from tests.analysis.test_api_hygiene_s17 import NEW_FP32_API, _run_py  # a fresh interpreter


@pytest.mark.skipif(not NEW_FP32_API, reason="torch without the per-backend fp32_precision API")
@pytest.mark.parametrize("caller", [
    # TF32 for cuDNN, IEEE for cuBLAS (torch's old defaults), written with the new API
    'b.cudnn.fp32_precision = "tf32"; b.cuda.matmul.fp32_precision = "ieee"',
    'b.fp32_precision = "tf32"; torch.set_float32_matmul_precision("highest")',
])
def test_fp32_pass_turns_cudnn_tf32_off_whatever_the_caller_inherits(caller):
    # In these states the legacy flags are readable, so `tf32_allowed` took the legacy path;
    # but torch's `cudnn.allow_tf32 = False` sets conv and RNN to "none" (inherit), and they
    # inherited the caller's "tf32" from cuDNN's or the global setting: an fp32 pass ran its
    # convolutions in TF32 on a GPU while recording fp32.
    out = _run_py(f"""
import torch
from layerfast.engine.precision import tf32_allowed
b = torch.backends
{caller}
def state():
    return (b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision,
            b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision)
before = state()
with tf32_allowed(False):
    inside = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
              b.cudnn.rnn.fp32_precision)
with tf32_allowed(True):
    on = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
          b.cudnn.rnn.fp32_precision)
print("tf32" in inside, on == ("tf32",) * 3, state() == before, inside, on)
""")
    assert out.startswith("False True True"), out

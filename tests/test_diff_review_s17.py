"""Second-opinion review of the a5955c0..1e31fa0 change: defects the change introduced or left
half-fixed. Each test failed on 1e31fa0."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

NEW_FP32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _run_py(code: str) -> str:
    """`code` in a fresh interpreter (torch's precision settings are process-global and a mixed
    legacy/new state cannot be undone reliably); its last stdout line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


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

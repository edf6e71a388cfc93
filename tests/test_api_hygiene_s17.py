"""Review of the Python API as research code embeds it: what `Evaluator` and `analyze` leave
behind in the process (global torch settings, the caller's model) and what they accept. Each
test failed on a5955c0 but those marked as guards of a fix."""

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
    """`code` in a fresh interpreter (the precision settings are process-global and a mixed
    legacy/new state cannot be undone reliably); its last stdout line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


_EVAL = """
import torch
from torch import nn
import layerfast
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
def run(precision="fp32"):
    return layerfast.Evaluator(m, [{}, {"2.bias": torch.zeros(3)}], device="cpu",
                               precision=precision).run([(x, y)])
"""


@pytest.mark.skipif(not NEW_FP32_API, reason="torch without the per-backend fp32_precision API")
def test_evaluator_runs_for_a_caller_of_torchs_new_fp32_precision_api():
    # torch 2.9+ recommends `torch.backends.cuda.matmul.fp32_precision = "tf32"`; once it is
    # used, reading the legacy `allow_tf32` raises, and precision_context read it on every pass:
    # the Evaluator (and analyze, train) failed with torch's "mix of the legacy and new APIs".
    out = _run_py(_EVAL + """
torch.backends.cuda.matmul.fp32_precision = "tf32"
torch.backends.cudnn.conv.fp32_precision = "ieee"
res = run()
print(res.n, torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
""")
    assert out == "16 tf32 ieee"


def test_evaluator_keeps_a_callers_medium_float32_matmul_precision():
    # Restoring `allow_tf32 = True` made "medium" "high" (torch < 2.9) or a mixed legacy/new
    # state in which torch.get_float32_matmul_precision() itself raised (2.9+).
    out = _run_py(_EVAL + """
torch.set_float32_matmul_precision("medium")
run("fp32"); run("bf16")
print(torch.get_float32_matmul_precision())
""")
    assert out == "medium"


@pytest.mark.skipif(not NEW_FP32_API, reason="torch without the per-backend fp32_precision API")
def test_evaluator_leaves_the_default_fp32_precision_settings_as_they_were():
    # Restoring through the legacy setter wrote "ieee" over the default "none" (inherit).
    out = _run_py(_EVAL + """
b = torch.backends
def state():
    return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
            b.cudnn.rnn.fp32_precision, b.mkldnn.matmul.fp32_precision,
            torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
before = state()
run("fp32"); run("bf16")
print(state() == before, before)
""")
    assert out.startswith("True"), out


def test_legacy_flags_stay_readable_inside_the_pass():
    # (a guard of the fix above, which passed before it)
    # Code that reads the legacy flags while the model runs (torch.compile's inductor does)
    # must still be able to, for a caller who never touched the new API.
    out = _run_py(_EVAL + """
seen = []
m[0].register_forward_hook(lambda *a: seen.append(
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
torch.backends.cuda.matmul.allow_tf32 = True
run("fp32")
print(set(seen), torch.backends.cuda.matmul.allow_tf32)
""")
    assert out == "{(False, False)} True"
